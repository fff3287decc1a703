"""DDP training jobs run by SageMaker's own container drivers (the SDK's ``sm_train.sh`` ->
``environment.py`` -> torchrun driver -> our entry), laid out from a launcher dry run
(tests/sagemaker_container.py): one instance with two processes, and two instances that share
no disk, as on SageMaker."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import hydra
import pytest

from bincount.config import compose
from sagemaker_launch import launch
from tests.fakes import FAST, free_port
from tests.moto_server import aws, moto_server  # noqa: F401  (fixtures)
from tests.sagemaker_container import lay_out_container

JOB = [*FAST, "callbacks.rich_model_summary=null", "trainer.max_epochs=2", "sagemaker=cpu",
       "sagemaker.inputs.train=s3://bincount-test/abid", "--dry-run"]


def start(box, *, hide: list[Path] = ()) -> subprocess.Popen:
    """Start a laid-out container in namespaces of its own (root only): a PID namespace, as a
    container has (killing the ``unshare`` process kills every process of the container), and a
    mount namespace in which the ``hide`` folders are covered by an empty tmpfs, so it cannot read
    another instance's disk."""
    mounts = "".join(f'mount -t tmpfs none "{p}" && ' for p in hide)
    argv = ["unshare", "--mount", "--fork", "--pid", "--mount-proc", "--kill-child",
            "sh", "-c", f'{mounts}exec "$@"', "sh", *box.argv]
    return subprocess.Popen(argv, env={**box.env, "OMP_NUM_THREADS": "1"}, cwd=box.root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Every container's log once all have exited; when one fails, the others (which would wait
    for it in a collective until their own timeout) are stopped 30 s later."""
    logs: list[str] = [""] * len(procs)
    readers = [threading.Thread(target=lambda i=i: logs.__setitem__(i, procs[i].communicate()[0]))
               for i in range(len(procs))]
    for reader in readers:
        reader.start()
    deadline, failed_at = time.monotonic() + timeout, None
    while any(r.is_alive() for r in readers) and time.monotonic() < deadline:
        next(r for r in readers if r.is_alive()).join(timeout=1)
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 30:
            break
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for reader in readers:
        reader.join()
    return logs


def val_photos(root: Path) -> int:
    cfg = compose("train", [f"data.root={root}", *FAST])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    return len(datamodule.splits["val"])


def assert_one_model(roots: list[Path], logs: list[str], fake_root: Path) -> None:
    """Exactly one exported model (on the first instance), tested and calibrated on whole splits."""
    exported = [r for r in roots if (r / "model" / "model.pt").is_file()]
    assert exported == roots[:1], [sorted(p.name for p in (r / "model").iterdir()) for r in roots]
    model = roots[0] / "model"
    assert sorted(p.name for p in model.iterdir()) == ["code", "model.onnx", "model.pt", "model_config.json"]
    config = json.loads((model / "model_config.json").read_text())
    assert config["calibration"]["n"] == val_photos(fake_root)  # the whole validation split, not one rank's share
    report = json.loads((roots[0] / "output" / "data" / "metrics.json").read_text())
    trained = json.loads((roots[0] / "output" / "data" / "train_metrics.json").read_text())
    assert report["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert sum(log.count("model exported to") for log in logs) == 1


@pytest.mark.slow
@pytest.mark.integration
def test_two_instances_that_share_no_disk(aws, tmp_path, fake_abid):
    root, _ = fake_abid
    sub = launch.main([*JOB, "sagemaker.instance_count=2"])
    hosts, port = ["algo-1", "algo-2"], free_port()
    boxes = [lay_out_container(sub, tmp_path / host, host=host, hosts=hosts, channels={"train": root},
                               master_port=port) for host in hosts]
    # each instance's disk is invisible to the other, as on SageMaker (only rank 0 writes checkpoints)
    procs = [start(box, hide=[other.root for other in boxes if other is not box]) for box in boxes]
    logs = finish(procs)
    every_log = "\n\n".join(f"{host} (exit {proc.returncode}):\n{log[-4000:]}"
                            for host, proc, log in zip(hosts, procs, logs))
    for host, proc, log in zip(hosts, procs, logs):
        assert proc.returncode == 0, every_log  # the instance that failed first may be the other one
        assert "Successfully installed bincount-" in log  # each instance installs the job's wheel
    assert "--nnodes=2" in logs[1] and "--node_rank=1" in logs[1]
    assert "world_size=2 (2 instance(s) x 1)" in logs[0]
    # every rank ends with the same metrics: torchmetrics synced them across the instances
    finals = [dict(kv.split("=") for kv in re.search(rf"\[bincount\] rank {rank}/2 world_size=2 (.*)", log).group(1).split())
              for rank, log in enumerate(logs)]
    for key in ("val/acc", "val/acc_best", "val/mae", "test/acc", "test/mae", "test/rmse"):
        assert finals[0][key] == finals[1][key], key
    assert not list((boxes[1].root / "checkpoints").rglob("*.ckpt"))  # the second instance never had the file
    assert_one_model([b.root for b in boxes], logs, root)
