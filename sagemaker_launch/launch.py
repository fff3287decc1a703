"""Send a training experiment to SageMaker: compose its config here, then start a training job.

Usage:
    python -m sagemaker_launch.launch +experiment=resnet50_subset sagemaker=gpu_single sagemaker.inputs.train=s3://BUCKET/abid/subset
    python -m sagemaker_launch.launch +experiment=resnet50_subset sagemaker=gpu_multi sagemaker.instance_count=4 \
        sagemaker.spot=true sagemaker.inputs.train=s3://BUCKET/abid/subset --dry-run
    python -m sagemaker_launch.launch +experiment=quickstart data=abid_stream data.uri=s3://BUCKET/abid/v1 \
        sagemaker=cpu sagemaker.profiler=true --no-wait

Every argument but ``--dry-run``/``--no-wait`` is a Hydra override of ``conf/launch.yaml`` =
``conf/train.yaml`` + a ``sagemaker`` group (``conf/sagemaker/*.yaml``). The config is composed
and resolved here, so a typo fails before a job is paid for. The job gets the *overrides* (not the
resolved config) as hyperparameters (:func:`sagemaker_launch.entry.encode_overrides`), and its
container composes the same ``conf/`` with them (``sagemaker_launch/entry.py``).

What the launcher adds to the job:

- the code: bincount's wheel (built from this source tree, or repacked from the installed
  package), a ``requirements.txt`` that pip-installs it (torch and torchvision come with the AWS
  PyTorch training image), and the entry script and PID 1 script out of that wheel
  (:mod:`sagemaker_launch.source`);
- the trainer for the hardware: ``trainer.accelerator``, and for more than one process
  ``trainer.devices`` (processes per instance), ``trainer.num_nodes`` (instances) and
  ``trainer.strategy=ddp``, run by torchrun (ModelTrainer's ``Torchrun``);
- its PID 1: ``sagemaker_launch/container_init.sh`` runs the SDK's ``sm_train.sh`` and passes
  SageMaker's SIGTERM (stop, spot reclaim) on to training, which then writes a checkpoint
  (:func:`use_container_init`);
- ``SM_CHECKPOINT_DIR=/opt/ml/checkpoints`` (no SageMaker driver sets one); with
  ``sagemaker.spot=true`` managed spot, ``max_wait`` and a per-job checkpoint S3 URI;
- metric definitions for the ``[bincount]`` log lines (``val/acc``, ``val/mae``, ...);
- with ``sagemaker.profiler=true``, a ``ProfilerConfig`` in the request (ModelTrainer has no field
  for it: :class:`RequestHook` adds it) and ``++trainer.profiler=simple`` (its report lands in
  output.tar.gz under ``csv/``).

``--dry-run`` prints the CreateTrainingJob request and the cost, and sends nothing.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import re
import shlex
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from bincount.callbacks import metric_regex
from bincount.config import compose
from sagemaker_launch import cost
from sagemaker_launch.entry import encode_overrides
from sagemaker_launch.source import CONTAINER_INIT_SCRIPT, ENTRY_SCRIPT, stage_source

log = logging.getLogger("sagemaker_launch")

CHECKPOINT_DIR = "/opt/ml/checkpoints"
# the job's PID 1 (see the script): the code channel is downloaded before the container starts
CONTAINER_INIT = f"/opt/ml/input/data/code/{CONTAINER_INIT_SCRIPT}"
# override roots that configure the launch, not the training run
LAUNCHER_KEYS = ("sagemaker", "hydra", "hparams_search")
# ModelTrainer names a job "<base_job_name>-%Y%m%d%H%M%S" and cuts the name to 63 characters:
# a longer base would lose the timestamp, and launches would collide
JOB_NAME_MAX = 63
BASE_JOB_NAME_MAX = JOB_NAME_MAX - len("-20250101000000")
METRICS = ("val/acc", "val/acc_best", "val/mae", "val/rmse", "val/obo_acc", "val/loss",
           "test/acc", "test/mae", "test/rmse", "test/obo_acc")


def override_root(override: str) -> str:
    """``"+sagemaker.spot=true"`` -> ``"sagemaker"``; ``"hydra/launcher=x"`` -> ``"hydra"``."""
    return override.lstrip("+~").partition("=")[0].split(".")[0].split("/")[0]


def override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides a training job gets: those of the training config (not ``sagemaker.*``,
    ``hydra.*``, ``hparams_search``)."""
    return [o for o in overrides if override_root(o) not in LAUNCHER_KEYS]


