"""A Hydra launcher that submits every job of a multirun as a SageMaker training job.

Usage:
    python train.py -m hydra/launcher=sagemaker +sagemaker=gpu_single sagemaker.inputs.train=s3://BUCKET/abid/subset \
        +experiment=resnet18_subset model.optimizer.lr=0.0003,0.001,0.003
    python train.py -m hydra/launcher=sagemaker hydra.launcher.sagemaker=cpu hydra.launcher.dry_run=true \
        +experiment=quickstart sagemaker.inputs.train=s3://BUCKET/abid/sample data.batch_size=16,32

Run it from the repository root: the job requests are built by ``sagemaker_launch.launch`` (not part
of the installed package). ``+sagemaker=<name>`` picks ``conf/sagemaker/<name>.yaml`` and lets
``sagemaker.*`` overrides follow; without it the launcher's ``sagemaker`` option applies. Each job
is planned and checked exactly as ``python -m sagemaker_launch.launch`` would (a fresh ModelTrainer
per job, named ``<base_job_name>-<job number>-<time>``), then submitted without waiting; the job's
return value is the training job's name.

Sweepers that need each job's objective back (Optuna) can't wait on this launcher: use
``python -m sagemaker_launch.tune`` for a search. The jobs never run Hydra multirun themselves
(the container composes one config), so Lightning's DDP never re-runs a sweep.

Module-level imports are Hydra's only: Hydra imports every ``hydra_plugins`` module when it starts,
inside training containers too, where the SageMaker SDK is not installed. (No ``from __future__
import annotations`` either: Hydra loads the module outside ``sys.modules``, where a dataclass with
string annotations fails, and with it every Hydra command.)
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class SageMakerLauncherConf:
    """``hydra.launcher`` for ``hydra/launcher=sagemaker``.

    Attributes:
        sagemaker: ``conf/sagemaker/<name>.yaml`` for jobs whose overrides pick none.
        dry_run: Print each request instead of sending it.
    """

    _target_: str = "hydra_plugins.bincount_sagemaker_launcher.sagemaker_launcher.SageMakerLauncher"
    sagemaker: str = "gpu_single"
    dry_run: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="sagemaker", node=SageMakerLauncherConf, provider="bincount")


class SageMakerLauncher(Launcher):
    """Submits each job's overrides as a SageMaker training job (see the module docstring)."""

    def __init__(self, sagemaker: str = "gpu_single", dry_run: bool = False) -> None:
        self.sagemaker = sagemaker
        self.dry_run = dry_run
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Plan, check and submit one training job per override list.

        Returns:
            One ``JobReturn`` per job, its ``return_value`` the training job's name.

        Raises:
            ImportError: If ``sagemaker_launch`` can't be imported (run from the repository root).
        """
        try:
            from sagemaker_launch.launch import describe_request, plan_training_job, submit_training_job
        except ImportError as err:
            raise ImportError("hydra/launcher=sagemaker needs sagemaker_launch/ and the SageMaker SDK: run from the "
                              "repository root with the sagemaker extra installed (pip install -e '.[sagemaker]')"
                              ) from err
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        log.info("Submitting %d jobs to SageMaker%s", len(job_overrides), " (dry run)" if self.dry_run else "")
        runs: List[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            overrides = list(overrides)
            loader = self.hydra_context.config_loader
            cfg = loader.load_sweep_config(self.config, overrides)
            if "sagemaker" not in cfg:
                overrides = [f"+sagemaker={self.sagemaker}", *overrides]
                cfg = loader.load_sweep_config(self.config, overrides)
            with open_dict(cfg):
                cfg.hydra.job.id = cfg.hydra.job.num = idx
                # job names are <base>-<second>: jobs submitted within one second need distinct bases
                cfg.sagemaker.base_job_name = f"{cfg.sagemaker.base_job_name}-{idx}"
            sub = submit_training_job(plan_training_job(cfg, overrides), dry_run=self.dry_run, wait=False)
            log.info("\t#%d : %s -> %s", idx, " ".join(filter_overrides(overrides)), sub.job_name)
            if self.dry_run:
                print(describe_request(sub.request, sub.uploads))
            runs.append(JobReturn(overrides=overrides, cfg=cfg, hydra_cfg=cfg.hydra, task_name=cfg.hydra.job.name,
                                  status=JobStatus.COMPLETED, _return_value=sub.job_name))
        return runs
