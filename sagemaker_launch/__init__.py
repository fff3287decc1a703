"""Run bincount's Hydra experiments as SageMaker jobs.

``launch`` (compose the training config locally -> a training job), ``entry`` (the job's container
side), ``tune`` (a hyperparameter tuning job over an ``hparams_search`` space), ``deploy``
(model, endpoint config, endpoint; invoke; delete) and ``cost`` (instance-hours x price).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(main: Callable[[], object]) -> None:
    """Run a command's ``main()``: an expected failure prints one ``error:`` line and exits 2.

    Expected: a config typo or missing value (Hydra, OmegaConf), a value the launcher refuses
    (``ValueError``, ``KeyError``), a file that is not there (``OSError``), the job's wheel failing
    to build (:class:`sagemaker_launch.source.WheelBuildError`), and AWS saying no or not being
    reachable (botocore: no credentials, access denied, a missing resource). Anything else is a bug
    and keeps its traceback.
    """
    from botocore.exceptions import BotoCoreError, ClientError
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bincount.cli import error_line
    from sagemaker_launch.source import WheelBuildError

    try:
        main()
    except (HydraException, OmegaConfBaseException, ValueError, KeyError, OSError, WheelBuildError, BotoCoreError,
            ClientError) as err:
        if isinstance(err, KeyError) and err.args:
            err = ValueError(err.args[0])
        hint = " (configure AWS credentials, or add --dry-run)" if type(err).__name__ == "NoCredentialsError" else ""
        print(error_line(err) + hint, file=sys.stderr)
        sys.exit(2)