def check_config(cfg: DictConfig, overrides: list[str]) -> None:
    """Fail here, not in a paid job: every value must resolve and the job must find data.

    Raises:
        omegaconf.errors.OmegaConfBaseException: A missing value (``???``) or a broken interpolation.
        ValueError: The data config reads a folder (``data.root``) but no ``train`` channel is given,
            streams from a ``data.uri`` the job can't reach (a local path), or ``sagemaker.*`` values
            SageMaker would refuse (see :func:`check_base_job_name`).
    """
    run = copy.deepcopy(cfg)
    with open_dict(run):
        run.paths.output_dir = "/opt/ml/output/data"  # what the container sets
        run.pop("hydra", None)
    OmegaConf.to_container(run, resolve=True, throw_on_missing=True)
    given = {override_key(o) for o in overrides}
    inputs = cfg.sagemaker.inputs or {}
    if "root" in cfg.data and not inputs.get("train") and "data.root" not in given:
        raise ValueError("no training data for the job: set sagemaker.inputs.train=s3://BUCKET/PREFIX (an ABID-layout "
                         "folder, mounted as data.root) or stream shards (data=abid_stream data.uri=s3://...)")
    uri = str(cfg.data.get("uri") or "")
    if "uri" in cfg.data and not uri.startswith(("s3://", "/opt/ml/")):
        raise ValueError(f"data.uri={uri} is not reachable from the job: shards on S3 (s3://...) or under /opt/ml")
    for name, uri in inputs.items():
        if uri and not str(uri).startswith("s3://"):
            raise ValueError(f"sagemaker.inputs.{name}={uri}: must be an s3:// URI")
    sm = cfg.sagemaker
    check_base_job_name(str(sm.base_job_name))
    if sm.spot and sm.max_wait_hours < sm.max_run_hours:
        raise ValueError(f"sagemaker.max_wait_hours={sm.max_wait_hours} < max_run_hours={sm.max_run_hours}: "
                         "spot needs max_wait >= max_run")


def check_base_job_name(base: str) -> None:
    """Refuse a ``sagemaker.base_job_name`` that can't start uniquely named jobs.

    Raises:
        ValueError: Longer than :data:`BASE_JOB_NAME_MAX` (the SDK's timestamp suffix would be cut
            off), or not letters, digits and single dashes/underscores between them.
    """
    if len(base) > BASE_JOB_NAME_MAX:
        raise ValueError(f"sagemaker.base_job_name={base!r} has {len(base)} characters, at most {BASE_JOB_NAME_MAX}: "
                         f"job names are <base>-<timestamp> cut to {JOB_NAME_MAX}, so a longer base loses the "
                         "timestamp and launches collide")
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", base.replace("_", "-")):
        raise ValueError(f"sagemaker.base_job_name={base!r}: letters, digits, '-' and '_' only, starting and ending "
                         "with a letter or digit (SageMaker's job name pattern)")


def job_base_name(base: str, suffix: str) -> str:
    """``base`` + ``suffix``, ``base`` shortened so the result fits :data:`BASE_JOB_NAME_MAX`
    (the suffix, which makes it unique, is kept whole)."""
    return base[:max(1, BASE_JOB_NAME_MAX - len(suffix))].rstrip("-_") + suffix


