"""Tracked runs in MLflow: what ``logger=mlflow`` adds to a training run.

Usage:
    python train.py +experiment=quickstart data.root=../shared/abid logger=mlflow
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python train.py +experiment=quickstart logger=mlflow data.root=DIR
    mlflow ui    # in the folder train.py ran from: its runs in mlflow.db

Lightning's ``MLFlowLogger`` (``conf/logger/mlflow.yaml``) creates the run and logs every metric
the module logs (``train/loss`` per step, ``val/*`` and ``test/*`` per epoch). On global rank 0
this module adds, before training (:func:`start`): tags (the run folder; the SageMaker training
job; the sweep trial and its parent run) and the resolved config as params; and after export
(:func:`log_outputs`): the run folder's ``config.yaml``, report files and ``model/`` as artifacts.

MLflow itself is imported only when a run has an ``MLFlowLogger``; Lightning, when a function
runs (``bincount runs`` reads the tag names without either).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from omegaconf import DictConfig

RUN_DIR_TAG = "bincount.run_dir"  # the run folder (absolute) on the machine that trained
JOB_NAME_TAG = "sagemaker.training_job_name"  # $TRAINING_JOB_NAME, set by SageMaker in a job's container
SWEEP_DIR_TAG = "bincount.sweep_dir"  # on a sweep's parent run only: the sweep folder (absolute)
TRIAL_TAG = "bincount.sweep_trial"  # on a sweep's trial: its hydra.job.num
CONFIG_FILE = "config.yaml"  # the run's resolved config, written by bincount.train.train
MODEL_ARTIFACT = "model"  # the exported model/ folder (bincount.models.export.save_model_dir)


@dataclass(frozen=True)
class Sweep:
    """A Hydra multirun job's place in its sweep.

    Attributes:
        dir: The sweep folder (``hydra.sweep.dir``), absolute: one parent run per folder.
        trial: The job's number in the sweep (``hydra.job.num``).
    """

    dir: str
    trial: int


def current_sweep() -> Sweep | None:
    """The :class:`Sweep` of this Hydra multirun job, or ``None`` in a single run or outside ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Sweep(dir=str(Path(hydra_cfg.sweep.dir).resolve()), trial=int(hydra_cfg.job.num))


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    """The trainer's ``MLFlowLogger``, or ``None`` without ``logger=mlflow``."""
    from lightning.pytorch.loggers import MLFlowLogger

    return next((logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)), None)


