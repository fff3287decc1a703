"""Tracked runs in MLflow: what ``logger=mlflow`` adds to a training run.

Usage:
    python train.py +experiment=quickstart data.root=../shared/abid logger=mlflow
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python train.py +experiment=quickstart logger=mlflow data.root=DIR
    mlflow ui    # in the folder train.py ran from: its runs in mlflow.db

Lightning's ``MLFlowLogger`` (``conf/logger/mlflow.yaml``) creates the run and logs every metric.
On global rank 0 this module adds tags and the resolved config as params before training
(:func:`start`), and the run folder's outputs as artifacts after export (:func:`log_outputs`).
MLflow and Lightning are imported when a function runs, not with this module.
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

    if not HydraConfig.initialized() or (hydra_cfg := HydraConfig.get()).mode != RunMode.MULTIRUN:
        return None
    return Sweep(dir=str(Path(hydra_cfg.sweep.dir).resolve()), trial=int(hydra_cfg.job.num))


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    """The trainer's ``MLFlowLogger`` on global rank 0; ``None`` on other ranks or without ``logger=mlflow``."""
    from lightning.pytorch.loggers import MLFlowLogger

    if not trainer.is_global_zero:
        return None
    return next((logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)), None)


def sweep_parent(client, experiment_id: str, sweep: Sweep) -> str:
    """The run id of ``sweep``'s parent run (tagged :data:`SWEEP_DIR_TAG`) in the experiment; the
    sweep's first trial creates it. Trials that a parallel launcher starts at the same moment could
    each create one; the sequential launchers create exactly one.

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
def fail_fast() -> Iterator[None]:
    """Within the block, MLflow's HTTP requests are tried once, for at most 10 seconds,
    instead of MLflow's 7 retries with back-off (minutes before an unreachable tracking URI is
    reported). Values the user set are kept; later requests get MLflow's retries back.
    """
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    quick = {MLFLOW_HTTP_REQUEST_MAX_RETRIES: 0, MLFLOW_HTTP_REQUEST_TIMEOUT: 10}
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

    Params are the resolved config flattened by ``MLFlowLogger.log_hyperparams`` (``model/optimizer/lr``).

    Args:
        trainer: The run's trainer; nothing happens where :func:`mlflow_logger` finds none.
        cfg: The composed ``train.yaml`` config.
        out_dir: The run folder.
        sweep: The trial's sweep; default :func:`current_sweep`.
        environ: Where ``TRAINING_JOB_NAME`` is read; default ``os.environ``.

    Returns:
        The run id, or ``None`` when nothing was tracked.

    Raises:
        mlflow.exceptions.MlflowException: If the tracking store cannot be reached or refuses the run.
    """
    logger = mlflow_logger(trainer)
    if logger is None:
        return None
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
    from omegaconf import OmegaConf

    sweep = current_sweep() if sweep is None else sweep
    environ = os.environ if environ is None else environ
    tags = {RUN_DIR_TAG: str(Path(out_dir).resolve())}
    if environ.get("TRAINING_JOB_NAME"):
        tags[JOB_NAME_TAG] = environ["TRAINING_JOB_NAME"]
    if sweep is not None:
        tags[TRIAL_TAG] = str(sweep.trial)
    if OmegaConf.select(cfg, "logger.mlflow.run_name") is None:  # else MLFlowLogger names the run
        # MLflow's made-up names come from Python's random, which the run seeds: one name for every run of a seed
        tags[MLFLOW_RUN_NAME] = f"trial {sweep.trial}" if sweep else "/".join(Path(out_dir).resolve().parts[-2:])
    logger.tags = {**(logger.tags or {}), **tags}
    with fail_fast():  # the first request: an unreachable server fails now, not after minutes of retries
        client, run_id = logger.experiment, logger.run_id  # the run is created here, with those tags
    if sweep is not None:
        client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, sweep_parent(client, logger.experiment_id, sweep))
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return run_id


def log_outputs(trainer: L.Trainer, out_dir: Path) -> None:
    """Log the run folder's outputs as artifacts of the MLflow run; after export, on global rank 0.

    :data:`CONFIG_FILE` and the report's files (:data:`bincount.report.REPORT_FILES`) go to the
    artifact root, ``model/`` to ``model/``. A sweep trial then marks its parent run finished.

    Raises:
        mlflow.exceptions.MlflowException: If the tracking or artifact store refuses the files.
    """
    logger = mlflow_logger(trainer)
    if logger is None:
        return
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
