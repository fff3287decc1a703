"""One ``error:`` line for an expected failure, the same in every command: ``bincount``,
``train.py``, ``eval.py`` and ``python -m sagemaker_launch.*``.

Expected failures are bad input and the world saying no: a wrong value or a missing file
(``ValueError``, ``OSError``), an S3 error, an unreachable MLflow server. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_STATUS = 2  # as argparse exits on a usage error


def error_line(err: BaseException) -> str:
    """The one line (no newline) a command prints for an expected failure: ``error: <file>: <what the
    system said>`` for an operating-system error, the first line of an MLflow error's message (the rest
    is the server's answer), else ``error: <its message>``.
    """
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"error: {where}: {err.strerror}" if where else f"error: {err.strerror}"
    if type(err).__module__.startswith("mlflow."):
        return f"error: {str(err).strip().splitlines()[0]}"
    return f"error: {err}"


def expected_failure(err: BaseException) -> BaseException | None:
    """The expected failure behind ``err``, or ``None`` when ``err`` is a bug.

    Hydra wraps an error raised while instantiating a config node (``InstantiationException``);
    the error it wraps is the one the user needs.
    """
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, (ValueError, OSError)) or type(err).__module__.startswith(("mlflow.", "bincount.data.s3")):
        return err
    return None


def one_error_line(main: Callable[..., T]) -> Callable[..., T]:
    """Make ``main`` print :func:`error_line` and exit with :data:`EXIT_STATUS` on an expected
    failure (:func:`expected_failure`) instead of a traceback; under ``@hydra.main`` too.

    Raises:
        SystemExit: :data:`EXIT_STATUS`, on an expected failure.
        Exception: Any other error (a bug), with its traceback.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised unless expected_failure says otherwise
            if (expected := expected_failure(err)) is None:
                raise
            print(error_line(expected), file=sys.stderr)
            raise SystemExit(EXIT_STATUS) from None

    return wrapped


def run_command(func: Callable[[T], int], args: T) -> int:
    """A command's exit code: ``func(args)``, or :data:`EXIT_STATUS` after :func:`one_error_line`'s line."""
    try:
        return one_error_line(func)(args)
    except SystemExit as exit_:
        return exit_.code
