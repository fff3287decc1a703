"""Files that are complete or absent: written through a temporary file and a rename."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

PART_SUFFIX = ".part"
# a failed write() (full disk, quota, I/O error) raises an OSError that names no file
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it to ``path``.

    ``path`` is untouched until the new file is complete. On any failure, an exception raised by
    a signal handler included, the temporary file is removed (if it was made), and a write error
    that names no file (or names the temporary one) is raised again naming ``path``, so the user
    reads the file they asked for.

    Args:
        path: The file to write.
        mode: ``open`` mode (``"w"``, ``"wb"``).
        **open_kwargs: More ``open`` arguments (``newline=""`` for CSV).

    Yields:
        The open temporary file.

    Raises:
        OSError: If the file cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{PART_SUFFIX}")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        if err.filename == str(tmp) or (err.filename is None and err.errno in WRITE_ERRNOS):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    """Remove a temporary file after a failure; one that could not be made (a read-only folder) or
    removed is left to the error being raised, which says more."""
    with suppress(OSError):
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path``, complete or not at all (:func:`bincount.atomic.atomic_write`).

    Raises:
        OSError: If the file cannot be written.
    """
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=1) + "\n")
