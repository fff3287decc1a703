"""Container side of a SageMaker training job: hyperparameters -> Hydra overrides -> ``train(cfg)``.

Usage:
    # what a job runs (ModelTrainer's driver; torchrun on several GPUs or instances):
    python sagemaker_launch/entry.py --_add__experiment 0=quickstart --trainer__max_epochs 1=20
    torchrun --nnodes=1 --nproc_per_node=2 sagemaker_launch/entry.py --_add__experiment 0=quickstart
    # without arguments: the hyperparameters of $SM_HPS or $SM_INPUT_CONFIG_DIR/hyperparameters.json
    python sagemaker_launch/entry.py

The job's hyperparameters are the Hydra overrides the launcher was given, encoded so that both
ways a container reads them hand every override to this entry unchanged (:func:`encode_override`,
:func:`decode_hyperparameters`):

- names: SageMaker's drivers write ``export SM_HP_<NAME>=...``, so a dot in a name
  (``model.optimizer.lr``) fails every job before the script starts: ``.`` becomes ``__`` and the
  ``+``/``++``/``~`` prefixes ``_add__``/``_force__``/``_del__``;
- values: ``<n>=<value>``, the override's position ``n`` in the command line, then the text after
  its ``=`` as typed (``trainer.max_epochs=20`` -> ``trainer__max_epochs: "3=20"``; ``~key`` ->
  ``_del__key: "3"``). Such a text is never valid JSON, so it passes unchanged where SageMaker's
  code JSON-decodes values: ModelTrainer's drivers decode twice and re-encode (``null`` would
  arrive as ``null``, but ``"007"`` as ``007``), and the training toolkit of tuning trials decodes
  once and calls ``str()`` (``null`` would arrive as an empty string, ``true`` as ``True``);
- quotes: the drivers write every value into ``export NAME='<value>'`` lines that ``sm_train.sh``
  sources, so a ``'`` would end the quoting and kill the job before it starts. Single-quoted
  strings are sent double-quoted when Hydra reads both the same (``'my list.txt'`` ->
  ``"my list.txt"``); any other value with a ``'`` or a control character is sent as
  ``<n>%=<value>`` with those characters and ``%`` percent-escaped;
- order: the training toolkit sorts the arguments by name and a JSON map has no order, but Hydra
  applies overrides in order (``callbacks.ema={...}`` then ``callbacks.ema.decay=0.9`` works,
  the other way round fails): :func:`decode_hyperparameters` sorts by ``n``. Values without a
  position (tuned ones, which SageMaker sends as plain numbers, and categorical ones,
  ``=<value>``) come last, by name;
- ``sagemaker_*``, ``mp_parameters`` and ``_tuning_objective_metric`` (added by the SDK, the
  toolkit and the tuning service) are not overrides and are skipped.

The entry then composes ``conf/train.yaml`` (the same file a local run uses) with the overrides
and the container's places, read from the environment when :func:`main` runs:

- ``paths.output_dir=$SM_OUTPUT_DATA_DIR``: the run folder (metrics.json, predictions.csv,
  logs, profiler report) becomes the job's ``output.tar.gz``. It is one fixed folder for every
  process: no Hydra run directory resolved per process (``${now:...}``) under torchrun.
- ``callbacks=sagemaker`` with ``model_checkpoint.dirpath=$SM_CHECKPOINT_DIR/$TRAINING_JOB_NAME``:
  SageMaker syncs that folder with the job's checkpoint S3 URI, and a restarted (spot) job resumes
  from its newest checkpoint (``ckpt_path``). The job-name subfolder keeps the trials of a
  tuning job, which share one checkpoint URI, from resuming each other; a trial that has
  exported its model deletes its subfolder, so later trials don't download it
  (:func:`drop_trial_checkpoints`).
- ``data.root=$SM_CHANNEL_TRAIN`` when a ``train`` channel is mounted; a streaming data config's
  ``cache_dir`` goes to ``$SM_INPUT_DIR/scratch`` (not into the output archive).
- under torchrun, ``trainer.devices=$LOCAL_WORLD_SIZE``, ``trainer.num_nodes=WORLD_SIZE /
  LOCAL_WORLD_SIZE``, ``trainer.strategy=ddp``: Lightning requires ``devices * num_nodes ==
  WORLD_SIZE`` (otherwise each process would train its own model).

Global rank 0 copies the exported ``model/`` (model.pt, model_config.json) to ``$SM_MODEL_DIR``
with ``code/`` for SageMaker's PyTorch serving image (:func:`export_model`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sagemaker_launch.entry")

SEP = "__"
# longest first: "++" must not be read as "+" then "+"
PREFIXES = (("++", "_force__"), ("+", "_add__"), ("~", "_del__"))
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.]+")
# an encoded value: position (none for tuned/categorical values), "%" if percent-escaped, "=", the value
VALUE_PATTERN = re.compile(r"(\d*)(%?)=(.*)", re.DOTALL)
# what a percent-escaped value keeps as it is: printable ASCII but "'" (ends the env file's quoting) and "%"
ESCAPE_SAFE = "".join(c for c in map(chr, range(0x20, 0x7F)) if c not in "'%" and not c.isalnum())
# hyperparameters the SDK, the training toolkit or the tuning service add for themselves
RESERVED_PREFIXES = ("sagemaker_", "mp_parameters")
TUNING_OBJECTIVE = "_tuning_objective_metric"
# SageMaker's limits (botocore's service model: HyperParameterKey, HyperParameterValue, ParameterValue)
MAX_NAME_CHARS, MAX_VALUE_CHARS, MAX_CATEGORICAL_CHARS = 256, 2500, 256
# serving image packages: pinning them in code/requirements.txt would replace the image's CUDA build
IMAGE_PACKAGES = {"torch", "torchvision"}
# bincount's dependencies that `import bincount.serve.inference` loads (the test proves the list):
# Pillow (decoding), pydantic (the JSON request schema; the image lacks it, so endpoints pip-install it)
SERVING_PACKAGES = {"pillow", "pydantic"}
INFERENCE_SHIM = '''"""SageMaker PyTorch serving entry (written by sagemaker_launch/entry.py): bincount's handler."""

