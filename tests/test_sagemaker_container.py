"""A launcher dry run laid out as a SageMaker training container (tests/sagemaker_container.py),
run with the SDK's own container drivers."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sagemaker_launch import launch
from sagemaker_launch.container import newest_checkpoint
from tests.fakes import FAST, free_port
from tests.fakes import make_fake_abid
from tests.moto_server import aws, moto_server  # noqa: F401  (fixtures)
from tests.sagemaker_container import lay_out_container

QUICKSTART_CPU = ["+experiment=quickstart", "sagemaker=cpu", "sagemaker.inputs.train=s3://b/abid", "--dry-run"]


def read_env_file(path) -> dict[str, str]:
    """The variables an ``export NAME='value'`` file sets, read back by bash itself."""
    out = subprocess.run(["bash", "-c", f"set -a; source {shlex.quote(str(path))}; env -0"], env={},
                         capture_output=True, check=True).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def test_a_dry_run_laid_out_runs_the_sdk_environment_step(aws, tmp_path):
    sub = launch.main(QUICKSTART_CPU)
    assert aws.requests() == []
    abid = tmp_path / "abid"
    abid.mkdir()
    box = lay_out_container(sub, tmp_path / "algo-1", host="algo-1", hosts=["algo-1"], channels={"train": abid},
                            master_port=29512)
    root = box.root
    config = {name: json.loads((root / "input" / "config" / f"{name}.json").read_text())
              for name in ("resourceconfig", "inputdataconfig", "hyperparameters")}
    assert config["hyperparameters"] == sub.request["HyperParameters"]
    assert config["resourceconfig"]["current_host"] == "algo-1"
    assert config["resourceconfig"]["current_instance_type"] == "ml.m5.xlarge"
    assert sorted(config["inputdataconfig"]) == ["code", "sm_drivers", "train"]
    code = root / "input" / "data" / "code"
    [wheel] = code.glob("bincount-*.whl")
    assert (code / "requirements.txt").read_text().splitlines()[-1] == f"./{wheel.name}"
    assert "/opt/ml" not in (root / "input" / "data" / "sm_drivers" / "sm_train.sh").read_text()
    assert all("/opt/ml" not in a for a in box.argv) and box.argv[0] == "/bin/bash"
    assert box.env["SM_CHECKPOINT_DIR"] == str(root / "checkpoints")
    assert box.env["TRAINING_JOB_NAME"] == sub.job_name
    assert box.env["PATH"].split(":")[0] == str(box.image / "bin")

    # the SDK's environment step, as sm_train.sh runs it
    step = subprocess.run(["python3", str(root / "input" / "data" / "sm_drivers" / "scripts" / "environment.py")],
                          env=box.env, capture_output=True, text=True, timeout=60)
    assert step.returncode == 0, step.stdout + step.stderr
    env = read_env_file(root / "input" / "sm_training.env")
    assert env["SM_CHANNEL_TRAIN"] == str(root / "input" / "data" / "train")
    assert env["SM_MODEL_DIR"] == str(root / "model") and env["SM_OUTPUT_DATA_DIR"] == str(root / "output" / "data")
    assert env["SM_INPUT_CONFIG_DIR"] == str(root / "input" / "config")
    assert env["SM_ENTRY_SCRIPT"] == "sagemaker_launch/entry.py"
    assert (env["SM_MASTER_ADDR"], env["SM_MASTER_PORT"]) == ("127.0.0.1", "29512")
    assert json.loads(env["SM_HPS"]) == sub.request["HyperParameters"]
    assert env["SM_HOSTS"] == '["algo-1"]' and env["SM_CURRENT_HOST_RANK"] == "0"

    # the SDK's install step, from the code folder as sm_train.sh runs it: the job's wheel lands in the
    # image, and with it the package the entry script imports, conf/ included
    installer = root / "input" / "data" / "sm_drivers" / "scripts" / "install_requirements.py"
    step = subprocess.run(["python3", str(installer), "requirements.txt"], cwd=code, env=box.env, capture_output=True,
                          text=True, timeout=300)
    assert step.returncode == 0 and "Successfully installed bincount-" in step.stdout, step.stdout[-3000:] + step.stderr
    probe = ("import bincount, sagemaker_launch.entry; from bincount.config import config_dir; "
             "print(bincount.__file__, sagemaker_launch.entry.__file__, config_dir())")
    step = subprocess.run(["python3", "-c", probe], cwd=code, env=box.env, capture_output=True, text=True, timeout=120)
    site = box.image / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert step.stdout.split() == [str(site / "bincount" / "__init__.py"), str(site / "sagemaker_launch" / "entry.py"),
                                   str(site / "bincount" / "conf")], step.stdout + step.stderr


def test_layout_refuses_what_it_cannot_lay_out(aws, tmp_path):
    sub = launch.main(QUICKSTART_CPU)
    with pytest.raises(ValueError, match="channel 'train'"):
        lay_out_container(sub, tmp_path / "a", host="algo-1", hosts=["algo-1"])
    with pytest.raises(ValueError, match="InstanceCount"):
        lay_out_container(sub, tmp_path / "b", host="algo-1", hosts=["algo-1", "algo-2"], channels={"train": tmp_path})
    with pytest.raises(ValueError, match="whitespace"):
        lay_out_container(sub, tmp_path / "c d", host="algo-1", hosts=["algo-1"], channels={"train": tmp_path})


# the container's PID 1 in a PID namespace of its own, which dies with unshare (--kill-child)
NAMESPACE = ["unshare", "--fork", "--pid", "--mount-proc", "--kill-child"]


def namespace_init(unshare: subprocess.Popen, timeout: float = 30) -> int:
    """The pid (in this namespace) of the process ``unshare -f`` forked: PID 1 of its namespace."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    deadline = time.monotonic() + timeout
    while not (pids := children.read_text().split()):
        if unshare.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"unshare forked nothing (exit {unshare.returncode})")
        time.sleep(0.01)
    return int(pids[0])


