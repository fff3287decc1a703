"""Files and folders that are complete or absent: written under a temporary name, then renamed."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

PART_SUFFIX = ".part"
# a failed write() (full disk, quota, I/O error) raises an OSError that names no file
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it to ``path``.

    On any failure (a signal handler's exception included) the temporary file is removed, and a
    write error that names no file (or the temporary one) is raised again naming ``path``.

    Args:
        path: The file to write.
        mode, **open_kwargs: ``open`` arguments (``"wb"``, ``newline=""`` for CSV).

    Yields:
        The open temporary file.

    Raises:
        OSError: If the file cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{PART_SUFFIX}")
    with _removed_on_failure(tmp, path, lambda: tmp.unlink(missing_ok=True)):
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)


@contextmanager
def _removed_on_failure(tmp: Path, path: Path, remove: Callable[[], None]) -> Iterator[None]:
    """On any failure in the block, ``remove()`` the temporary ``tmp``; an OSError naming ``tmp`` (or a
    file in it) or, for a failed write, no file, is raised again naming ``path``."""
    try:
        yield
    except BaseException as err:
        with suppress(OSError):
            remove()
        named = isinstance(err, OSError) and err.filename is not None and (
            str(err.filename) == str(tmp) or str(err.filename).startswith(f"{tmp}/"))
        if named or (isinstance(err, OSError) and err.filename is None and err.errno in WRITE_ERRNOS):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path``, complete or not at all (:func:`atomic_write`).

    Raises:
        OSError: If the file cannot be written.
    """
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=1) + "\n")


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target`` by renames (``new`` is on ``target``'s file system).

    An existing ``target`` is first renamed aside (``<new>-replaced``), then removed: killed at any
    moment, ``target`` is the old folder or the new one, whole, or absent.

    Raises:
        OSError: If a rename fails.
    """
    if not target.exists():
        os.rename(new, target)
        return
    aside = new.with_name(f"{new.name}-replaced")
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A staging folder beside ``path``, renamed to ``path`` (replacing it) when the block ends without
    an error; on any failure it is removed. A process killed outright leaves its staging folder
    (``.<name>.<pid>.part``), which the next writer of ``path`` removes.

    Yields:
        The empty staging folder to write into.

    Raises:
        OSError: If the folder cannot be written; a write error that names no file, or a file in
            the staging folder, is raised again naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*{PART_SUFFIX}*"):
        match = re.fullmatch(rf"\.{re.escape(path.name)}\.(\d+){re.escape(PART_SUFFIX)}(-replaced)?", stale.name)
        if match and (int(match.group(1)) == os.getpid() or not is_running(int(match.group(1)))):
            shutil.rmtree(stale, ignore_errors=True)
    stage = path.with_name(f".{path.name}.{os.getpid()}{PART_SUFFIX}")
    stage.mkdir()
    with _removed_on_failure(stage, path, lambda: shutil.rmtree(stage, ignore_errors=True)):
        yield stage
        replace_folder(stage, path)
