"""One split of ``bincount data prepare``: its photos decoded, checked and written as litdata chunks."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.util import register_after_fork
from pathlib import Path

import torch
from torchvision.io import encode_jpeg
from torchvision.transforms.v2 import functional as F

from bincount.data.abid import IMAGE_DIR, BinRecord
from bincount.data.decode import decode_rgb_bytes
from bincount.data.shards import make_sample
from bincount.data.workers import die_with_parent

REJECTS_DIR = ".rejects"  # in the output while a split is optimized: one <image_id>.txt per rejected photo


@dataclass(frozen=True)
class SampleEncoder:
    """The ``litdata.optimize`` function: one photo -> one sample, or ``None`` if it does not decode.

    Its inputs are positions into ``records`` rather than paths: litdata treats path inputs as
    files to stage and waits on them, which costs seconds per split.

    Its worker processes die with the process that made it (:func:`die_with_parent`), armed
    before a worker runs: a forked worker arms in :mod:`multiprocessing`'s after-fork hook, a
    spawned one (litdata's default) as it unpickles this object. (A ``forkserver`` worker is
    not the maker's child and is not covered.)

    Attributes:
        root: The ABID folder.
        records: ``(image_id, expected_quantity)`` of the split.
        resize: Scale photos whose shorter side is larger down to this many pixels (``None``: keep).
        quality: JPEG quality of re-encoded photos.
        reject_dir: Folder where a rejected photo leaves ``<image_id>.txt`` with the reason (the
            optimize workers are separate processes; this is how the parent learns of rejects).
        parent_pid: The process whose workers these are (default: this one).
    """

    root: str
    records: Sequence[tuple[str, int]]
    resize: int | None
    quality: int
    reject_dir: str
    parent_pid: int = field(default_factory=os.getpid)

    def __post_init__(self) -> None:
        register_after_fork(self, SampleEncoder._in_worker)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._in_worker()  # spawned: multiprocessing runs no after-fork hook

    def _in_worker(self) -> None:
        die_with_parent(self.parent_pid)
        # one thread a worker, as in a DataLoader worker: the workers share the cores, and a forked
        # worker that entered OpenMP's thread pool inherited from its parent would hang in it
        torch.set_num_threads(1)

    def __call__(self, position: int) -> dict | None:
        """The sample of ``records[position]``: ``{"image_id": str, "count": int, "image": bytes}``,
        or ``None`` when the photo does not decode."""
        image_id, count = self.records[position]
        try:
            data = Path(self.root, IMAGE_DIR, f"{image_id}.jpg").read_bytes()
            image = decode_rgb_bytes(data)
        except (OSError, ValueError) as err:
            Path(self.reject_dir, f"{image_id}.txt").write_text(str(err))
            return None
        height, width = image.shape[-2:]
        if self.resize is not None and min(height, width) > self.resize:
            scale = self.resize / min(height, width)
            size = [max(self.resize, round(height * scale)), max(self.resize, round(width * scale))]
            data = encode_jpeg(F.resize(image, size, antialias=True), quality=self.quality).numpy().tobytes()
        return make_sample(image_id, count, data)


def optimize_split(
    root: Path,
    records: Sequence[BinRecord],
    out_dir: Path,
    *,
    resize: int | None,
    quality: int,
    chunk_bytes: str | int,
    num_workers: int,
    start_method: str | None,
) -> tuple[dict[str, str], dict]:
    """Write one split's chunks and ``index.json`` into ``out_dir`` with ``litdata.optimize``.

    Args:
        root: The ABID folder.
        records: The split's photos.
        out_dir: The split's folder (its parent holds :data:`REJECTS_DIR` meanwhile).
        resize, quality: See :class:`SampleEncoder`.
        chunk_bytes: Target chunk size (``"64MB"`` or bytes).
        num_workers: Optimize worker processes (at most one per photo are started).
        start_method: Their multiprocessing start method (``None``: litdata's); the caller's is
            restored afterwards.

    Returns:
        The rejected photos' ids and reasons, and the chunks' ``photos``, ``chunks`` and ``bytes``.

    Raises:
        OSError: If a worker could not write (a full or read-only disk), naming ``out_dir``.
        RuntimeError: If litdata failed otherwise, wrote no ``index.json`` or fewer samples than photos.
    """
    import litdata
    from litdata.utilities.format import _convert_bytes_to_int  # litdata's own reading of "64MB"

    reject_dir = out_dir.parent / REJECTS_DIR
    shutil.rmtree(reject_dir, ignore_errors=True)  # a killed run's
    reject_dir.mkdir()
    pairs = [(r.image_id, r.expected_quantity) for r in records]
    previous = multiprocessing.get_start_method(allow_none=True)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        litdata.optimize(
            fn=SampleEncoder(str(root), pairs, resize, quality, str(reject_dir)),
            inputs=list(range(len(pairs))),
            output_dir=str(out_dir),
            chunk_bytes=chunk_bytes,
            num_workers=max(1, min(num_workers, len(pairs))),
            start_method=start_method,
            mode="overwrite",
            verbose=False,
        )
        rejected = {p.stem: p.read_text() for p in reject_dir.glob("*.txt")}
    except RuntimeError as err:
        if (os_error := _worker_os_error(err, out_dir)) is None:
            raise
        raise os_error from err
    finally:
        # litdata.optimize switches the whole process to its start method (spawn by default) and
        # leaves its own SIGINT handler behind, which ends the process with os._exit(0)
        multiprocessing.set_start_method(previous, force=True)
        signal.signal(signal.SIGINT, sigint)
        shutil.rmtree(reject_dir, ignore_errors=True)
    if not (out_dir / "index.json").is_file():
        raise RuntimeError(f"litdata.optimize wrote no index.json in {out_dir}")
    chunks = json.loads((out_dir / "index.json").read_text())["chunks"]
    stats = {"photos": sum(c["chunk_size"] for c in chunks), "chunks": len(chunks),
             "bytes": sum(c["chunk_bytes"] for c in chunks)}
    if stats["photos"] != len(pairs) - len(rejected):
        # a worker that lost its chunk to a full disk is not always reported by litdata
        chunk_size = chunk_bytes if isinstance(chunk_bytes, int) else _convert_bytes_to_int(chunk_bytes)
        if shutil.disk_usage(out_dir).free < num_workers * chunk_size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir))
        raise RuntimeError(f"{out_dir.name}: {stats['photos']} samples in the chunks, "
                           f"{len(pairs) - len(rejected)} photos expected")
    return rejected, stats


def _worker_os_error(err: RuntimeError, out_dir: Path) -> OSError | None:
    """The operating-system error (a full or read-only disk) that stopped an optimize worker, if any.

    litdata hands a worker's failure to the caller as a ``RuntimeError`` quoting the worker's
    traceback; the OSError is found by its ``[Errno N]`` line and named after ``out_dir``.
    """
    match = re.search(r"^\w*Error: \[Errno (\d+)\]", str(err), flags=re.MULTILINE)
    if match is None:
        return None
    number = int(match.group(1))
    return OSError(number, os.strerror(number), str(out_dir))
