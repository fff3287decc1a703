"""Plan a SageMaker training job from the composed ``conf/launch.yaml`` config: decisions only, nothing
is sent or uploaded (the SDK is used only for :func:`training_image`'s table lookup).

:func:`plan_training_job` checks the config (a typo or a missing value fails here, before a job is
paid for) and decides the overrides the container composes ``conf/train.yaml`` with (the training
config's, plus the trainer the instance type needs), their hyperparameters, the container environment,
the profiler settings, the image, and the metric definitions SageMaker reads from the log.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from bincount.callbacks import metric_regex
from sagemaker_launch import cost
from sagemaker_launch.hyperparameters import encode_overrides, override_key, override_value

CHECKPOINT_DIR = "/opt/ml/checkpoints"
# override roots that configure the launch, not the training run
LAUNCHER_KEYS = ("sagemaker", "hydra", "hparams_search")
# ModelTrainer names a job "<base_job_name>-%Y%m%d%H%M%S" and cuts the name to 63 characters:
# a longer base would lose the timestamp, and launches would collide
JOB_NAME_MAX = 63
BASE_JOB_NAME_MAX = JOB_NAME_MAX - len("-20250101000000")
METRICS = ("val/acc", "val/acc_best", "val/mae", "val/mae_best", "val/rmse", "val/obo_acc", "val/loss",
           "test/acc", "test/mae", "test/rmse", "test/obo_acc")


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides a training job gets: those of the training config (not ``sagemaker.*``,
    ``hydra.*``, ``hydra/launcher=...``, ``hparams_search``)."""
    return [o for o in overrides if re.split(r"[./]", override_key(o))[0] not in LAUNCHER_KEYS]


def check_config(cfg: DictConfig, overrides: list[str]) -> None:
    """Fail here, not in a paid job: every value must resolve and the job must find data.

    Raises:
        omegaconf.errors.OmegaConfBaseException: A missing value (``???``) or a broken interpolation.
        ValueError: The data config reads a folder (``data.root``) but no ``train`` channel is given,
            streams from a ``data.uri`` the job can't reach (a local path), or ``sagemaker.*`` values
            SageMaker would refuse: a ``base_job_name`` longer than :data:`BASE_JOB_NAME_MAX` (the
            SDK's timestamp suffix would be cut off) or not letters, digits and single dashes or
            underscores between them, a spot ``max_wait_hours`` below ``max_run_hours``.
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
    sm, base = cfg.sagemaker, str(cfg.sagemaker.base_job_name)
    if len(base) > BASE_JOB_NAME_MAX:
        raise ValueError(f"sagemaker.base_job_name={base!r} has {len(base)} characters, at most {BASE_JOB_NAME_MAX}: "
                         f"job names are <base>-<timestamp> cut to {JOB_NAME_MAX}, so a longer base loses the "
                         "timestamp and launches collide")
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", base.replace("_", "-")):
        raise ValueError(f"sagemaker.base_job_name={base!r}: letters, digits, '-' and '_' only, starting and ending "
                         "with a letter or digit (SageMaker's job name pattern)")
    if sm.spot and sm.max_wait_hours < sm.max_run_hours:
        raise ValueError(f"sagemaker.max_wait_hours={sm.max_wait_hours} < max_run_hours={sm.max_run_hours}: "
                         "spot needs max_wait >= max_run")


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
        hyperparameters: ``overrides`` encoded for SageMaker (``{"overrides": ...}``).
        processes: Processes per instance (torchrun when ``processes * instance_count > 1``).
        image_uri: The training image.
        environment: Container environment.
        profiler: ``ProfilerConfig`` of the request but its ``S3OutputPath``
            (:func:`sagemaker_launch.launch.profiler_config`), or ``None``.
        sagemaker: The composed ``sagemaker`` config.
        extras: bincount's extras the container installs with it (:func:`install_extras`).
    """

    overrides: list[str]
    hyperparameters: dict[str, str]
    processes: int
    image_uri: str
    environment: dict[str, str]
    profiler: dict[str, Any] | None
    sagemaker: DictConfig = field(repr=False)
    extras: tuple[str, ...] = ()

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


def install_extras(cfg: DictConfig) -> tuple[str, ...]:
    """bincount's extras a job's container needs beyond its dependencies: ``track`` (MLflow and the
    SageMaker MLflow plugin) when a ``cfg.logger`` entry is Lightning's ``MLFlowLogger`` (``logger=mlflow``)."""
    targets = [str(c.get("_target_", "")) for c in (cfg.get("logger") or {}).values() if c is not None]
    return ("track",) if any(t.rsplit(".", 1)[-1] == "MLFlowLogger" for t in targets) else ()


def plan_training_job(cfg: DictConfig, overrides: list[str]) -> TrainingJobPlan:
    """Check ``cfg`` (composed from ``overrides``) and decide the job.

    Raises:
        ValueError: See :func:`check_config` and :func:`sagemaker_launch.hyperparameters.encode_overrides`.
        KeyError: An instance type the price table doesn't know, without ``processes_per_instance``.
    """
    check_config(cfg, overrides)
    sm = cfg.sagemaker
    run = job_overrides(overrides) + trainer_overrides(cfg, overrides)
    if sm.profiler and override_value(run, "trainer.profiler") is None:
        run.append("++trainer.profiler=simple")
    profiler = None
    if sm.profiler:  # S3OutputPath: the session's bucket, known once there is a session (profiler_config)
        profiler = {"ProfilingIntervalInMilliseconds": int(sm.profiler_interval_ms), "DisableProfiler": False}
    environment = {"SM_CHECKPOINT_DIR": CHECKPOINT_DIR, "PYTHONUNBUFFERED": "1",
                   **{str(k): str(v) for k, v in (sm.environment or {}).items()}}
    return TrainingJobPlan(overrides=run, hyperparameters=encode_overrides(run), processes=processes_per_instance(sm),
                           image_uri=training_image(sm), environment=environment, profiler=profiler,
                           sagemaker=sm, extras=install_extras(cfg))


def metric_definitions() -> list[dict[str, str]]:
    """``[{"Name": "val/acc", "Regex": ...}, ...]`` for :class:`bincount.callbacks.MetricLines` lines."""
    return [{"Name": name, "Regex": metric_regex(name)} for name in METRICS]


def precision_text(cfg: DictConfig, overrides: list[str]) -> str:
    """The dry run's precision line: what the job (``cfg`` composed from ``overrides``) trains in, and why."""
    if (given := override_value(overrides, "trainer.precision")) is not None:
        return f"{given} (set on the command line)"
    if str(cfg.trainer.precision) == "auto":
        value, reason = cost.training_precision(cfg.sagemaker.instance_type)
        return f"{value or 'auto'} ({reason})"
    if added := override_value(trainer_overrides(cfg, overrides), "trainer.precision"):
        return f"{added} (the experiment's {cfg.trainer.precision} needs a GPU)"
    return f"{cfg.trainer.precision} (the experiment's trainer.precision)"


def cost_text(sm: DictConfig) -> str:
    """The dry run's cost lines: the chosen instance type, or a note if the table lacks it."""
    try:
        line = cost.estimate(sm.instance_type, sm.instance_count, cost.job_hours(sm))
    except KeyError as err:
        return f"cost: {err.args[0]}"
    return cost.format_table([line])
