"""The container side of a SageMaker training job (sagemaker_launch/entry.py), run for real in a
temporary /opt/ml layout: hyperparameters -> overrides, folders, export (DDP and spot resume through
SageMaker's own drivers: test_sagemaker_container.py, test_sagemaker_distributed.py)."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

import sagemaker_launch.model_archive
from bincount.config import compose
from bincount.train import StoppedRun
from sagemaker_launch import entry
from sagemaker_launch.container import ContainerEnv, newest_checkpoint
from sagemaker_launch.entry import container_overrides, distributed_overrides
from sagemaker_launch.hyperparameters import decode_hyperparameters, encode_overrides, parse_argv, read_hyperparameters
from tests.fakes import FAST

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "sagemaker_launch" / "entry.py"
# FAST (tests/conftest.py) as the job's hyperparameters
FAST_HPS = encode_overrides([*FAST, "callbacks.rich_model_summary=null"])


def opt_ml(root: Path, data: Path, job: str = "bincount-test-job") -> dict[str, str]:
    """The SM_* environment of a job whose /opt/ml is ``root`` and whose train channel is ``data``."""
    return {"SM_MODEL_DIR": str(root / "model"), "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
            "SM_CHECKPOINT_DIR": str(root / "checkpoints"), "SM_CHANNEL_TRAIN": str(data),
            "SM_INPUT_DIR": str(root / "input"), "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
            "TRAINING_JOB_NAME": job}


def as_argv(hyperparameters: dict[str, str]) -> list[str]:
    return [x for name, value in hyperparameters.items() for x in (f"--{name}", value)]


def test_overrides_survive_the_hyperparameter_round_trip():
    overrides = ["+experiment=quickstart", "model.optimizer.lr=0.001", "model.optimizer._target_=torch.optim.SGD",
                 "++trainer.profiler=simple", "~callbacks.lr_monitor", "data=abid_stream", "trainer.max_epochs=-1",
                 "data.train_transform.hflip_prob=0.0"]
    hps = encode_overrides(overrides)
    # one value, the overrides in order (tests/test_sagemaker_hyperparameters.py: why)
    assert hps == {"overrides": " ".join(overrides)}
    assert decode_hyperparameters(hps) == overrides
    # plain values (tuned ones; JSON values in SM_HPS), plus keys the SDK, toolkit and tuner add
    assert decode_hyperparameters({"trainer__max_epochs": 20, "test": False, "data__label_list": None,
                                   "sagemaker_program": "x.py", "mp_parameters": "{}",
                                   "_tuning_objective_metric": "val/acc_best"}) == \
        ["data.label_list=null", "test=false", "trainer.max_epochs=20"]


def test_hyperparameters_from_argv_env_or_file(tmp_path):
    assert parse_argv(["--a__b", "1", "--c", "-x"]) == {"a__b": "1", "c": "-x"}
    with pytest.raises(ValueError, match="pairs"):
        parse_argv(["--a", "1", "stray"])
    assert read_hyperparameters({"SM_HPS": '{"a__b": 0.5}'}) == {"a__b": 0.5}
    (tmp_path / "hyperparameters.json").write_text('{"trainer__max_epochs": "2"}')
    assert read_hyperparameters({"SM_INPUT_CONFIG_DIR": str(tmp_path)}) == {"trainer__max_epochs": "2"}
    assert read_hyperparameters({"SM_INPUT_CONFIG_DIR": str(tmp_path / "none")}) == {}


def test_container_overrides_put_the_run_into_the_sagemaker_folders(tmp_path):
    env = ContainerEnv.from_environ(opt_ml(tmp_path, tmp_path / "train", job="job-1"))
    assert env.checkpoint_dir == tmp_path / "checkpoints" / "job-1" and env.world_size == 1
    out = container_overrides(env, ["trainer.max_epochs=2"], {"root", "batch_size"})
    assert out == ["callbacks=sagemaker", f"paths.output_dir={tmp_path / 'output' / 'data'}",
                   "++trainer.enable_progress_bar=false",
                   f"callbacks.model_checkpoint.dirpath={tmp_path / 'checkpoints' / 'job-1'}",
                   f"data.root={tmp_path / 'train'}"]
    # a streaming data config: no root, its cache out of the output archive
    stream = container_overrides(env, ["data=abid_stream"], {"uri", "cache_dir"})
    assert f"data.cache_dir={tmp_path / 'input' / 'scratch' / 'stream_cache'}" in stream
    assert not any(o.startswith("data.root") for o in stream)
    # the user's own choices win
    mine = container_overrides(env, ["callbacks=default", "data.root=/x", "ckpt_path=/y.ckpt"], {"root"})
    assert "callbacks=sagemaker" not in mine and not any(o.startswith(("data.root", "ckpt_path")) for o in mine)
    # everything composes with the real config
    cfg = compose("train", ["trainer.max_epochs=2", *out])
    assert cfg.callbacks.last_checkpoint.save_on_exception and cfg.callbacks.metric_lines
    assert cfg.callbacks.last_checkpoint.dirpath == str(env.checkpoint_dir) and cfg.callbacks.rich_progress_bar is None


def test_resume_picks_the_checkpoint_with_the_highest_step(tmp_path):
    ckpts = tmp_path / "ckpt"
    assert newest_checkpoint(ckpts) is None
    ckpts.mkdir()
    for name, step in (("latest.ckpt", 40), ("epoch_001.ckpt", 20), ("last.ckpt", 47)):
        torch.save({"global_step": step}, ckpts / name)
        time.sleep(0.01)
    os.utime(ckpts / "epoch_001.ckpt")  # newest file time (as after a download from S3), lower step
    (ckpts / "periodic.ckpt").write_bytes(b"cut short by SIGKILL")
    assert newest_checkpoint(ckpts) == ckpts / "last.ckpt"
    env = ContainerEnv.from_environ({"SM_CHECKPOINT_DIR": str(tmp_path), "TRAINING_JOB_NAME": "ckpt"})
    assert f"ckpt_path={ckpts / 'last.ckpt'}" in container_overrides(env, [], {"root"})


def test_torchrun_world_sets_devices_and_nodes():
    env = ContainerEnv.from_environ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5"})
    assert distributed_overrides(env, []) == ["trainer.devices=4", "trainer.num_nodes=2", "trainer.strategy=ddp"]
    assert distributed_overrides(env, ["trainer.strategy=ddp_find_unused_parameters_true"])[-1] == "trainer.num_nodes=2"
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed_overrides(env, ["trainer.num_nodes=1"])  # 4 processes x 1 node != 8
    with pytest.raises(ValueError, match="WORLD_SIZE"):  # a multi-node trainer without torchrun would hang
        distributed_overrides(ContainerEnv.from_environ({}), ["trainer.num_nodes=2"])
    assert distributed_overrides(ContainerEnv.from_environ({}), ["trainer.devices=1"]) == []


@pytest.mark.integration
def test_single_process_job_trains_and_exports(tmp_path, fake_abid, monkeypatch):
    root, made = fake_abid
    for key, value in opt_ml(tmp_path, root).items():
        monkeypatch.setenv(key, value)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "SM_HPS"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "input" / "config").mkdir(parents=True)
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({**FAST_HPS, "trainer__max_epochs": "1", "sagemaker_program": "sagemaker_launch/entry.py"}))

    metrics = entry.main([])  # no arguments: the hyperparameters file, as a plain container would

    assert {"val/acc", "val/acc_best", "test/acc"} <= metrics.keys()
    model, out = tmp_path / "model", tmp_path / "output" / "data"
    assert sorted(p.name for p in model.iterdir()) == ["code", "model.onnx", "model.pt", "model_config.json"]
    assert (model / "code" / "inference.py").read_text().count("from bincount.serve.inference import") == 1
    assert (model / "code" / "bincount" / "models" / "export.py").is_file()
    assert not (model / "code" / "bincount" / "conf").exists()
    reqs = (model / "code" / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("pillow") for r in reqs) and not any(re.match(r"torch(vision)?\W", r) for r in reqs)
    for name in ("metrics.json", "predictions.csv", "config.yaml", "train_metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "train_metrics.json").read_text())["test/acc"] == pytest.approx(metrics["test/acc"])
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints" / "bincount-test-job").iterdir())
    assert "last.ckpt" in ckpts and not (out / "checkpoints").exists()
    config = json.loads((model / "model_config.json").read_text())
    assert config["arch"] == "resnet18" and config["num_classes"] == 5


def test_a_run_folder_without_model_onnx_is_refused_and_nothing_is_copied(tmp_path):
    run_model = tmp_path / "run" / "model"
    run_model.mkdir(parents=True)
    (run_model / "model_config.json").write_text("{}")
    (run_model / "model.pt").write_bytes(b"weights")
    env = ContainerEnv.from_environ({"SM_MODEL_DIR": str(tmp_path / "opt_ml_model")})
    with pytest.raises(FileNotFoundError, match=r"model\.onnx not found: did training export the model\?"):
        entry.export_or_stop(env, run_model)  # deploy, register and transform would refuse its model.tar.gz
    assert not env.model_dir.exists() or list(env.model_dir.iterdir()) == []


def test_a_stop_while_copying_the_model_leaves_the_model_dir_empty(tmp_path, monkeypatch):
    run_model = tmp_path / "run" / "model"
    run_model.mkdir(parents=True)
    for name in ("model.pt", "model.onnx", "model_config.json"):
        (run_model / name).write_bytes(b"{}")
    env = ContainerEnv.from_environ({"SM_MODEL_DIR": str(tmp_path / "opt_ml_model")})

    def requirements_after_sigterm() -> str:  # called once model.pt and code/bincount are copied
        os.kill(os.getpid(), signal.SIGTERM)
        return "pillow\n"

    monkeypatch.setattr(sagemaker_launch.model_archive, "serving_requirements", requirements_after_sigterm)
    with pytest.raises(StoppedRun) as stopped:
        entry.export_or_stop(env, run_model)
    assert stopped.value.code == 128 + signal.SIGTERM and "model.tar.gz is empty" in stopped.value.message
    assert list(env.model_dir.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