from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn  # noqa: F401
'''


def parse_value(value: str):
    """What Hydra reads from the override ``key=<value>`` (its ``Override.value()``).

    Raises:
        hydra.errors.HydraException: If ``value`` is not Hydra's override syntax.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"key={value}").value()


def encode_value(value: str, position: int | None = None) -> str:
    """The hyperparameter value that carries the text after an override's ``=``.

    ``"20"`` -> ``"3=20"`` (position 3); ``"'my list.txt'"`` -> ``'3="my list.txt"'``;
    ``"'it\\'s'"`` -> ``"3%=%27it\\%27s%27"``; without a position (a categorical tuning value),
    ``"=20"``. See the module docstring for why.

    Args:
        value: The text after the ``=``, as typed.
        position: The override's place in the command line, or ``None``.

    Returns:
        A text that no JSON decoding, ``str()`` or shell quoting on the way to the entry changes.
    """
    if "'" in value and '"' not in value:
        from hydra.errors import HydraException

        swapped = value.replace("'", '"')
        try:
            if parse_value(swapped) == parse_value(value):
                value = swapped
        except HydraException:
            pass  # sent escaped, as typed
    escape = "'" in value or not value.isprintable()
    text = urllib.parse.quote(value, safe=ESCAPE_SAFE) if escape else value
    return f"{'' if position is None else position}{'%' if escape else ''}={text}"


def encode_override(override: str, position: int | None = None) -> tuple[str, str]:
    """Turn one Hydra override into a SageMaker hyperparameter ``(name, value)``.

    ``"model.optimizer.lr=0.001"`` -> ``("model__optimizer__lr", "0=0.001")``,
    ``"+experiment=quickstart"`` -> ``("_add__experiment", "0=quickstart")``,
    ``"~callbacks.lr_monitor"`` -> ``("_del__callbacks__lr_monitor", "0")`` (position 0).

    Args:
        override: A Hydra override as typed on a command line.
        position: Its place among the job's overrides (see :func:`encode_value`); ``None`` for
            an override whose place doesn't matter.

    Returns:
        The hyperparameter's name and value.

    Raises:
        ValueError: If the key holds characters other than letters, digits, ``_`` and ``.``
            (group paths with ``/``, packages with ``@``), would not decode to itself (``a_.b``:
            ``a___b`` reads back as ``a._b``), or the name or value exceeds SageMaker's limits.
    """
    key, eq, value = override.partition("=")
    name_prefix = ""
    for hydra_prefix, encoded in PREFIXES:
        if key.startswith(hydra_prefix):
            key, name_prefix = key[len(hydra_prefix):], encoded
            break
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"override {override!r}: key {key!r} can't be a SageMaker hyperparameter name "
                         f"(letters, digits, '_' and '.' only)")
    name = name_prefix + key.replace(".", SEP)
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"override {override!r}: name {name!r} is {len(name)} characters; SageMaker takes "
                         f"at most {MAX_NAME_CHARS}")
    if eq:
        encoded_value = encode_value(value, position)
    else:  # "~key": no value
        encoded_value = "" if position is None else str(position)
    if len(encoded_value) > MAX_VALUE_CHARS:
        raise ValueError(f"override {override.partition('=')[0]}=...: the value is {len(encoded_value)} characters "
                         f"once encoded; SageMaker takes at most {MAX_VALUE_CHARS} per hyperparameter")
    decoded = decode_hyperparameters({name: encoded_value})[0]
    if decoded.partition("=")[0] != override.partition("=")[0]:
        raise ValueError(f"override {override!r}: key would come back as {decoded.partition('=')[0]!r} "
                         f"(a '_' next to a '.')")
    return name, encoded_value


def encode_overrides(overrides: list[str]) -> dict[str, str]:
    """:func:`encode_override` for a job's overrides, each with its position in ``overrides``.

    Raises:
        ValueError: If an override can't be encoded, or two overrides set the same key.
    """
    out: dict[str, str] = {}
    for position, override in enumerate(overrides):
        name, value = encode_override(override, position)
        if name in out:
            raise ValueError(f"override {override!r} sets {name} a second time")
        out[name] = value
    return out


def is_override(name: str) -> bool:
    """Whether hyperparameter ``name`` carries an override (not one the SDK, toolkit or tuner added)."""
    return not name.startswith(RESERVED_PREFIXES) and name != TUNING_OBJECTIVE


def decode_hyperparameters(hyperparameters: dict[str, object]) -> list[str]:
    """The Hydra overrides encoded in SageMaker hyperparameters, in their command-line order.

    Args:
        hyperparameters: Names and values from :func:`encode_override`, as strings or as the
            JSON values ``$SM_HPS`` holds; tuned values arrive as plain numbers (``0.0013``)
            or, for categorical ranges, from :func:`encode_value` without a position. Keys the
            SDK, toolkit or tuner add (:func:`is_override`) are skipped.

    Returns:
        ``["+experiment=quickstart", "model.optimizer.lr=0.001", ...]``: by position, then the
        overrides without one by name.
    """
    decoded = []
    for name, raw in hyperparameters.items():
        if not is_override(name):
            continue
        prefix = ""
        for hydra_prefix, encoded in PREFIXES:
            if name.startswith(encoded):
                name, prefix = name[len(encoded):], hydra_prefix
                break
        key = prefix + ".".join(name.split(SEP))
        text = raw if isinstance(raw, str) else json.dumps(raw)
        position, value = None, text  # a plain value: tuned, or from an older launcher
        if prefix == "~" and re.fullmatch(r"\d*", text):
            position, value = (int(text) if text else None), None
        elif match := VALUE_PATTERN.fullmatch(text):
            position = int(match[1]) if match[1] else None
            value = urllib.parse.unquote(match[3]) if match[2] else match[3]
        decoded.append((position is None, position or 0, key, key if value is None else f"{key}={value}"))
    return [override for *_, override in sorted(decoded)]


def parse_argv(argv: list[str]) -> dict[str, str]:
    """``["--a__b", "1", "--c", "x"]`` -> ``{"a__b": "1", "c": "x"}`` (how both drivers pass them).

    The training toolkit writes a one-letter name with one dash (``-x 1``); that is read too.

    Raises:
        ValueError: If the arguments are not ``--name value`` pairs.
    """
    names = argv[::2]
    if len(argv) % 2 or not all(a.startswith("--") or re.fullmatch(r"-\w", a) for a in names):
        raise ValueError(f"expected --name value pairs, got {argv}")
    return {name.lstrip("-"): value for name, value in zip(names, argv[1::2])}


def read_hyperparameters(environ: dict[str, str] | None = None) -> dict[str, object]:
    """The job's hyperparameters from ``$SM_HPS``, else ``$SM_INPUT_CONFIG_DIR/hyperparameters.json``
    (default ``/opt/ml/input/config``); ``{}`` if neither exists."""
    environ = os.environ if environ is None else environ
    if environ.get("SM_HPS"):
        return json.loads(environ["SM_HPS"])
    path = Path(environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class ContainerEnv:
    """Where this process runs: SageMaker's folders and torchrun's ranks.

    Attributes:
        model_dir: ``$SM_MODEL_DIR`` (becomes model.tar.gz).
        output_data_dir: ``$SM_OUTPUT_DATA_DIR`` (becomes output.tar.gz).
        checkpoint_dir: ``$SM_CHECKPOINT_DIR/$TRAINING_JOB_NAME`` (synced with the checkpoint S3 URI).
        train_channel: ``$SM_CHANNEL_TRAIN`` or ``None``.
        scratch_dir: ``$SM_INPUT_DIR/scratch``: caches that must not land in an archive.
        job_name: ``$TRAINING_JOB_NAME`` (``local`` outside SageMaker).
        rank: Global rank (``$RANK``), 0 without torchrun.
        world_size: Processes in the job (``$WORLD_SIZE``), 1 without torchrun.
        local_world_size: Processes on this instance (``$LOCAL_WORLD_SIZE``).
    """

    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    train_channel: Path | None
    scratch_dir: Path
    job_name: str
    rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> ContainerEnv:
        environ = os.environ if environ is None else environ
        job_name = environ.get("TRAINING_JOB_NAME", "local")
        world_size = int(environ.get("WORLD_SIZE", 1))
        channel = environ.get("SM_CHANNEL_TRAIN")
        return cls(
            model_dir=Path(environ.get("SM_MODEL_DIR", "/opt/ml/model")),
            output_data_dir=Path(environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")),
            checkpoint_dir=Path(environ.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")) / job_name,
            train_channel=Path(channel) if channel else None,
            scratch_dir=Path(environ.get("SM_INPUT_DIR", "/opt/ml/input")) / "scratch",
            job_name=job_name,
            rank=int(environ.get("RANK", 0)),
            world_size=world_size,
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world_size)),
        )


def _override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _override_value(overrides: list[str], key: str) -> str | None:
    values = [o.partition("=")[2] for o in overrides if _override_key(o) == key]
    return values[-1] if values else None


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The ``*.ckpt`` in ``checkpoint_dir`` with the highest ``global_step``, or ``None``.

    By step, not file time: a restarted spot job gets the folder back from S3 with download
    times. Checkpoints are memory-mapped, so only their small metadata is read.
    """
    import pickle

    import torch

    best: tuple[int, float, Path] | None = None
    for path in checkpoint_dir.glob("*.ckpt") if checkpoint_dir.is_dir() else []:
        try:
            step = int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
        except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as err:
            # a file cut short by the kill: skip it, resume from another
            log.warning("ignoring unreadable checkpoint %s: %s", path, err)
            continue
        key = (step, path.stat().st_mtime, path)
        best = key if best is None or key > best else best
    return None if best is None else best[2]


def distributed_overrides(env: ContainerEnv, user: list[str]) -> list[str]:
    """``trainer.devices``/``num_nodes``/``strategy`` matching torchrun's world.

    Raises:
        ValueError: If the user's ``trainer.devices * trainer.num_nodes`` contradicts the
            processes torchrun started (Lightning would otherwise fail or train apart).
    """
    nodes, rem = divmod(env.world_size, env.local_world_size)
    if rem:
        raise ValueError(f"WORLD_SIZE={env.world_size} is not a multiple of LOCAL_WORLD_SIZE={env.local_world_size}")
    wanted = {"trainer.devices": env.local_world_size, "trainer.num_nodes": nodes}
    for key, value in wanted.items():
        given = _override_value(user, key)
        if given is not None and given.isdigit() and int(given) != value:
            raise ValueError(f"{key}={given}, but this job runs {env.world_size} process(es) = {nodes} instance(s) x "
                             f"{env.local_world_size}: Lightning needs trainer.devices * trainer.num_nodes == WORLD_SIZE")
    if env.world_size == 1:
        return []
    out = [f"trainer.devices={env.local_world_size}", f"trainer.num_nodes={nodes}"]
    if _override_value(user, "trainer.strategy") is None:
        out.append("trainer.strategy=ddp")
    return out


def container_overrides(env: ContainerEnv, user: list[str], data_keys: set[str]) -> list[str]:
    """The overrides that put a run into the container's folders (see the module docstring).

    Args:
        env: This process's :class:`ContainerEnv`.
        user: The decoded hyperparameters; a key set there is left alone.
        data_keys: The keys of the composed ``data`` config (``root`` or ``uri``/``cache_dir``).

    Returns:
        Overrides to append after ``user``.
    """
    given = {_override_key(o) for o in user}
    out = [] if "callbacks" in given else ["callbacks=sagemaker"]
    out += [f"paths.output_dir={env.output_data_dir}", "++trainer.enable_progress_bar=false"]
    if "callbacks.model_checkpoint.dirpath" not in given:
        out.append(f"callbacks.model_checkpoint.dirpath={env.checkpoint_dir}")
        resume = newest_checkpoint(env.checkpoint_dir)
        if resume is not None and "ckpt_path" not in given:
            out.append(f"ckpt_path={resume}")
    if env.train_channel is not None and "data.root" not in given:
        if "root" in data_keys:
            out.append(f"data.root={env.train_channel}")
        else:
            log.warning("a train channel is mounted at %s but the data config has no root; not used", env.train_channel)
    if "cache_dir" in data_keys and "data.cache_dir" not in given:
        out.append(f"data.cache_dir={env.scratch_dir / 'stream_cache'}")
    return out + distributed_overrides(env, user)


def is_tuning_trial(environ: dict[str, str] | None = None) -> bool:
    """Whether this job is a trial of a tuning job: SageMaker adds ``_tuning_objective_metric`` to its
    ``$SM_INPUT_CONFIG_DIR/hyperparameters.json`` (the training toolkit keeps it from the arguments)."""
    environ = os.environ if environ is None else environ
    path = Path(environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
    return path.is_file() and TUNING_OBJECTIVE in json.loads(path.read_text())


def drop_trial_checkpoints(env: ContainerEnv, user: list[str]) -> bool:
    """Delete a finished tuning trial's checkpoint folder (``$SM_CHECKPOINT_DIR/$TRAINING_JOB_NAME``).

    A tuning job gives all its trials one checkpoint S3 URI (``HyperParameterTrainingJobDefinition``
    has one ``CheckpointConfig``, with no per-trial part), and SageMaker copies everything under it
    into each trial's container before the trial starts. SageMaker deletes from S3 what the
    container deletes from the synced folder, so once a trial has exported its model, its
    checkpoints go: later trials download only those of trials still running or waiting to resume
    after a spot interruption.

    Args:
        env: This process's :class:`ContainerEnv`.
        user: The decoded hyperparameters: a ``callbacks.model_checkpoint.dirpath`` of the user's
            own is left alone.

    Returns:
        Whether a folder was deleted.
    """
    if "callbacks.model_checkpoint.dirpath" in {_override_key(o) for o in user} or not env.checkpoint_dir.is_dir():
        return False
    shutil.rmtree(env.checkpoint_dir)
    return True


def serving_requirements() -> str:
    """``code/requirements.txt`` for the serving image: what the handler imports but the image has.

    :data:`SERVING_PACKAGES` with the version ranges of bincount's own metadata; torch and
    torchvision (:data:`IMAGE_PACKAGES`) are left to the image, whose CUDA build a pin would replace.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requires = [Requirement(r) for r in importlib.metadata.requires("bincount") or []]
    except importlib.metadata.PackageNotFoundError:
        log.warning("bincount is not installed: code/requirements.txt lists its serving packages without versions")
        requires = []
    pins = {canonicalize_name(r.name): f"{r.name}{r.specifier}" for r in requires if r.marker is None}
    lines = [pins.get(name, name) for name in sorted(SERVING_PACKAGES)]
    return ("# installed by SageMaker's PyTorch serving image at start-up: what bincount.serve.inference imports "
            "(torch and torchvision come with the image)\n" + "\n".join(lines) + "\n")


def export_model(run_model_dir: Path, model_dir: Path) -> Path:
    """Copy the exported ``model/`` into ``model_dir`` with the serving code.

    ``model_dir`` (SageMaker packs it into model.tar.gz) then holds ``model.pt``,
    ``model_config.json`` and ``code/``: ``inference.py`` (re-exports
    :mod:`bincount.serve.inference`'s ``model_fn``/``input_fn``/``predict_fn``/``output_fn``),
    ``bincount/`` (this package, without conf/) and ``requirements.txt``.

    Args:
        run_model_dir: The run's ``model/`` folder written by ``bincount.train.train``.
        model_dir: ``$SM_MODEL_DIR``.

    Returns:
        ``model_dir``.

    Raises:
        FileNotFoundError: If ``run_model_dir`` has no ``model.pt``.
    """
    import bincount

    if not (run_model_dir / "model.pt").is_file():
        raise FileNotFoundError(f"{run_model_dir / 'model.pt'} not found: did training export the model?")
    model_dir.mkdir(parents=True, exist_ok=True)
    for path in run_model_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, model_dir / path.name)
    code = model_dir / "code"
    shutil.copytree(Path(bincount.__file__).parent, code / "bincount", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "conf"))
    if importlib.util.find_spec("bincount.serve.inference") is None:
        log.warning("bincount.serve.inference not found: model.tar.gz gets no code/inference.py")
    else:
        (code / "inference.py").write_text(INFERENCE_SHIM)
    (code / "requirements.txt").write_text(serving_requirements())
    return model_dir


def compose_train(overrides: list[str]):
    """``conf/train.yaml`` composed with ``overrides`` (Hydra's compose API, no run directory)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bincount.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the job: decode the hyperparameters, compose, train, export (rank 0).

    Args:
        argv: ``--name value`` pairs; ``None`` reads ``sys.argv[1:]``, and no pairs at all read
            :func:`read_hyperparameters`.

    Returns:
        The metrics ``train`` returned (the same on every rank for torchmetrics values).

    Raises:
        ValueError: See :func:`parse_argv` and :func:`distributed_overrides`.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("sagemaker_launch", "bincount"):  # Lightning's own logger has its handler already
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    argv = sys.argv[1:] if argv is None else argv
    hyperparameters = parse_argv(argv) if argv else read_hyperparameters()
    env = ContainerEnv.from_environ()
    user = decode_hyperparameters(hyperparameters)

    from lightning.pytorch.utilities import rank_zero_info

    from bincount.callbacks import PREFIX, format_metrics
    from bincount.train import train

    data_keys = set(compose_train(user).data.keys())
    overrides = user + container_overrides(env, user, data_keys)
    rank_zero_info(f"{PREFIX} job {env.job_name}: world_size={env.world_size} "
                   f"({env.world_size // env.local_world_size} instance(s) x {env.local_world_size})")
    rank_zero_info(f"{PREFIX} overrides: {' '.join(overrides)}")
    cfg = compose_train(overrides)
    metrics = train(cfg)

    synced = {k: v for k, v in metrics.items() if "loss" not in k}  # torchmetrics values, synced by DDP
    log.info("%s rank %d/%d world_size=%d %s", PREFIX, env.rank, env.world_size, env.world_size, format_metrics(synced))
    if env.rank == 0:
        (env.output_data_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if cfg.get("test", True):
            export_model(env.output_data_dir / "model", env.model_dir)
            rank_zero_info(f"{PREFIX} model exported to {env.model_dir}")
            if is_tuning_trial() and drop_trial_checkpoints(env, user):
                rank_zero_info(f"{PREFIX} tuning trial done: deleted {env.checkpoint_dir} (later trials won't "
                               "download it)")
    return metrics


if __name__ == "__main__":
    main()
