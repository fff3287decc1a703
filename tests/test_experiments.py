"""Every experiment file composes into the real training config and every component in it builds
(in the spirit of torchtune's ``tests/recipes/test_configs.py``): a misspelt ``_target_``, a value
a constructor refuses or a weights name torchvision does not have fails here, not in a paid job."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torchvision
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from bincount.config import compose, config_dir
from bincount.data.datamodule import ABIDDataModule
from bincount.models.module import BinCountModule
from bincount.trainer import instantiate_trainer
from tests.fakes import set_output_dir

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


def targets(node, key: str = "") -> dict[str, str]:
    """Every ``_target_`` in ``node``, by the dotted key of the node that names it."""
    found = {}
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found[key] = node._target_
        for k, v in node.items_ex(resolve=False):
            found |= targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            found |= targets(v, f"{key}[{i}]")
    return found


def build_experiment(name: str, out: Path, *overrides: str,
                     ) -> tuple[DictConfig, ABIDDataModule, BinCountModule, L.Trainer]:
    """Compose ``+experiment=name`` and instantiate its data module, model and Trainer (callbacks,
    loggers) as ``train()`` does, on one CPU device with every output under ``out``.

    The model's pretrained weights are checked by name against torchvision and not loaded (no
    download): the model is built with ``weights=None``.
    """
    cfg = set_output_dir(compose("train", [f"+experiment={name}", f"data.root={out / 'abid'}", *overrides]),
                         out / "run")
    for key, target in targets(cfg).items():  # including the partials (optimizer, scheduler)
        try:
            hydra.utils.get_object(target)
        except ImportError as err:
            raise AssertionError(f"{key}._target_={target}: {err}") from None
    if cfg.model.weights is not None:
        enum = torchvision.models.get_model_weights(cfg.model.arch)[cfg.model.weights]  # KeyError if unknown
        assert enum.name == cfg.model.weights
    with open_dict(cfg):
        cfg.model.weights = cfg.model.weights_path = None
        cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes = "cpu", 1, 1
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    trainer = instantiate_trainer(cfg)
    return cfg, datamodule, model, trainer


def without(node: DictConfig, *keys: str) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in keys}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_every_component_from_its_config(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # a download would land here
    cfg, datamodule, model, trainer = build_experiment(name, tmp_path)

    # the objects hold the config's values: nothing between the config and the constructors
    assert isinstance(datamodule, ABIDDataModule)
    assert dict(datamodule.hparams) == without(cfg.data, "_target_", "_convert_")
    assert isinstance(model, BinCountModule)
    assert dict(model.hparams) == without(cfg.model, "_target_", "_convert_", "optimizer", "scheduler")
    assert model.num_classes == cfg.data.max_count - cfg.data.min_count + 1
    assert trainer.max_epochs == cfg.trainer.max_epochs
    configured = [hydra.utils.get_class(c._target_) for c in cfg.callbacks.values() if c is not None]
    for cls in configured:
        assert any(type(cb) is cls for cb in trainer.callbacks), cls
    assert [type(lg) for lg in trainer.loggers] == [
        hydra.utils.get_class(c._target_) for c in cfg.logger.values() if c is not None]
    assert all(Path(lg.save_dir).is_relative_to(tmp_path) for lg in trainer.loggers)
    assert Path(trainer.checkpoint_callback.dirpath) == tmp_path / "run" / "checkpoints"

    # the optimizer and the learning-rate schedule build as configure_optimizers builds them for a run
    monkeypatch.setattr(L.Trainer, "estimated_stepping_batches", property(lambda self: 100))
    model.trainer = trainer
    configured_optimizers = model.configure_optimizers()
    optimizer = configured_optimizers["optimizer"] if isinstance(configured_optimizers, dict) else configured_optimizers
    assert type(optimizer) is hydra.utils.get_class(cfg.model.optimizer._target_)
    assert optimizer.defaults["lr"] == cfg.model.optimizer.lr
    if cfg.model.scheduler is None:
        assert not isinstance(configured_optimizers, dict)
    else:
        scheduler = configured_optimizers["lr_scheduler"]["scheduler"]
        assert type(scheduler) is hydra.utils.get_class(cfg.model.scheduler._target_)
    assert not (tmp_path / "torch").exists()  # nothing was downloaded


@pytest.mark.parametrize(("override", "error", "message"), [
    ("callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAverage", AssertionError, "callbacks.ema._target_"),
    ("model.optimizer._target_=torch.optim.AdamV", AssertionError, "model.optimizer._target_"),
    ("model.weights=IMAGENET1K_V9", KeyError, "IMAGENET1K_V9"),
    ("data.image_size=0", InstantiationException, "image_size"),
])
def test_the_experiment_check_fails_on_a_broken_config(override, error, message, tmp_path):
    with pytest.raises(error, match=message):
        build_experiment("quickstart", tmp_path, override)


def test_resnet50_subset_is_resnet18_subset_with_a_resnet50():
    small = OmegaConf.to_container(compose("train", ["+experiment=resnet18_subset"]))
    large = OmegaConf.to_container(compose("train", ["+experiment=resnet50_subset"]))
    assert (large["model"].pop("arch"), small["model"].pop("arch")) == ("resnet50", "resnet18")
    assert (large["model"].pop("weights"), small["model"].pop("weights")) == ("IMAGENET1K_V2", "IMAGENET1K_V1")
    assert (large["model"]["optimizer"].pop("lr"), small["model"]["optimizer"].pop("lr")) == (1e-4, 1e-3)
    assert large == small


def test_first_line_of_every_experiment_is_its_command():
    # Hydra reads the package header only before the first other line, so the command comes second
    for path in (Path(config_dir()) / "experiment").glob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path
        assert lines[1].startswith(f"# python train.py +experiment={path.stem} "), path
