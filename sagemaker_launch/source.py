"""The code a SageMaker job runs (its ``code`` channel, ModelTrainer's ``SourceCode.source_dir``):
bincount's wheel, built from this source tree or repacked from the installed package, so the job
runs the code the launcher runs; a ``requirements.txt`` that pip-installs it (torch and torchvision
come with the AWS PyTorch training image); and the two scripts SageMaker starts by path before
anything is installed, ``sagemaker_launch/entry.py`` and ``sagemaker_launch/container_init.sh``,
copied out of the wheel.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "bincount"
# a source checkout: this package sits beside pyproject.toml and src/bincount
REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPT = "sagemaker_launch/entry.py"
CONTAINER_INIT_SCRIPT = "sagemaker_launch/container_init.sh"
# what an installer adds to a distribution's .dist-info (PEP 376, PEP 610); the wheel never had them
INSTALLER_FILES = ("INSTALLER", "REQUESTED", "RECORD", "direct_url.json")


class WheelBuildError(Exception):
    """bincount's wheel could not be built or repacked; the message says why."""


def unpack_installed(dst: Path) -> Path:
    """Copy the installed bincount's files into ``dst`` as its wheel unpacked (``wheel unpack``'s layout).

    What the installer made rather than took from the wheel is left out: console scripts (outside
    site-packages), bytecode, and :data:`INSTALLER_FILES` (``wheel pack`` writes a new RECORD).

    Returns:
        ``dst``.

    Raises:
        WheelBuildError: bincount is not installed, has no RECORD, or its files lack
            :data:`ENTRY_SCRIPT` (an installation of another version, or a damaged one).
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise WheelBuildError(f"{DISTRIBUTION} is not installed and {REPO} is not its source tree: "
                              "nothing to build the job's code from") from err
    if dist.files is None:
        raise WheelBuildError(f"the installed {DISTRIBUTION} has no RECORD: cannot repack it for the job")
    for file in dist.files:
        if file.parts[0] == ".." or "__pycache__" in file.parts or file.suffix == ".pyc":
            continue
        if file.parent.name.endswith(".dist-info") and file.name in INSTALLER_FILES:
            continue
        target = dst / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(dist.locate_file(file)), target)
    if not (dst / ENTRY_SCRIPT).is_file():
        raise WheelBuildError(f"the installed {DISTRIBUTION} ({dist.locate_file('')}) has no {ENTRY_SCRIPT}: "
                              "reinstall it with the sagemaker extra")
    return dst


def build_wheel(dst: Path) -> Path:
    """Write bincount's wheel into ``dst``: built from the source checkout this module runs from, if it
    is one, else repacked from the installation.

    Returns:
        The wheel's path.

    Raises:
        WheelBuildError: ``pip wheel`` or ``wheel pack`` failed (pip's ``ERROR`` lines, or the last
            line, are in the message; building needs the build backend, which pip fetches from the
            package index), or did not write one bincount wheel.
    """
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bincount-unpacked-") as unpacked:
        if (REPO / "pyproject.toml").is_file() and (REPO / "src" / DISTRIBUTION / "__init__.py").is_file():
            what = f"pip wheel {REPO}"
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dst), str(REPO)]
        else:
            what = f"wheel pack (the installed {DISTRIBUTION})"
            cmd = [sys.executable, "-m", "wheel", "pack", "--dest-dir", str(dst), str(unpack_installed(Path(unpacked)))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        # pip's own ERROR lines, the build backend's installation included; else the last line
        errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
        raise WheelBuildError(f"building {DISTRIBUTION}'s wheel for the job failed ({what}, exit {proc.returncode}): "
                              + ("; ".join(errors) or (lines[-1] if lines else "no output")))
    wheels = sorted(dst.glob(f"{DISTRIBUTION}-*.whl"))
    if len(wheels) != 1:
        raise WheelBuildError(f"{what} wrote {[w.name for w in wheels]} into {dst}, not one {DISTRIBUTION} wheel")
    return wheels[0]


def stage_source(dst: Path, extras: tuple[str, ...] = ()) -> Path:
    """Write a job's code channel into ``dst`` (see the module docstring); ``requirements.txt``
    installs the wheel with ``extras`` (:func:`sagemaker_launch.plan.install_extras`), by a path relative
    to the channel's folder, where both installers run pip: ``./bincount-0.1.0-py3-none-any.whl[track]``.

    Returns:
        ``dst``.

    Raises:
        WheelBuildError: See :func:`build_wheel`.
    """
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bincount-wheel-") as tmp:
        built = build_wheel(Path(tmp))
        wheel = dst / built.name
        shutil.move(built, wheel)
    with zipfile.ZipFile(wheel) as archive:
        for name in (ENTRY_SCRIPT, CONTAINER_INIT_SCRIPT):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes(archive.read(name))
    line = f"./{wheel.name}" + (f"[{','.join(extras)}]" if extras else "")
    (dst / "requirements.txt").write_text(f"# {DISTRIBUTION} and its dependencies (torch and torchvision come with "
                                          f"the image)\n{line}\n")
    return dst