def processes_per_instance(sm: DictConfig) -> int:
    """``sagemaker.processes_per_instance``, else the instance type's GPUs, else 1 (CPU)."""
    if sm.processes_per_instance is not None:
        return int(sm.processes_per_instance)
    return max(1, cost.instance_gpus(sm.instance_type))


def trainer_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The trainer settings the hardware needs, unless ``overrides`` set them.

    The accelerator follows the instance type (:func:`sagemaker_launch.cost.has_gpus`), whatever
    the experiment's trainer says; ``trainer.precision=auto`` becomes the instance type's precision
    (:func:`sagemaker_launch.cost.training_precision`), so the dry run shows it.

    Returns:
        e.g. ``["trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2",
        "trainer.strategy=ddp"]`` for 2 x ml.g5.12xlarge: ``devices * num_nodes`` equals the
        WORLD_SIZE torchrun starts.

    Raises:
        KeyError: An instance type the price table doesn't know, without ``processes_per_instance``,
            or one whose GPUs :func:`sagemaker_launch.cost.has_gpus` can't tell.
    """
    sm, given = cfg.sagemaker, {override_key(o) for o in overrides}
    procs = processes_per_instance(sm)
    on_gpu = cost.has_gpus(sm.instance_type)  # the instance decides, not the experiment's trainer
    wanted = {"trainer.accelerator": "gpu" if on_gpu else "cpu"}
    if str(cfg.trainer.precision) == "auto":
        chosen, _ = cost.training_precision(sm.instance_type)
        if chosen:
            wanted["trainer.precision"] = chosen
    elif not on_gpu and str(cfg.trainer.precision).startswith("16"):
        wanted["trainer.precision"] = "32-true"  # fp16 AMP is GPU-only
    if procs * sm.instance_count > 1:
        wanted.update({"trainer.devices": str(procs), "trainer.num_nodes": str(sm.instance_count),
                       "trainer.strategy": "ddp"})
    return [f"{key}={value}" for key, value in wanted.items() if key not in given]


@dataclass
class TrainingJobPlan:
    """Everything a training job request is built from.

    Attributes:
        overrides: Hydra overrides the container composes ``conf/train.yaml`` with.
        hyperparameters: ``overrides`` encoded for SageMaker (``__`` for ``.``).
        processes: Processes per instance (torchrun when ``processes * instance_count > 1``).
        image_uri: The training image.
        environment: Container environment.
        profiler: ``ProfilerConfig`` of the request but its ``S3OutputPath`` (:func:`profiler_config`),
            or ``None``.
        sagemaker: The composed ``sagemaker`` config.
    """

    overrides: list[str]
    hyperparameters: dict[str, str]
    processes: int
    image_uri: str
    environment: dict[str, str]
    profiler: dict[str, Any] | None
    sagemaker: DictConfig = field(repr=False)

    @property
    def distributed(self) -> bool:
        return self.processes * self.sagemaker.instance_count > 1


def training_image(sm: DictConfig) -> str:
    """``sagemaker.image_uri``, else the AWS PyTorch training image for the instance type."""
    if sm.image_uri:
        return str(sm.image_uri)
    from sagemaker.core import image_uris

    return image_uris.retrieve("pytorch", sm.region, version=str(sm.framework_version), py_version=sm.py_version,
                               instance_type=sm.instance_type, image_scope="training")


def plan_training_job(cfg: DictConfig, overrides: list[str]) -> TrainingJobPlan:
    """Check ``cfg`` (composed from ``overrides``) and decide the job.

    Raises:
        ValueError: See :func:`check_config` and :func:`sagemaker_launch.entry.encode_override`.
        KeyError: An instance type the price table doesn't know, without ``processes_per_instance``.
    """
    check_config(cfg, overrides)
    sm = cfg.sagemaker
    run = job_overrides(overrides) + trainer_overrides(cfg, overrides)
    if sm.profiler and not any(override_key(o) == "trainer.profiler" for o in run):
        run.append("++trainer.profiler=simple")
    profiler = None
    if sm.profiler:  # S3OutputPath: the session's bucket, known once there is a session (profiler_config)
        profiler = {"ProfilingIntervalInMilliseconds": int(sm.profiler_interval_ms), "DisableProfiler": False}
    environment = {"SM_CHECKPOINT_DIR": CHECKPOINT_DIR, "PYTHONUNBUFFERED": "1",
                   **{str(k): str(v) for k, v in (sm.environment or {}).items()}}
    return TrainingJobPlan(overrides=run, hyperparameters=encode_overrides(run), processes=processes_per_instance(sm),
                           image_uri=training_image(sm), environment=environment, profiler=profiler,
                           sagemaker=sm)


def use_container_init(request: dict[str, Any]) -> None:
    """Make ``sagemaker_launch/container_init.sh`` the job's PID 1, running the SDK's ``sm_train.sh``.

    ModelTrainer always starts ``/bin/bash -c "chmod +x .../sm_train.sh && .../sm_train.sh"``
    (no option changes it), a PID 1 that drops SageMaker's SIGTERM; the script passes it on to
    training. Edits the CreateTrainingJob ``request`` in place.

    Raises:
        RuntimeError: The request does not start ``sm_train.sh`` the way this SDK version does.
    """
    from sagemaker.train.constants import (DEFAULT_CONTAINER_ARGUMENTS, DEFAULT_CONTAINER_ENTRYPOINT,
                                           SM_DRIVERS_CONTAINER_PATH, TRAIN_SCRIPT)

    spec = request["AlgorithmSpecification"]
    if (spec.get("ContainerEntrypoint"), spec.get("ContainerArguments")) != (DEFAULT_CONTAINER_ENTRYPOINT,
                                                                            DEFAULT_CONTAINER_ARGUMENTS):
        raise RuntimeError(f"unexpected ContainerEntrypoint/ContainerArguments {spec.get('ContainerEntrypoint')} "
                           f"{spec.get('ContainerArguments')}: the SageMaker SDK no longer starts {TRAIN_SCRIPT} "
                           "as launch.use_container_init expects")
    spec["ContainerEntrypoint"] = ["/bin/bash", CONTAINER_INIT]
    spec["ContainerArguments"] = [f"{SM_DRIVERS_CONTAINER_PATH}/{TRAIN_SCRIPT}"]


def request_errors(params: dict[str, Any], operation_model) -> list[str]:
    """What SageMaker's API model says is wrong with a request, one line per problem.

    botocore's ``ParamValidator`` (what every client runs before sending) checks types, required
    members and minimums only; the service would refuse the rest, so this adds the model's
    maximums (lengths, sizes, values), ``pattern`` (searched: Smithy patterns are not implicitly
    anchored) and ``enum`` (e.g. the instance types of ``TrainingInstanceType``).

    Args:
        params: The request, as the client's ``before-parameter-build`` event holds it.
        operation_model: ``botocore.model.OperationModel`` of the request.
    """
    from botocore.validate import ParamValidator

    report = ParamValidator().validate(params, operation_model.input_shape)
    errors = report.generate_report().splitlines() if report.has_errors() else []
    _model_errors(params, operation_model.input_shape, operation_model.name, errors)
    return errors


def _model_errors(value: Any, shape, name: str, errors: list[str]) -> None:
    meta, kind = shape.metadata, shape.type_name
    if kind == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                _model_errors(item, shape.members[key], f"{name}.{key}", errors)
    elif kind == "list" and isinstance(value, (list, tuple)):
        if "max" in meta and len(value) > meta["max"]:
            errors.append(f"{name}: {len(value)} items, at most {meta['max']}")
        for i, item in enumerate(value):
            _model_errors(item, shape.member, f"{name}[{i}]", errors)
    elif kind == "map" and isinstance(value, dict):
        if "max" in meta and len(value) > meta["max"]:
            errors.append(f"{name}: {len(value)} entries, at most {meta['max']}")
        for key, item in value.items():
            _model_errors(key, shape.key, f"{name} key {key!r}", errors)
            _model_errors(item, shape.value, f"{name}[{key!r}]", errors)
    elif kind == "string" and isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            errors.append(f"{name}: {len(value)} characters, at most {meta['max']}")
        if shape.enum and value not in shape.enum:
            errors.append(f"{name}={value!r}: not one of SageMaker's {len(shape.enum)} values ({shape.name})")
        if "pattern" in meta and not _pattern(meta["pattern"]).search(value):
            errors.append(f"{name}={_short(value)}: does not match {meta['pattern']!r}")
    elif kind in ("integer", "long", "float", "double") and isinstance(value, (int, float)):
        if "max" in meta and value > meta["max"]:
            errors.append(f"{name}={value}: at most {meta['max']}")


def _short(value: str, keep: int = 80) -> str:
    return repr(value) if len(value) <= keep else repr(value[:keep]) + f"... ({len(value)} characters)"


@functools.lru_cache(maxsize=None)
def _pattern(pattern: str):
    """The service model's (Java) regex: ``regex`` reads its ``\\p{L}``-style classes, ``re`` does not."""
    try:
        import regex

        return regex.compile(pattern)
    except ImportError:
        try:
            return re.compile(pattern)
        except re.error:  # a \p{...} class: not checked without the regex package
            return re.compile("")


