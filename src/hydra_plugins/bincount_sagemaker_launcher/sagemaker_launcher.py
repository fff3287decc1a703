"""A Hydra launcher that submits every job of a multirun as a SageMaker training job.

Usage:
    python train.py -m hydra/launcher=sagemaker sagemaker=gpu_single sagemaker.inputs.train=s3://BUCKET/abid/subset \
        +experiment=resnet18_subset model.optimizer.lr=0.0003,0.001,0.003
    python train.py -m hydra/launcher=sagemaker sagemaker=cpu sagemaker.dry_run=true \
        +experiment=quickstart sagemaker.inputs.train=s3://BUCKET/abid/sample data.batch_size=16,32

Each job is planned and submitted as by ``python -m sagemaker_launch.launch``, without waiting; its
return value is the training job's name. ``hydra/launcher=sagemaker`` adds the ``sagemaker`` group
(default ``gpu_single``), so ``sagemaker.*`` overrides read as for that command. Jobs are named
``<base_job_name>-<sweep>-<job number>-<time>``, ``<sweep>`` the sweep's start (``%y%m%d%H%M%S``),
so jobs and sweeps share no names or S3 prefixes (a ``sagemaker.checkpoint_s3_uri`` gets
``/<base_job_name>-<sweep>-<job number>`` appended). Sweepers that need each job's objective back
(Optuna): ``python -m sagemaker_launch.tune``.

Module-level imports are Hydra's only: Hydra imports every ``hydra_plugins`` module when it starts,
inside training containers too, where the SageMaker SDK is not installed. (No ``from __future__
import annotations`` either: Hydra loads the module outside ``sys.modules``, where a dataclass with
string annotations fails, and with it every Hydra command.)
"""

import logging
from datetime import datetime
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


LAUNCHER_TARGET = "hydra_plugins.bincount_sagemaker_launcher.sagemaker_launcher.SageMakerLauncher"

# package _global_: its defaults list puts the `sagemaker` group at the root of the job config (as
# conf/launch.yaml does), so `sagemaker=cpu` / `sagemaker.x=y` overrides compose for the sweep too
ConfigStore.instance().store(group="hydra/launcher", name="sagemaker", package="_global_", provider="bincount",
                             node={"defaults": [{"/sagemaker": "gpu_single"}],
                                   "hydra": {"launcher": {"_target_": LAUNCHER_TARGET}}})


class SageMakerLauncher(Launcher):
    """Submits each job's overrides as a SageMaker training job (see the module docstring)."""

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.sweep = datetime.now().strftime("%y%m%d%H%M%S")

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Plan, check and submit one training job per override list (``sagemaker.dry_run``: print it).

        Returns:
            One ``JobReturn`` per job, its ``return_value`` the training job's name.

        Raises:
            ImportError: If ``sagemaker_launch`` or the SageMaker SDK can't be imported (the sagemaker extra
                is not installed).
        """
        try:
            import sagemaker.train  # noqa: F401  (the SDK: missing, say so before any job is planned)
            from sagemaker_launch.launch import submit_training_job
            from sagemaker_launch.plan import job_base_name, plan_training_job
            from sagemaker_launch.session import describe_request
        except ImportError as err:
            raise ImportError("hydra/launcher=sagemaker needs the SageMaker SDK: pip install 'bincount[sagemaker]' "
                              f"({err})") from err
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        runs: List[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            overrides = list(overrides)
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            dry_run = bool(cfg.sagemaker.dry_run)
            if idx == initial_job_idx:
                log.info("Submitting %d jobs to SageMaker%s", len(job_overrides), " (dry run)" if dry_run else "")
            with open_dict(cfg):
                cfg.hydra.job.id = cfg.hydra.job.num = idx
                sm = cfg.sagemaker
                sm.base_job_name = job_base_name(str(sm.base_job_name), f"-{self.sweep}-{idx}")
                if sm.checkpoint_s3_uri:
                    sm.checkpoint_s3_uri = f"{str(sm.checkpoint_s3_uri).rstrip('/')}/{sm.base_job_name}"
            sub = submit_training_job(plan_training_job(cfg, overrides), dry_run=dry_run, wait=False)
            log.info("\t#%d : %s -> %s", idx, " ".join(filter_overrides(overrides)), sub.job_name)
            if dry_run:
                print(f"DRY RUN: CreateTrainingJob {sub.job_name} (not sent)")
                print(describe_request(sub.request, sub.uploads))
            runs.append(JobReturn(overrides=overrides, cfg=cfg, hydra_cfg=cfg.hydra, task_name=cfg.hydra.job.name,
                                  status=JobStatus.COMPLETED, _return_value=sub.job_name))
        return runs
