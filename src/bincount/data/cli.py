"""``bincount data fetch|prepare``: the data commands, registered on the ``bincount`` CLI.

Usage:
    bincount data fetch --list file_list.json --out data/abid
    bincount data prepare --in data/abid --out s3://BUCKET/abid/v1 --resize 256
    python -m bincount.data.cli fetch --ids 1-100 --out data/abid      # the same without the wrapper
"""

from __future__ import annotations

import argparse
import logging
import sys

from bincount.data.fetch import add_fetch_parser
from bincount.data.prepare import add_prepare_parser
from bincount.data.s3 import S3Error


def add_data_commands(subparsers) -> None:
    """Add ``data`` with its ``fetch`` and ``prepare`` subcommands to an argparse subparsers object.

    The ``data`` parser sets ``func=run``, so a CLI that dispatches with ``args.func(args)`` needs
    nothing else; each leaf sets ``data_func(args) -> int`` (the exit code), which :func:`run` calls.
    """
    data = subparsers.add_parser("data", help="fetch ABID from S3 and prepare streaming shards")
    commands = data.add_subparsers(dest="data_command", metavar="{fetch,prepare}", required=True)
    add_fetch_parser(commands)
    add_prepare_parser(commands)
    data.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``data`` command; expected failures print one clear line and exit 2."""
    try:
        return args.data_func(args)
    except (S3Error, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m bincount.data.cli fetch|prepare ...``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="bincount data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="data_command", metavar="{fetch,prepare}", required=True)
    add_fetch_parser(commands)
    add_prepare_parser(commands)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