def run_tags(out_dir: Path, sweep: Sweep | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The tags a run is created with: :data:`RUN_DIR_TAG`, and :data:`JOB_NAME_TAG` in a SageMaker
    job (``TRAINING_JOB_NAME`` in ``environ``) or :data:`TRIAL_TAG` in a sweep."""
    tags = {RUN_DIR_TAG: str(Path(out_dir).resolve())}
    if environ.get("TRAINING_JOB_NAME"):
        tags[JOB_NAME_TAG] = environ["TRAINING_JOB_NAME"]
    if sweep is not None:
        tags[TRIAL_TAG] = str(sweep.trial)
    return tags


def run_name(out_dir: Path, sweep: Sweep | None) -> str:
    """A run's name when the config gives none: ``trial <n>`` in a sweep (under its parent, named
    ``sweep <date>/<time>``), else the run folder's last two parts (``outputs/2026-12-03/06-35-00``
    -> ``2026-12-03/06-35-00``). MLflow's own made-up names come from Python's ``random``, which the
    run seeds: every run of one seed would get the same name."""
    return f"trial {sweep.trial}" if sweep is not None else "/".join(Path(out_dir).resolve().parts[-2:])


def sweep_parent(client, experiment_id: str, sweep: Sweep) -> str:
    """The run id of ``sweep``'s parent run in the experiment; the sweep's first trial creates it.

    The parent is the run tagged :data:`SWEEP_DIR_TAG` with the sweep folder; it holds no params
    or metrics, only its trials (tagged ``mlflow.parentRunId``, how MLflow nests runs). Trials that
    a parallel launcher starts at the same moment could each create one; the sequential launchers
    (Hydra's basic launcher, the Optuna sweeper with ``n_jobs: 1``) create exactly one.

    Args:
        client: An ``mlflow.MlflowClient`` of the run's tracking URI.
        experiment_id: The trials' experiment.
        sweep: The trial's sweep.

    Returns:
        The parent's run id.

    Raises:
        mlflow.exceptions.MlflowException: If the tracking store refuses the search or the run.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{sweep.dir}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    name = "sweep " + "/".join(Path(sweep.dir).parts[-2:])  # multirun/<date>/<time> -> "sweep <date>/<time>"
    return client.create_run(experiment_id, tags={SWEEP_DIR_TAG: sweep.dir, MLFLOW_RUN_NAME: name}).info.run_id


@contextmanager
def fail_fast(timeout_s: int = 10) -> Iterator[None]:
    """Within the block, MLflow's HTTP requests are tried once, for at most ``timeout_s`` seconds.

    MLflow retries a request 7 times with exponential back-off and a 120 s timeout
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``): minutes before a wrong
    or unreachable tracking URI is reported. Values the user set are kept; later requests (a
    training's metrics) get MLflow's retries back.
    """
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    quick = {MLFLOW_HTTP_REQUEST_MAX_RETRIES: 0, MLFLOW_HTTP_REQUEST_TIMEOUT: timeout_s}
    unset = [variable for variable in quick if not variable.defined]
    for variable in unset:
        variable.set(quick[variable])
    try:
        yield
    finally:
        for variable in unset:
            variable.unset()


def start(trainer: L.Trainer, cfg: DictConfig, out_dir: Path, *, sweep: Sweep | None = None,
          environ: Mapping[str, str] | None = None) -> str | None:
    """Create the MLflow run (tags, sweep parent) and log ``cfg`` as its params; before ``trainer.fit``.

    Params are the resolved config flattened by Lightning's ``MLFlowLogger.log_hyperparams`` (keys
    such as ``model/optimizer/lr``; values cut at 250 characters). Lightning adds the module's own
    hyperparameters (``arch``, ``max_count``, ...) when training starts.

    Args:
        trainer: The run's trainer; without an ``MLFlowLogger``, or on any rank but global rank 0,
            nothing happens.
        cfg: The composed, resolvable ``train.yaml`` config.
        out_dir: The run folder.
        sweep: The trial's sweep; default :func:`current_sweep`.
        environ: Where ``TRAINING_JOB_NAME`` is read; default ``os.environ``.

    Returns:
        The run id, or ``None`` when nothing was tracked.

    Raises:
        mlflow.exceptions.MlflowException: If the tracking store cannot be reached or refuses the run.
    """
    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return None
    sweep = current_sweep() if sweep is None else sweep
    tags = run_tags(out_dir, sweep, os.environ if environ is None else environ)
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "logger.mlflow.run_name") is None:  # else MLFlowLogger names the run
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        tags[MLFLOW_RUN_NAME] = run_name(out_dir, sweep)
    logger.tags = {**(logger.tags or {}), **tags}
    with fail_fast():  # the first request: an unreachable server fails now, not after minutes of retries
        client, run_id = logger.experiment, logger.run_id  # the run is created here, with those tags
    if sweep is not None:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, sweep_parent(client, logger.experiment_id, sweep))
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return run_id


def log_outputs(trainer: L.Trainer, out_dir: Path) -> str | None:
    """Log the run folder's outputs as artifacts of the MLflow run; after export, on global rank 0.

    :data:`CONFIG_FILE` and the report's files (:data:`bincount.report.REPORT_FILES`) that exist
    go to the artifact root, the exported ``model/`` folder to
    ``model/``. A sweep trial then marks its parent run finished (its end time becomes the last
    trial's).

    Args:
        trainer: The run's trainer; without an ``MLFlowLogger``, or on any rank but global rank 0,
            nothing happens.
        out_dir: The run folder.

    Returns:
        The run id, or ``None`` when nothing was tracked.

    Raises:
        mlflow.exceptions.MlflowException: If the tracking or artifact store refuses the files.
    """
    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return None
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from bincount.report import REPORT_FILES

    client, run_id = logger.experiment, logger.run_id
    for name in (CONFIG_FILE, *REPORT_FILES):
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name))
    if (out_dir / MODEL_ARTIFACT).is_dir():
        client.log_artifacts(run_id, str(out_dir / MODEL_ARTIFACT), MODEL_ARTIFACT)
    parent = client.get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID)
    if parent:
        client.set_terminated(parent)
    return run_id
