"""bincount's wheel, installed with the sagemaker extra into a fresh venv, runs the SageMaker commands
from a folder that is not the checkout, and ships itself as the job's code."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sagemaker_launch.source import ENTRY_SCRIPT, stage_source
from tests.sagemaker_container import fresh_venv

REPO = Path(__file__).resolve().parents[1]
JOB = ["+experiment=quickstart", "sagemaker=cpu", "sagemaker.inputs.train=s3://bincount-test/abid"]


def wheel_contents(path: Path) -> dict[str, bytes]:
    """A wheel's files and their bytes, but its RECORD (which lists the others' hashes)."""
    with zipfile.ZipFile(path) as archive:
        return {n: archive.read(n) for n in archive.namelist() if not n.endswith(".dist-info/RECORD")}


@pytest.mark.slow
@pytest.mark.integration
def test_the_installed_wheel_runs_the_sagemaker_commands_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("bincount-*.whl")
    venv = fresh_venv(tmp_path / "venv")
    python, elsewhere = str(venv / "bin" / "python3"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    # no AWS at all: a dry run needs none
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_", "PYTHON"))}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env['PATH']}")

    def run(*argv: str, status: int = 0) -> str:
        proc = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == status, f"{argv}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    # offline: the extra's dependencies are this venv's, seen by the fresh one
    installed = run(python, "-m", "pip", "install", "--no-index", f"{wheel}[sagemaker]")
    assert "Successfully installed bincount-" in installed
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    where = run(python, "-c", "import bincount, sagemaker_launch; from bincount.config import config_dir; "
                              "print(bincount.__file__, sagemaker_launch.__file__, config_dir())").split()
    assert where == [str(site / "bincount" / "__init__.py"), str(site / "sagemaker_launch" / "__init__.py"),
                     str(site / "bincount" / "conf")]

    out = run(python, "-m", "sagemaker_launch.launch", *JOB, "--dry-run")
    assert "DRY RUN: CreateTrainingJob" in out and "/input/code/" in out
    out = run(python, "-m", "sagemaker_launch.tune", *JOB, "hparams_search=lr_optuna", "--dry-run")
    assert "DRY RUN: CreateHyperParameterTuningJob" in out
    assert "ml.g5.xlarge" in run(python, "-m", "sagemaker_launch.cost", "sagemaker=gpu_multi")
    assert "error: the model needs an execution role" in run(python, "-m", "sagemaker_launch.deploy", "job=x",
                                                             "endpoint=bincount-prod", status=2)
    # the Hydra launcher plugin, found by Hydra in the installed package
    out = run(str(venv / "bin" / "bincount-train"), "-m", "hydra/launcher=sagemaker", *JOB, "sagemaker.dry_run=true",
              "data.batch_size=16,32", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.count("DRY RUN: CreateTrainingJob") == 2

    # without a source tree, the job's code is the installed package repacked: the wheel it was installed from
    run(python, "-c", f"from pathlib import Path; from sagemaker_launch.source import stage_source; "
                      f"stage_source(Path({str(tmp_path / 'code')!r}))")
    assert (tmp_path / "code" / wheel.name).is_file()
    assert wheel_contents(tmp_path / "code" / wheel.name) == wheel_contents(wheel)
    assert (tmp_path / "code" / "requirements.txt").read_text().splitlines()[-1] == f"./{wheel.name}"


@pytest.mark.integration
def test_the_training_toolkit_installs_the_jobs_wheel(tmp_path):
    """A tuning trial's start: the PyTorch image's training toolkit installs the code channel
    (``entry_point.install``: pip from the channel's folder) before it runs the entry script."""
    code = stage_source(tmp_path / "code")
    image = fresh_venv(tmp_path / "image")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["SAGEMAKER_BASE_DIR"] = str(tmp_path / "opt_ml")
    install = ("import sys; from sagemaker_training import entry_point; "
               "entry_point.install(sys.argv[1], sys.argv[2], capture_error=True)")
    proc = subprocess.run([str(image / "bin" / "python3"), "-c", install, ENTRY_SCRIPT, str(code)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([str(image / "bin" / "python3"), "-c", "import bincount; print(bincount.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    site = image / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert proc.stdout.strip() == str(site / "bincount" / "__init__.py"), proc.stderr[-3000:]


@pytest.mark.slow
def test_a_wheel_that_cannot_be_built_stops_the_launch_with_one_error_line(tmp_path):
    """No package index (offline): pip cannot install the build backend, and the launch says so."""
    links = tmp_path / "no-packages"
    links.mkdir()
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}
    run = subprocess.run([sys.executable, "-m", "sagemaker_launch.launch", *JOB, "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: building bincount's wheel for the job failed (pip wheel {REPO}, exit 1): ")
    assert "hatchling" in last and "DRY RUN" not in run.stdout