def quickstart_container(tmp_path: Path, processes: int, *length: str):
    """A small quickstart job on fake photos, laid out; its environment (one thread per process).
    ``length``: overrides in place of ``test=false trainer.max_epochs=3``."""
    data = tmp_path / "abid"
    make_fake_abid(data, n=60, bad=False)  # ~36 training photos: 9 steps per epoch at batch 4 on one process
    sub = launch.main(["+experiment=quickstart", "sagemaker=cpu", "sagemaker.inputs.train=s3://b/abid",
                       f"sagemaker.processes_per_instance={processes}",
                       *(o for o in FAST if not o.startswith(("data.batch_size", "data.num_workers"))),
                       "data.batch_size=4", "data.num_workers=1", "callbacks.rich_model_summary=null",
                       *(length or ("test=false", "trainer.max_epochs=3")), "--dry-run"])
    box = lay_out_container(sub, tmp_path / "algo-1", host="algo-1", hosts=["algo-1"], channels={"train": data})
    # one instance: the SDK's torchrun driver passes no --master-port, so torchrun reads PET_MASTER_PORT
    return sub, box, {**box.env, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(free_port())}


def stop_container(argv: list[str], env: dict[str, str], when: str) -> tuple[str, int, float]:
    """Run ``argv`` as PID 1 of a PID namespace, SIGTERM that PID 1 from outside once a line holds
    ``when`` (as SageMaker stops a job), and wait up to SageMaker's 120 s grace period.

    Returns:
        The output, the exit status, and the seconds from SIGTERM to exit.
    """
    container = subprocess.Popen(NAMESPACE + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    try:
        pid1 = namespace_init(container)
        lines = []
        for line in container.stdout:
            lines.append(line)
            if when in line:
                os.kill(pid1, signal.SIGTERM)
                signalled = time.monotonic()
                break
        lines.append(container.communicate(timeout=120)[0])
        return "".join(lines), container.returncode, time.monotonic() - signalled
    finally:
        if container.poll() is None:
            container.kill()  # --kill-child: the namespace goes with it


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (PID namespace)")
def test_sigterm_to_pid_1_reaches_training(aws, tmp_path):
    """The SDK's basic-script driver starts entry.py; container_init passes it the SIGTERM (a rerun
    resumes: the torchrun test below)."""
    sub, box, env = quickstart_container(tmp_path, 1)
    # epoch 0 done (last.ckpt written at its end): stop during epoch 1
    first, status, took = stop_container(box.argv, env, "[bincount] validation epoch=0 ")
    assert status != 0, first[-3000:]
    assert "Successfully installed bincount-" in first  # the job's wheel, into the image (sm_train.sh's pip)
    # the signal reached Lightning, and its log lines still reached the container's output
    assert "container_init: SIGTERM -> training process" in first, first[-3000:]
    assert "SIGTERM received: every rank stops" in first, first[-3000:]
    stopped = re.search(r"training stopped by SIGTERM at epoch (\d+), step (\d+)", first)
    assert stopped and took < 120, (took, first[-3000:])
    step = int(stopped.group(2))
    saved = newest_checkpoint(box.root / "checkpoints" / sub.job_name)
    assert torch.load(saved, map_location="cpu", weights_only=False)["global_step"] == step > 0
    # the job's FailureReason: the stop, not the driver's CalledProcessError traceback; no model.tar.gz content
    reason = (box.root / "output" / "failure").read_text()
    assert reason.startswith(f"training stopped by SIGTERM at epoch {stopped.group(1)}, step {step}; last.ckpt saved"), reason
    assert "Traceback" not in reason and "a restarted spot job resumes" in reason, reason
    assert not any((box.root / "model").iterdir())


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (PID namespace)")
def test_sigterm_to_pid_1_stops_both_torchrun_workers_at_one_step_and_a_rerun_resumes(aws, tmp_path):
    """With torchrun, container_init signals torchrun's workers themselves (each in a session of its
    own, outside its process group; torchrun would killpg them, DataLoader workers included), and
    waits for torchrun to see them stop. Signalled as epoch 0 ends, the moment where ranks that
    stop on their own wait in different collectives: StopOnSigterm makes them agree on one step."""
    sub, box, env = quickstart_container(tmp_path, 2)
    out, status, took = stop_container(box.argv, env, "[bincount] validation epoch=0 ")
    assert status != 0 and took < 120, (status, took, out[-3000:])
    assert re.search(r"container_init: SIGTERM -> training process\(es\) \d+ \d+\n", out), out[-3000:]
    stops = re.findall(r"\[rank: (\d)\] SIGTERM received: every rank stops after step (\d+)", out)
    assert sorted(rank for rank, _ in stops) == ["0", "1"] and len({step for _, step in stops}) == 1, out[-3000:]
    stopped = re.search(r"training stopped by SIGTERM at epoch (\d+), step (\d+)", out)
    assert stopped and stopped.group(2) == stops[0][1], out[-3000:]
    saved = newest_checkpoint(box.root / "checkpoints" / sub.job_name)
    assert torch.load(saved, map_location="cpu", weights_only=False)["global_step"] == int(stopped.group(2)) > 0

    rerun = subprocess.run(NAMESPACE + box.argv, env=env, capture_output=True, text=True, timeout=600)
    second = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, second[-3000:]
    assert f"[bincount] train start epoch={stopped.group(1)} global_step={stopped.group(2)}" in second, second[-3000:]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (PID namespace)")
def test_sigterm_to_pid_1_after_training_leaves_no_model_and_a_rerun_exports(aws, tmp_path):
    """Two torchrun workers, stopped once the test is done (rank 0 calibrating and exporting): the
    job fails with the stop as its reason and an empty model.tar.gz; a rerun tests and exports."""
    sub, box, env = quickstart_container(tmp_path, 2, "trainer.max_epochs=1")
    out, status, took = stop_container(box.argv, env, "[bincount] test ")
    assert status != 0 and took < 120, (status, took, out[-3000:])
    assert "stopped by SIGTERM after training" in out, out[-3000:]
    assert (box.root / "output" / "failure").read_text().startswith("stopped by SIGTERM after training"), out[-3000:]
    assert not any((box.root / "model").iterdir())

    rerun = subprocess.run(NAMESPACE + box.argv, env=env, capture_output=True, text=True, timeout=600)
    second = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, second[-3000:]
    assert sorted(p.name for p in (box.root / "model").iterdir()) == ["code", "model.onnx", "model.pt", "model_config.json"]