class DryRun(Exception):  # noqa: N818 - not an error: how a dry run stops before sending
    """Raised instead of sending a Create* request in a dry run."""

    def __init__(self, operation: str, params: dict[str, Any]) -> None:
        super().__init__(f"dry run: {operation} not sent")
        self.operation = operation
        self.params = params


class RequestHook:
    """botocore event handlers on one boto3 session.

    - add request fields the SDK has no parameter for (``extra``: operation -> fields, e.g.
      ``{"CreateTrainingJob": {"ProfilerConfig": {...}}}``), then apply ``edits`` (operation ->
      function changing the request in place);
    - keep every SageMaker ``Create*`` request as sent (``sent``), so the launcher knows the job name;
    - in a dry run, send nothing: ``Create*`` is checked against the service model
      (:func:`request_errors`: ``ValueError`` if SageMaker would refuse it), then raises
      :class:`DryRun` carrying the request, S3 uploads
      are answered locally and recorded with their contents (``files``: ``s3://bucket/key`` -> bytes),
      any other call is refused (``AccessDenied``, which the SDK treats as "cannot verify").

    Args:
        boto_session: The ``boto3.Session`` every client of the job is made from (register before
            creating clients: a client copies the session's handlers when it is created).
        extra: Fields to add per operation.
        edits: Functions changing the request in place, per operation.
        dry_run: Send nothing.
    """

    def __init__(self, boto_session, *, extra: dict[str, dict[str, Any]] | None = None,
                 edits: dict[str, Callable[[dict[str, Any]], None]] | None = None, dry_run: bool = False) -> None:
        self.extra = extra or {}
        self.edits = edits or {}
        self.dry_run = dry_run
        self.sent: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.files: dict[str, bytes] = {}
        boto_session.events.register("before-parameter-build.sagemaker", self._sagemaker_params)
        if dry_run:
            boto_session.events.register("before-parameter-build.s3.PutObject", self._s3_put)
            boto_session.events.register("before-call", self._refuse)

    def _sagemaker_params(self, params: dict[str, Any], model, **_: Any) -> None:
        params.update(copy.deepcopy(self.extra.get(model.name, {})))
        if model.name in self.edits:
            self.edits[model.name](params)
        if model.name.startswith("Create"):
            self.sent[model.name].append(copy.deepcopy(params))
            if self.dry_run:
                if errors := request_errors(params, model):
                    raise ValueError(f"dry run: SageMaker would refuse this {model.name} request:\n  "
                                     + "\n  ".join(errors))
                raise DryRun(model.name, copy.deepcopy(params))

    @property
    def uploads(self) -> list[str]:
        """The ``s3://`` URIs of :attr:`files`, in upload order."""
        return list(self.files)

    def _s3_put(self, params: dict[str, Any], **_: Any) -> None:
        # ModelTrainer uploads `code` and `sm_drivers` file by file (Session.upload_data -> S3Transfer):
        # small files are one PutObject whose Body is a file-like chunk reader; read it and rewind,
        # so botocore can still compute its checksum from the start
        body = params.get("Body", b"")
        if hasattr(body, "read"):
            start = body.tell()
            data = body.read()
            body.seek(start)
        else:
            data = body.encode() if isinstance(body, str) else bytes(body)
        self.files[f"s3://{params['Bucket']}/{params['Key']}"] = data

    def _refuse(self, model, **_: Any):
        from botocore.awsrequest import AWSResponse
        from botocore.exceptions import ClientError

        if model.service_model.service_name == "s3" and model.name == "PutObject":
            return AWSResponse(None, 200, {}, None), {"ETag": '"dry-run"'}
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "dry run: nothing is sent"}}, model.name)


