"""A launcher dry run turned into a SageMaker training container that runs on this machine.

:func:`lay_out_container` writes what SageMaker puts into a training container's ``/opt/ml``
before it starts the entrypoint, from the CreateTrainingJob request and the files the dry run would
have uploaded (:attr:`sagemaker_launch.launch.Submission.files`), under a folder of the test's
choice. The SDK's own container drivers (``sm_drivers/``: the generated ``sm_train.sh``,
``environment.py``, the torchrun and basic-script drivers) then run for real::

    sub = launch.main([..., "--dry-run"])
    box = lay_out_container(sub, tmp_path / "algo-1", host="algo-1", hosts=["algo-1"],
                            channels={"train": abid_folder})
    subprocess.run(box.argv, env={**box.env, "OMP_NUM_THREADS": "1"}, cwd=box.root)

What had to be redirected, and why (everything else is the request and the uploads, verbatim):

- the literal ``/opt/ml`` -> ``root``, in the SDK's uploaded drivers (``sm_drivers/``: their paths
  are module constants and literal lines of ``sm_train.sh``), in the entrypoint's arguments, and in
  the request's ``Environment`` and ``HyperParameters`` values (``SM_CHECKPOINT_DIR``): this
  machine has no writable ``/opt/ml`` of its own, and two "instances" of one test need two;
  our code (the ``code`` channel) reads only the ``SM_*`` variables the drivers export, so it
  stays as uploaded;
- the master address: ``environment.py`` hard-codes ``SM_MASTER_ADDR = "algo-1"``, a host name
  only SageMaker's network resolves; it becomes ``127.0.0.1`` (not an ``/etc/hosts`` entry: that
  would change the machine for every other process). ``master_port`` replaces its fixed 7777,
  so concurrent tests don't collide;
- the AWS PyTorch image is :func:`fresh_venv`, a new venv beside ``root`` that sees this venv's
  installed packages (torch, Lightning, Hydra...) but neither the checkout nor its editable
  ``bincount``; ``PATH`` starts with its ``bin/`` (``python3``, ``pip3``, ``torchrun``), where the
  image keeps its own. The code channel's ``requirements.txt`` is left as uploaded, so
  ``sm_train.sh`` pip-installs the job's wheel into that venv, and the job runs the installed code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import site
import sys
import venv
from pathlib import Path
from typing import Any, NamedTuple

OPT_ML = "/opt/ml"
SDK_CHANNELS = ("code", "sm_drivers")
# what ResourceConfig looks like on an instance of a single-group (homogeneous) cluster
GROUP = "homogeneousCluster"
# the image's commands that the SDK's scripts call besides python3
IMAGE_SCRIPTS = ("pip3", "torchrun")


class Container(NamedTuple):
    """A laid-out container, ready to start.

    Attributes:
        argv: The request's ``ContainerEntrypoint`` + ``ContainerArguments``, ``/opt/ml`` redirected.
        env: The container's environment: ``PATH`` (the image's ``bin/`` first), ``HOME``, ``LANG``,
            ``TRAINING_JOB_NAME`` and the request's ``Environment``. Nothing of the caller's
            environment leaks in; add what a test needs (``OMP_NUM_THREADS``...).
        root: The folder standing in for ``/opt/ml``.
        image: The venv standing in for the image's Python (:func:`fresh_venv`).
    """

    argv: list[str]
    env: dict[str, str]
    root: Path
    image: Path


def fresh_venv(folder: Path) -> Path:
    """A new venv in ``folder`` that has this venv's installed packages, and nothing of the checkout:
    the AWS image's Python here, and a user's fresh venv in tests/test_sagemaker_wheel.py.

    It sees this venv's ``site-packages`` through a ``.pth`` line (no copy, no download), which does
    not read the ``.pth`` files there: the editable ``bincount`` (a path to the checkout) stays
    out, so ``bincount`` is importable only once a wheel is installed into ``folder``, where pip
    puts it (pip leaves the editable install alone: it is outside this environment). ``pip3`` and
    ``torchrun`` are written as pip writes console scripts, running ``folder``'s interpreter.

    Returns:
        ``folder``.
    """
    venv.EnvBuilder(symlinks=True, with_pip=False).create(folder)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own = folder / "lib" / version / "site-packages"
    (own / "test_venv_packages.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    for name in IMAGE_SCRIPTS:
        [entry] = importlib.metadata.entry_points(group="console_scripts", name=name)
        script = folder / "bin" / name
        script.write_text(f"#!{folder / 'bin' / 'python3'}\nimport sys\nfrom {entry.module} import {entry.attr}\n"
                          f"sys.exit({entry.attr}())\n")
        script.chmod(0o755)
    return folder


def _channel_files(files: dict[str, bytes], uri: str) -> dict[str, bytes]:
    prefix = uri.rstrip("/") + "/"
    return {key[len(prefix):]: data for key, data in files.items() if key.startswith(prefix)}


def _rewrite(text: str, root: Path) -> str:
    return text.replace(OPT_ML, str(root))


def _replace_once(text: str, old: str, new: str, where: str) -> str:
    if old not in text:
        raise ValueError(f"{where}: expected {old!r} (has the SDK's driver changed?)")
    return text.replace(old, new)


def lay_out_container(submission: Any, root: Path, *, host: str, hosts: list[str],
                      channels: dict[str, Path] | None = None, master_port: int = 7777) -> Container:
    """Write the ``/opt/ml`` of one instance of a dry-run training job under ``root``.

    Layout (as SageMaker writes it before starting the container): ``input/config/``
    ``{resourceconfig,inputdataconfig,hyperparameters}.json``, ``input/data/<channel>/`` for
    every channel of the request (``code`` and ``sm_drivers`` from the uploads, the others
    from ``channels``, symlinked), ``model/``, ``output/data/``, ``checkpoints/``; and the
    image's Python, ``<root>-image`` (:func:`fresh_venv`).

    Args:
        submission: A dry run's :class:`sagemaker_launch.launch.Submission` (``request``, ``files``).
        root: The folder standing in for ``/opt/ml`` (created; no whitespace: ``sm_train.sh``
            uses the paths unquoted).
        host: This instance's name, one of ``hosts`` (SageMaker's are ``algo-1``, ``algo-2``...;
            the first sorted one is the torchrun master).
        hosts: Every instance's name; as many as the request's ``InstanceCount``.
        channels: Local folders for the request's non-uploaded channels (``train`` ...), by name.
        master_port: The torchrun master's port (SageMaker's drivers fix 7777).

    Returns:
        The container's ``argv`` and ``env``, ``root`` and the image.

    Raises:
        ValueError: Not a dry run, ``host`` not in ``hosts``, ``hosts`` not ``InstanceCount``
            long, whitespace in ``root``, a channel neither uploaded nor in ``channels``, or an
            SDK driver without the line this module redirects.
    """
    channels = dict(channels or {})
    request, files = submission.request, getattr(submission, "files", {})
    if not files:
        raise ValueError("submission has no uploaded files: lay out a dry run (--dry-run) of this launcher")
    count = request["ResourceConfig"]["InstanceCount"]
    if host not in hosts or len(hosts) != count:
        raise ValueError(f"host={host!r}, hosts={hosts}: host must be one of hosts, and hosts {count} long "
                         "(the request's InstanceCount)")
    root = Path(root).resolve()
    if any(c.isspace() for c in str(root)):
        raise ValueError(f"root={root}: no whitespace allowed (sm_train.sh uses /opt/ml paths unquoted)")
    config, data = root / "input" / "config", root / "input" / "data"
    for folder in (config, data, root / "model", root / "output" / "data", root / "checkpoints"):
        folder.mkdir(parents=True, exist_ok=True)

    instance_type = request["ResourceConfig"]["InstanceType"]
    resource = {"current_host": host, "current_instance_type": instance_type, "current_group_name": GROUP,
                "hosts": sorted(hosts), "network_interface_name": "eth0",
                "instance_groups": [{"instance_group_name": GROUP, "instance_type": instance_type,
                                     "hosts": sorted(hosts)}]}
    input_data = {}
    for channel in request.get("InputDataConfig", []):
        name = channel["ChannelName"]
        s3 = channel["DataSource"]["S3DataSource"]
        input_data[name] = {"TrainingInputMode": channel.get("InputMode", "File"),
                            "S3DistributionType": s3.get("S3DataDistributionType", "FullyReplicated"),
                            "RecordWrapperType": channel.get("RecordWrapperType", "None"),
                            **({"ContentType": channel["ContentType"]} if "ContentType" in channel else {})}
        uploaded = _channel_files(files, s3["S3Uri"])
        target = data / name
        if name in SDK_CHANNELS and uploaded:
            for rel, content in uploaded.items():
                if "__pycache__/" in rel:  # the SDK uploads its host's bytecode; the rewritten sources must win
                    continue
                path = target / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if name == "sm_drivers" and rel.endswith((".py", ".sh", ".json")):
                    content = _rewrite(content.decode(), root).encode()
                path.write_bytes(content)
        elif name in channels:
            if target.is_symlink():
                target.unlink()
            target.symlink_to(Path(channels.pop(name)).resolve(), target_is_directory=True)
        else:
            raise ValueError(f"channel {name!r} ({s3['S3Uri']}) was not uploaded: pass channels={{{name!r}: folder}}")
    if channels:
        raise ValueError(f"channels={sorted(channels)}: not channels of the request {sorted(input_data)}")
    environment_py = data / "sm_drivers" / "scripts" / "environment.py"
    text = environment_py.read_text()
    text = _replace_once(text, 'SM_MASTER_ADDR = "algo-1"', 'SM_MASTER_ADDR = "127.0.0.1"', str(environment_py))
    text = _replace_once(text, "SM_MASTER_PORT = 7777", f"SM_MASTER_PORT = {int(master_port)}", str(environment_py))
    environment_py.write_text(text)

    (config / "resourceconfig.json").write_text(json.dumps(resource))
    (config / "inputdataconfig.json").write_text(json.dumps(input_data))
    (config / "hyperparameters.json").write_text(json.dumps(
        {k: _rewrite(str(v), root) for k, v in request.get("HyperParameters", {}).items()}))

    spec = request["AlgorithmSpecification"]
    argv = [_rewrite(a, root) for a in [*spec["ContainerEntrypoint"], *spec.get("ContainerArguments", [])]]
    image = fresh_venv(root.with_name(f"{root.name}-image"))
    env = {"PATH": os.pathsep.join([str(image / "bin"), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                                    "/sbin", "/bin"]),
           "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "TRAINING_JOB_NAME": request["TrainingJobName"],
           **{k: _rewrite(v, root) for k, v in request.get("Environment", {}).items()}}
    return Container(argv, env, root, image)
