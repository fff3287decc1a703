import logging
from pathlib import Path

import pytest
import torch

from bincount.config import compose
from bincount import precision
from bincount.precision import choose_precision
from bincount.trainer import instantiate_trainer
from tests.fakes import FAST, set_output_dir


@pytest.fixture
def cpu_features(monkeypatch):
    """Simulate a CPU with or without bfloat16 instructions (PyTorch's own feature checks)."""

    def set_features(*, avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    return set_features


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, "32-true"),  # e.g. Skylake/Cascade Lake (ml.m5), AMD Zen 3
    (True, False, "bf16-mixed"),  # Cooper Lake, Zen 4
    (False, True, "bf16-mixed"),  # Sapphire Rapids (ml.m7i) reports both; AMX alone is enough
])
def test_cpu_precision_follows_the_bfloat16_instructions(cpu_features, avx512_bf16, amx, expected):
    cpu_features(avx512_bf16=avx512_bf16, amx=amx)
    for accelerator in ("cpu", "auto"):
        chosen, reason = choose_precision(accelerator)
        assert chosen == expected
        assert ("has bfloat16" if expected == "bf16-mixed" else "no bfloat16") in reason


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpu_precision_follows_native_bfloat16(monkeypatch, native_bf16, expected):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native_bf16 or including_emulation  # recent PyTorch says yes to emulated bfloat16 on a T4

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A10G" if native_bf16 else "Tesla T4")
    for accelerator in ("gpu", "cuda", "auto"):
        chosen, reason = choose_precision(accelerator)
        assert chosen == expected
        assert reason.startswith("NVIDIA A10G" if native_bf16 else "Tesla T4")
    assert calls and not any(calls)  # emulation does not count


def test_other_accelerators_train_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert choose_precision("auto")[0] == "32-true"
    assert choose_precision("mps")[0] == "32-true"


@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_precision_reaches_the_trainer_and_is_logged_once(cpu_features, train_cfg, caplog, has_bf16):
    cpu_features(avx512_bf16=has_bf16, amx=False)
    cfg = train_cfg()
    assert cfg.trainer.precision == "auto"  # the default of every trainer config
    with caplog.at_level(logging.INFO):
        trainer = instantiate_trainer(cfg)
    expected = "bf16-mixed" if has_bf16 else "32-true"
    assert trainer.precision == expected
    lines = [r.getMessage() for r in caplog.records if "trainer.precision=auto" in r.getMessage()]
    assert len(lines) == 1 and expected in lines[0]


def test_an_explicit_precision_is_kept(cpu_features, train_cfg, caplog):
    cpu_features(avx512_bf16=True, amx=True)
    with caplog.at_level(logging.INFO):
        trainer = instantiate_trainer(train_cfg("trainer.precision=32-true"))
    assert trainer.precision == "32-true"
    assert not any("trainer.precision=auto" in r.getMessage() for r in caplog.records)


def test_eval_computes_in_float32(cpu_features, fake_abid, tmp_path):
    cpu_features(avx512_bf16=True, amx=True)
    root, _ = fake_abid
    cfg = set_output_dir(compose("eval", [f"data.root={root}", *FAST, f"model_dir={tmp_path}"]), tmp_path)
    assert instantiate_trainer(cfg).precision == "32-true"


def test_bfloat16_training_exports_float32_weights(trained_run):
    """The shared run's training steps ran in ``bf16-mixed``; its ``model.pt`` is float32 (and
    ``eval.py`` reproduces its report photo by photo: ``tests/test_train.py``)."""
    cfg, _ = trained_run
    assert cfg.trainer.precision == "bf16-mixed"
    exported = torch.load(Path(cfg.paths.output_dir) / "model" / "model.pt", weights_only=True)
    assert {t.dtype for t in exported.values() if t.is_floating_point()} == {torch.float32}


def test_the_installed_torch_still_has_the_cpu_feature_checks():
    # cpu_has_bf16 counts a missing check as "no": a PyTorch that renamed them would silently
    # train in float32 everywhere
    assert callable(torch.cpu._is_avx512_bf16_supported) and callable(torch.cpu._is_amx_tile_supported)
    assert precision.cpu_has_bf16() is (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, False), (True, False, True), (False, True, True), (True, True, True)])
def test_cpu_has_bf16_is_either_check(cpu_features, avx512_bf16, amx, expected):
    cpu_features(avx512_bf16=avx512_bf16, amx=amx)
    assert precision.cpu_has_bf16() is expected