def make_session(sm: DictConfig, *, dry_run: bool = False, extra: dict[str, dict[str, Any]] | None = None,
                 edits: dict[str, Callable[[dict[str, Any]], None]] | None = None):
    """A SageMaker ``Session`` in ``sm.region`` on ``sm.bucket`` with a :class:`RequestHook`
    (``extra``, ``edits``: see there).

    In a dry run the default bucket is ``sm.bucket`` (or a placeholder) without asking S3.

    Returns:
        ``(session, hook)``.
    """
    import boto3
    from sagemaker.core.helper.session_helper import Session

    boto_session = boto3.Session(region_name=sm.region)
    hook = RequestHook(boto_session, extra=extra, edits=edits, dry_run=dry_run)
    if dry_run:
        from sagemaker.core.config.config import load_sagemaker_config

        class DryRunSession(Session):
            def default_bucket(self) -> str:  # the real one lists, checks or creates the bucket
                return sm.bucket or f"sagemaker-{sm.region}-ACCOUNT_ID"

        # the user's SDK defaults still apply; the SDK's usage telemetry (plain HTTPS, not boto) is off
        config = load_sagemaker_config()
        config.setdefault("SchemaVersion", "1.0")
        config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})["TelemetryOptOut"] = True
        return DryRunSession(boto_session=boto_session, default_bucket=sm.bucket, sagemaker_config=config), hook
    return Session(boto_session=boto_session, default_bucket=sm.bucket), hook


