"""Run bincount's Hydra experiments as SageMaker jobs.

Commands (``python -m sagemaker_launch.<name>``): ``launch`` (compose the training config here, then
start a training job), ``tune`` (a hyperparameter tuning job over an ``hparams_search`` space),
``deploy`` (model, endpoint config, endpoint; invoke; delete), ``register`` (a model package with
the run's held-out metrics, approved if better), ``transform`` (a Batch Transform job counting every
photo under an S3 prefix) and ``cost`` (instance-hours x price). The Hydra launcher
``hydra/launcher=sagemaker`` (``hydra_plugins``) runs a multirun's jobs through ``launch``.

Their parts: ``plan`` (the job's decisions from the config, nothing sent), ``hyperparameters``
(Hydra overrides <-> SageMaker hyperparameters, both ways), ``session`` (the boto3/SDK session,
recorded in dry runs), ``source`` (the wheel and scripts a job runs), ``model_archive`` (``model.tar.gz``
for the PyTorch serving image), ``serving_models`` (the serving image, and CreateModel from a job, a
``model.tar.gz`` or a model package, for deploy and transform), ``model_packages`` (model package groups,
packages, approval, the latest approved package), ``run_report`` (a run's held-out evaluation,
for ``register``), ``invoke`` (asking an endpoint for counts in bodies that fit its limit). On
the container side, ``container_init.sh`` is PID 1, ``container`` reads the job's folders and
ranks, and ``entry`` decodes the hyperparameters and runs ``train(cfg)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def run(main: Callable[[], object]) -> None:
    """Run a command's ``main()``, its log lines (INFO and up) on stderr: an expected failure prints
    one ``error:`` line and exits 2.

    Expected: a config typo or missing value (Hydra, OmegaConf), a value the launcher refuses
    (``ValueError``, ``KeyError``), a file that is not there (``OSError``), the job's wheel failing
    to build (:class:`sagemaker_launch.source.WheelBuildError`), and AWS saying no or not being
    reachable (botocore: no credentials, access denied, a missing resource). Anything else is a bug
    and keeps its traceback.
    """
    from botocore.exceptions import BotoCoreError, ClientError
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bincount.errors import error_line
    from sagemaker_launch.source import WheelBuildError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (HydraException, OmegaConfBaseException, ValueError, KeyError, OSError, WheelBuildError, BotoCoreError,
            ClientError) as err:
        if isinstance(err, KeyError) and err.args:
            err = ValueError(err.args[0])
        hint = " (configure AWS credentials, or add --dry-run)" if type(err).__name__ == "NoCredentialsError" else ""
        print(error_line(err) + hint, file=sys.stderr)
        sys.exit(2)
