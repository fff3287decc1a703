"""Run bincount's Hydra experiments as SageMaker jobs: ``python -m sagemaker_launch.<command>`` for
``launch``, ``tune``, ``deploy``, ``register``, ``transform`` and ``cost``, and the Hydra launcher
``hydra/launcher=sagemaker`` (``hydra_plugins``); each module's part: ``docs/sagemaker.md``.
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