def role_for(sm: DictConfig, dry_run: bool) -> str | None:
    """``sm.role``; in a dry run without one, a placeholder (a real launch asks AWS for the caller's)."""
    if sm.role or not dry_run:
        return sm.role
    log.warning("no role (sagemaker.role or $SAGEMAKER_ROLE): the dry run shows a placeholder")
    return "arn:aws:iam::000000000000:role/SageMakerExecutionRole"  # a valid ARN: the dry run checks the request


def channels(sm: DictConfig) -> list:
    """ModelTrainer channels for ``sm.inputs`` (``None`` entries skipped)."""
    from sagemaker.core.training.configs import Channel, DataSource, S3DataSource

    return [Channel(channel_name=name, input_mode=sm.input_mode,
                    data_source=DataSource(s3_data_source=S3DataSource(
                        s3_data_type="S3Prefix", s3_uri=str(uri), s3_data_distribution_type="FullyReplicated")))
            for name, uri in (sm.inputs or {}).items() if uri]


def metric_definitions() -> list[dict[str, str]]:
    """``[{"Name": "val/acc", "Regex": ...}, ...]`` for :class:`bincount.callbacks.MetricLines` lines."""
    return [{"Name": name, "Regex": metric_regex(name)} for name in METRICS]


def make_model_trainer(plan: TrainingJobPlan, session, source_dir: Path, *, role: str | None,
                       checkpoint_s3_uri: str | None = None):
    """A fresh ``ModelTrainer`` for one job (it writes the job's checkpoint URI back into itself).

    Args:
        plan: From :func:`plan_training_job`.
        session: From :func:`make_session`.
        source_dir: From :func:`sagemaker_launch.source.stage_source`.
        role: Execution role ARN or name (``None``: the caller's role).
        checkpoint_s3_uri: Overrides ``sagemaker.checkpoint_s3_uri``; with spot and neither set,
            the SDK picks ``s3://BUCKET/BASE/JOB/checkpoints`` per job.
    """
    from sagemaker.core.training.configs import (CheckpointConfig, Compute, MetricDefinition, SourceCode,
                                                 StoppingCondition, Tag)
    from sagemaker.train.distributed import Torchrun
    from sagemaker.train.model_trainer import ModelTrainer

    sm = plan.sagemaker
    uri = checkpoint_s3_uri or sm.checkpoint_s3_uri
    trainer = ModelTrainer(
        sagemaker_session=session,
        role=role,
        base_job_name=sm.base_job_name,
        training_image=plan.image_uri,
        source_code=SourceCode(source_dir=str(source_dir), entry_script=ENTRY_SCRIPT, requirements="requirements.txt"),
        distributed=Torchrun(process_count_per_node=plan.processes) if plan.distributed else None,
        compute=Compute(instance_type=sm.instance_type, instance_count=int(sm.instance_count),
                        volume_size_in_gb=int(sm.volume_size_gb), enable_managed_spot_training=bool(sm.spot)),
        stopping_condition=StoppingCondition(
            max_runtime_in_seconds=int(sm.max_run_hours * 3600),
            max_wait_time_in_seconds=int(sm.max_wait_hours * 3600) if sm.spot else None),
        checkpoint_config=CheckpointConfig(s3_uri=uri, local_path=CHECKPOINT_DIR) if (sm.spot or uri) else None,
        environment=plan.environment,
        hyperparameters=dict(plan.hyperparameters),
        tags=[Tag(key=str(k), value=str(v)) for k, v in (sm.tags or {}).items()] or None,
    )
    return trainer.with_metric_definitions([MetricDefinition(name=m["Name"], regex=m["Regex"])
                                            for m in metric_definitions()])


def console_url(region: str, job_name: str) -> str:
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/jobs/{job_name}"


def describe_request(request: dict[str, Any], uploads: list[str]) -> str:
    """The dry-run printout of a request and of the files it would upload."""
    lines = [json.dumps(request, indent=2, sort_keys=True, default=str)]
    if uploads:
        prefixes = sorted({u.rsplit("/input/", 1)[0] + "/input/" + u.rsplit("/input/", 1)[1].split("/")[0] + "/"
                           if "/input/" in u else u for u in uploads})
        lines.append(f"would upload {len(uploads)} files to: " + ", ".join(prefixes))
    return "\n".join(lines)


@dataclass
class Submission:
    """What :func:`submit_training_job` did.

    Attributes:
        request: The CreateTrainingJob parameters (sent, or in a dry run what would be sent).
        job_name: The training job's name.
        uploads: S3 objects a dry run would have written.
        dry_run: Nothing was sent.
        files: In a dry run, the contents of ``uploads`` (``s3://bucket/key`` -> bytes): the code and
            the SDK's container drivers (``sm_drivers/``, with the generated ``sm_train.sh``).
    """

    request: dict[str, Any]
    job_name: str
    uploads: list[str]
    dry_run: bool
    files: dict[str, bytes] = field(default_factory=dict, repr=False)


def profiler_config(plan: TrainingJobPlan, session) -> dict[str, Any]:
    """The request's ``ProfilerConfig``: ``plan.profiler`` writing to
    ``s3://<the session's default bucket>/[<its prefix>/]<base_job_name>/profiler`` (SageMaker adds
    the job name), where ModelTrainer puts the job's code and output.
    """
    prefix = "/".join(p for p in (session.default_bucket_prefix, plan.sagemaker.base_job_name) if p)
    return {"S3OutputPath": f"s3://{session.default_bucket()}/{prefix}/profiler", **plan.profiler}


def submit_training_job(plan: TrainingJobPlan, *, dry_run: bool = False, wait: bool = False) -> Submission:
    """Build a fresh ``ModelTrainer`` from ``plan`` and start the job (or, in a dry run, don't).

    Args:
        plan: From :func:`plan_training_job`.
        dry_run: Build and capture the request, send nothing.
        wait: Stream the job's log until it ends.
    """
    sm = plan.sagemaker
    session, hook = make_session(sm, dry_run=dry_run, edits={"CreateTrainingJob": use_container_init})
    if plan.profiler:
        hook.extra["CreateTrainingJob"] = {"ProfilerConfig": profiler_config(plan, session)}
    with tempfile.TemporaryDirectory(prefix="bincount-source-") as tmp:
        trainer = make_model_trainer(plan, session, stage_source(Path(tmp) / "source"), role=role_for(sm, dry_run))
        try:
            trainer.train(input_data_config=channels(sm) or None, wait=False, logs=False)
        except DryRun as stop:
            return Submission(stop.params, stop.params["TrainingJobName"], hook.uploads, True, dict(hook.files))
    request = hook.sent["CreateTrainingJob"][-1]
    name = request["TrainingJobName"]
    print(f"training job {name}\n  {console_url(sm.region, name)}", flush=True)
    if wait:
        from sagemaker.core.resources import TrainingJob

        TrainingJob.get(training_job_name=name, session=session.boto_session, region=sm.region).wait(logs=True)
    return Submission(request, name, [], False)


def precision_text(cfg: DictConfig, overrides: list[str]) -> str:
    """The dry run's precision line: what the job (``cfg`` composed from ``overrides``) trains in, and why."""
    chosen = [o.split("=", 1)[1] for o in [*overrides, *trainer_overrides(cfg, overrides)]
              if override_key(o) == "trainer.precision"]
    if any(override_key(o) == "trainer.precision" for o in overrides):
        return f"{chosen[-1]} (set on the command line)"
    if str(cfg.trainer.precision) == "auto":
        value, reason = cost.training_precision(cfg.sagemaker.instance_type)
        return f"{value or 'auto'} ({reason})"
    if chosen:
        return f"{chosen[-1]} (the experiment's {cfg.trainer.precision} needs a GPU)"
    return f"{cfg.trainer.precision} (the experiment's trainer.precision)"


def cost_text(sm: DictConfig) -> str:
    """The dry run's cost lines: the chosen instance type, or a note if the table lacks it."""
    try:
        line = cost.estimate(sm.instance_type, sm.instance_count, cost.job_hours(sm))
    except KeyError as err:
        return f"cost: {err.args[0]}"
    return cost.format_table([line])


def parse_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``--dry-run``/``--no-wait`` from the Hydra overrides."""
    parser = argparse.ArgumentParser(prog="python -m sagemaker_launch.launch", add_help=True,
                                     description="Hydra overrides of conf/launch.yaml, plus:")
    parser.add_argument("--dry-run", action="store_true", help="print the request and the cost, send nothing")
    parser.add_argument("--no-wait", action="store_true", help="don't stream the job's log")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> Submission:
    """Compose, check, and submit (or dry-run) one training job; see the module docstring."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags, overrides = parse_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = compose("launch", overrides)
    plan = plan_training_job(cfg, overrides)
    dry_run = flags.dry_run or bool(cfg.sagemaker.dry_run)
    sub = submit_training_job(plan, dry_run=dry_run, wait=bool(cfg.sagemaker.wait) and not flags.no_wait)
    if dry_run:
        print(f"DRY RUN: CreateTrainingJob {sub.job_name} (not sent)")
        print(describe_request(sub.request, sub.uploads))
        print(f"train.py {shlex.join(plan.overrides)}")
        print(f"precision: {precision_text(cfg, overrides)}")
        print(cost_text(cfg.sagemaker))
    return sub


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
