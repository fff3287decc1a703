"""Validate, split and shard an ABID folder into litdata chunks (in S3 or a local folder), with an EDA report.

Usage:
    bincount data prepare --in data/abid --out s3://BUCKET/abid/v1
    bincount data prepare --in data/abid --out s3://BUCKET/abid/v1 --resize 256 --max-count 5
    bincount data prepare --in data/abid --list lists/file_list.json --out data/abid-shards
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 bincount data prepare --in data/abid --out s3://local/abid/v1

The output is the training core's split, as shards::

    OUT/manifest.json          written last: which photos are in which split, classes, settings
    OUT/{train,val,test}/      litdata chunks + index.json; one sample = {image_id, count, image (JPEG bytes)}
    OUT/eda/                   class_histogram.png, image_sizes.png, sample_grid.png, summary.json

Every photo is decoded once here; one that fails is reported in the manifest and left out.
With ``--resize N`` photos whose shorter side exceeds ``N`` pixels are scaled down to it and
re-encoded (JPEG quality ``--quality``); others keep their original bytes. For an S3 output the
chunks are built in a local staging folder and uploaded with boto3 (manifest last), so a
failed upload is an error rather than a half-written dataset that looks complete.

The optimize worker processes die with the process that started them, even when it is killed
with SIGKILL (Linux's parent-death signal), and a rerun after such a kill removes what the killed
run left: its rejects folder, its S3 staging folder, partial chunks (litdata overwrites them).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.util import register_after_fork
from pathlib import Path

import torch
from botocore.exceptions import BotoCoreError, ClientError
from torchvision.io import encode_jpeg
from torchvision.transforms.v2 import functional as F

from bincount.atomic import WRITE_ERRNOS
from bincount.data.abid import IMAGE_DIR, BinRecord, block_split, build_index
from bincount.data.decode import decode_rgb_bytes
from bincount.data.fetch import write_json_atomic
from bincount.data.s3 import check_bucket, exists, explain, is_s3_uri, join_uri, make_client, split_s3_uri

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "bincount-abid-shards"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
REJECTS_DIR = ".rejects"  # in the output while a split is optimized: one <image_id>.txt per rejected photo
STAGING_PREFIX = "bincount-prepare-"  # + "<pid>-": a rerun removes the folders of runs no longer alive
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Make this process receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Called in a child process. If ``parent_pid`` is already gone (the child was orphaned before
    it got here), this process exits at once. Does nothing in ``parent_pid`` itself, in a
    process that is not its direct child, or where ``prctl`` does not exist (not Linux).

    Args:
        parent_pid: The process whose death should end this one.

    Raises:
        OSError: If ``prctl`` fails.
    """
    if os.getpid() == parent_pid or not sys.platform.startswith("linux"):
        return
    if os.getppid() != parent_pid:
        if _is_running(parent_pid):  # a grandchild: its own parent is not ours to watch
            return
        os._exit(1)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


@dataclass(frozen=True)
class SampleEncoder:
    """The ``litdata.optimize`` function: :func:`encode_sample` with one split's settings.

    Its worker processes die with the process that made it (:func:`die_with_parent`), armed
    before a worker runs: a forked worker arms in :mod:`multiprocessing`'s after-fork hook, a
    spawned one (litdata's default) as it unpickles this object. (A ``forkserver`` worker is
    not the maker's child and is not covered.)

    Attributes:
        root: The ABID folder.
        records: ``(image_id, expected_quantity)`` of the split.
        resize: See :func:`encode_sample`.
        quality: See :func:`encode_sample`.
        reject_dir: See :func:`encode_sample`.
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
        die_with_parent(self.parent_pid)  # spawned: multiprocessing runs no after-fork hook

    def _in_worker(self) -> None:
        die_with_parent(self.parent_pid)

    def __call__(self, position: int) -> dict | None:
        return encode_sample(position, root=self.root, records=self.records, resize=self.resize,
                             quality=self.quality, reject_dir=self.reject_dir)


def encode_sample(
    position: int,
    *,
    root: str,
    records: Sequence[tuple[str, int]],
    resize: int | None,
    quality: int,
    reject_dir: str,
) -> dict | None:
    """The ``litdata.optimize`` function: one photo -> one sample, or ``None`` if it does not decode.

    The inputs are positions into ``records`` rather than paths: litdata treats path inputs as
    files to stage and waits on them, which costs seconds per split.

    Args:
        position: Index into ``records``.
        root: The ABID folder.
        records: ``(image_id, expected_quantity)`` of the split.
        resize: Scale photos whose shorter side is larger down to this many pixels (``None``: keep).
        quality: JPEG quality of re-encoded photos.
        reject_dir: Folder where a rejected photo leaves ``<image_id>.txt`` with the reason (the
            optimize workers are separate processes; this is how the parent learns of rejects).

    Returns:
        ``{"image_id": str, "count": int, "image": bytes}`` or ``None``.
    """
    image_id, count = records[position]
    try:
        data = Path(root, IMAGE_DIR, f"{image_id}.jpg").read_bytes()
        image = decode_rgb_bytes(data)
    except (OSError, ValueError) as err:
        Path(reject_dir, f"{image_id}.txt").write_text(str(err))
        return None
    height, width = image.shape[-2:]
    if resize is not None and min(height, width) > resize:
        scale = resize / min(height, width)
        size = [max(resize, round(height * scale)), max(resize, round(width * scale))]
        data = encode_jpeg(F.resize(image, size, antialias=True), quality=quality).numpy().tobytes()
    return {"image_id": image_id, "count": count, "image": data}


def _optimize_split(
    root: Path,
    records: Sequence[BinRecord],
    out_dir: Path,
    *,
    resize: int | None,
    quality: int,
    chunk_bytes: str | int,
    num_workers: int,
    start_method: str | None,
) -> dict[str, str]:
    """Write one split's chunks with ``litdata.optimize``; returns the rejected ids and reasons."""
    import litdata

    reject_dir = out_dir.parent / REJECTS_DIR
    shutil.rmtree(reject_dir, ignore_errors=True)  # a killed run's
    reject_dir.mkdir()
    pairs = [(r.image_id, r.expected_quantity) for r in records]
    previous = multiprocessing.get_start_method(allow_none=True)
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
        # litdata.optimize switches the whole process to its start method (spawn by default)
        multiprocessing.set_start_method(previous, force=True)
        shutil.rmtree(reject_dir, ignore_errors=True)
    if not (out_dir / "index.json").is_file():
        raise RuntimeError(f"litdata.optimize wrote no index.json in {out_dir}")
    return rejected


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


def _remove_dead_runs_staging(parent: Path) -> None:
    """Remove the staging folders in ``parent`` of prepare runs whose process is gone (killed)."""
    for path in parent.glob(f"{STAGING_PREFIX}*"):
        match = re.match(rf"{STAGING_PREFIX}(\d+)-", path.name)
        if match and path.is_dir() and not _is_running(int(match.group(1))):
            log.info("removing %s, left by a prepare run that was killed", path)
            shutil.rmtree(path, ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _shard_stats(split_dir: Path) -> dict:
    index = json.loads((split_dir / "index.json").read_text())
    chunks = index["chunks"]
    return {"photos": sum(c["chunk_size"] for c in chunks), "chunks": len(chunks),
            "bytes": sum(c["chunk_bytes"] for c in chunks)}


def write_eda(
    eda_dir: Path,
    root: Path,
    splits: dict[str, list[BinRecord]],
    *,
    summary: dict,
    seed: int = 0,
    per_count: int = 4,
    max_rows: int = 8,
) -> dict:
    """Write the EDA report: class histogram, image sizes, a labelled sample grid and ``summary.json``.

    Args:
        eda_dir: Output folder (created).
        root: The ABID folder the photos are read from (original sizes, not resized ones).
        splits: The photos kept in each split.
        summary: Extra fields for ``summary.json`` (rejects, index report, shard stats).
        seed: Seed of the sample choice.
        per_count: Photos per count in the grid.
        max_rows: At most this many counts in the grid (the most frequent ones).

    Returns:
        The summary written to ``summary.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    eda_dir.mkdir(parents=True, exist_ok=True)
    every = [r for recs in splits.values() for r in recs]
    sizes = []
    for rec in every:
        with Image.open(root / IMAGE_DIR / f"{rec.image_id}.jpg") as img:
            sizes.append(img.size)
    all_counts = sorted({r.expected_quantity for r in every})

    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(all_counts) + 3), 4))
    bottom = [0] * len(all_counts)
    for name, recs in splits.items():
        by_count = Counter(r.expected_quantity for r in recs)
        heights = [by_count.get(c, 0) for c in all_counts]
        ax.bar(range(len(all_counts)), heights, bottom=bottom, label=f"{name} ({len(recs)})")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(all_counts)), [str(c) for c in all_counts])
    ax.set(xlabel="objects in the bin (expected_quantity)", ylabel="photos", title="Photos per count and split")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(eda_dir / "class_histogram.png", dpi=100)
    plt.close(fig)

    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(widths, heights, s=4, alpha=0.4)
    left.set(xlabel="width (px)", ylabel="height (px)", title=f"Photo sizes ({len(sizes)} photos)")
    right.hist([min(s) for s in sizes], bins=40)
    right.set(xlabel="shorter side (px)", ylabel="photos", title="Shorter side")
    fig.tight_layout()
    fig.savefig(eda_dir / "image_sizes.png", dpi=100)
    plt.close(fig)

    rng = random.Random(seed)
    frequent = Counter(r.expected_quantity for r in every).most_common(max_rows)
    rows = sorted(c for c, _ in frequent)
    fig, axes = plt.subplots(len(rows), per_count, figsize=(2.2 * per_count, 2.2 * len(rows)), squeeze=False)
    for row, count in zip(axes, rows):
        ids = sorted(r.image_id for r in every if r.expected_quantity == count)
        for ax, image_id in zip(row, rng.sample(ids, min(per_count, len(ids))) + [None] * per_count):
            ax.axis("off")
            if image_id is None:
                continue
            with Image.open(root / IMAGE_DIR / f"{image_id}.jpg") as img:
                img = img.convert("RGB")
                img.thumbnail((256, 256))
                ax.imshow(img)
            ax.set_title(f"{image_id}: {count}", fontsize=8)
    fig.suptitle("Sample photos (id: expected_quantity)")
    fig.tight_layout()
    fig.savefig(eda_dir / "sample_grid.png", dpi=80)
    plt.close(fig)

    def stats(values: list[int]) -> dict:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}

    result = {
        "photos": len(every),
        "by_split": {name: {"photos": len(recs), "by_count": dict(sorted(Counter(
            r.expected_quantity for r in recs).items()))} for name, recs in splits.items()},
        "by_count": dict(sorted(Counter(r.expected_quantity for r in every).items())),
        "width_px": stats(widths),
        "height_px": stats(heights),
        "source_bytes": sum((root / IMAGE_DIR / f"{r.image_id}.jpg").stat().st_size for r in every),
        **summary,
    }
    (eda_dir / "summary.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def upload_tree(local_dir: Path, uri: str, *, endpoint_url: str | None = None, client=None,
                progress: bool = True, last: Sequence[str] = ()) -> int:
    """Upload every file under ``local_dir`` to ``uri`` (same relative keys); ``last`` goes last.

    Chunks go before each ``index.json``, so a reader never sees an index with missing chunks.

    Returns:
        Bytes uploaded.

    Raises:
        S3Error: If an upload fails after botocore's retries (see :func:`bincount.data.s3.explain`).
    """
    from boto3.s3.transfer import TransferConfig
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bucket, prefix = split_s3_uri(uri)
    client = client or make_client(endpoint_url=endpoint_url)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    order = {name: i + 2 for i, name in enumerate(last)}
    files.sort(key=lambda p: (order.get(p.relative_to(local_dir).as_posix(), 1 if p.name == "index.json" else 0)))
    total = sum(p.stat().st_size for p in files)
    config = TransferConfig(max_concurrency=8)
    with Progress(TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task(uri, total=total)
        for path in files:
            key = "/".join(filter(None, [prefix, path.relative_to(local_dir).as_posix()]))
            try:
                client.upload_file(str(path), bucket, key, Config=config,
                                   Callback=lambda n: bar.advance(task, n))
            except (ClientError, BotoCoreError) as err:
                raise explain(err, uri=f"s3://{bucket}/{key}", endpoint_url=endpoint_url) from None
            except Exception as err:  # boto3's S3UploadFailedError wraps the ClientError
                cause = err.__cause__ or err.__context__
                if isinstance(cause, (ClientError, BotoCoreError)):
                    raise explain(cause, uri=f"s3://{bucket}/{key}", endpoint_url=endpoint_url) from None
                raise
    return total


def prepare(
    in_dir: str | Path,
    out: str,
    *,
    min_count: int = 1,
    max_count: int = 5,
    label_list: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    block_size: int = 20,
    seed: int = 0,
    resize: int | None = None,
    quality: int = 90,
    chunk_bytes: str | int = "64MB",
    num_workers: int | None = None,
    endpoint_url: str | None = None,
    staging_dir: str | None = None,
    start_method: str | None = None,
    overwrite: bool = False,
    eda: bool = True,
    progress: bool = True,
) -> dict:
    """Turn an ABID folder into validated, split, optimized shards plus a manifest and an EDA report.

    The photos, labels and split are exactly the training core's: :func:`build_index` with the
    class range, then :func:`block_split` (so ``data=abid`` and ``data=abid_stream`` train and
    test on the same photos for the same settings), minus the photos that fail to decode.

    Args:
        in_dir: ABID-layout folder (``bincount data fetch`` makes one).
        out: ``s3://BUCKET/PREFIX`` or a local folder.
        min_count: Smallest count kept (class 0).
        max_count: Largest count kept.
        label_list: Optional label list selecting the photos (see ``build_index``).
        val_fraction: Approximate validation share.
        test_fraction: Approximate test share.
        block_size: Id block size of the split.
        seed: Seed of the split (and of the EDA sample grid).
        resize: Shorter side in pixels for photos larger than that (``None``: keep the originals).
        quality: JPEG quality of resized photos.
        chunk_bytes: Target chunk size (``"64MB"``); small chunks spread better over few photos.
        num_workers: Optimize worker processes (default: the CPU count).
        endpoint_url: S3-compatible endpoint (default ``$AWS_ENDPOINT_URL`` or AWS).
        staging_dir: Where chunks are built before an S3 upload (default: the system temp folder;
            needs room for the largest split).
        start_method: Multiprocessing start method of the optimize workers (litdata's default is
            ``spawn``; ``fork`` starts faster). The caller's start method is restored afterwards.
        overwrite: Replace an existing prepared dataset at ``out``.
        eda: Write the ``eda/`` report.
        progress: Show progress bars.

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        FileExistsError: If ``out`` already holds a manifest and ``overwrite`` is false.
        FileNotFoundError: If ``in_dir`` is not an ABID folder.
        ValueError: If no photo is left, the split settings are invalid or ``out`` is a file.
        S3Error: If the bucket is missing, access is refused or the endpoint is unreachable.
        OSError: If the output or staging folder cannot be written (read-only, full disk).
    """
    start = time.perf_counter()
    in_dir = Path(in_dir)
    remote = is_s3_uri(out)
    if not remote and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file: give a folder or an s3:// prefix")
    client = make_client(endpoint_url=endpoint_url) if remote else None
    if remote:
        check_bucket(out, endpoint_url=endpoint_url, client=client)
    manifest_uri = join_uri(out, MANIFEST)
    if not overwrite and exists(manifest_uri, endpoint_url=endpoint_url, client=client):
        raise FileExistsError(f"{manifest_uri} exists: prepare into a new version (e.g. .../v2) or pass --overwrite")

    records, index_report = build_index(in_dir, min_count=min_count, max_count=max_count, label_list=label_list)
    splits = block_split(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         block_size=block_size)
    if remote:
        _remove_dead_runs_staging(Path(staging_dir or tempfile.gettempdir()))
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=staging_dir))
    else:
        stage = Path(out)
        stage.mkdir(parents=True, exist_ok=True)
    try:
        kept: dict[str, list[BinRecord]] = {}
        rejected: dict[str, str] = {}
        shards: dict[str, dict] = {}
        for name in SPLIT_NAMES:
            split_rejects = _optimize_split(
                in_dir, splits[name], stage / name, resize=resize, quality=quality, chunk_bytes=chunk_bytes,
                num_workers=num_workers or os.cpu_count() or 1, start_method=start_method,
            )
            for image_id, reason in split_rejects.items():
                log.warning("rejected %s: %s", image_id, reason)
            rejected |= split_rejects
            kept[name] = [r for r in splits[name] if r.image_id not in split_rejects]
            shards[name] = _shard_stats(stage / name)
            if shards[name]["photos"] != len(kept[name]):
                raise RuntimeError(f"{name}: {shards[name]['photos']} samples in the chunks, "
                                   f"{len(kept[name])} photos expected")
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(in_dir.resolve()),
            "label_list": label_list,
            "min_count": min_count,
            "max_count": max_count,
            "split": {"method": "block", "val_fraction": val_fraction, "test_fraction": test_fraction,
                      "block_size": block_size, "seed": seed},
            "resize_shorter_side": resize,
            "jpeg_quality": quality if resize else None,
            "splits": {name: {"dir": name, "image_ids": [r.image_id for r in recs],
                              "counts": [r.expected_quantity for r in recs]} for name, recs in kept.items()},
            "shards": shards,
            "rejected": dict(sorted(rejected.items())),
            "index_report": index_report.summary(),
        }
        if eda:
            write_eda(stage / "eda", in_dir, kept, seed=seed, summary={
                "rejected": manifest["rejected"], "index_report": manifest["index_report"], "shards": shards,
                "min_count": min_count, "max_count": max_count, "resize_shorter_side": resize})
        write_json_atomic(stage / MANIFEST, manifest)  # complete or absent, even on a full disk
        if remote:
            upload_tree(stage, out, endpoint_url=endpoint_url, client=client, progress=progress, last=[MANIFEST])
    except OSError as err:
        if err.filename is None and err.errno in WRITE_ERRNOS:  # a failed write() names no file
            raise OSError(err.errno, err.strerror, str(stage)) from err
        raise
    finally:
        if remote:
            shutil.rmtree(stage, ignore_errors=True)
    log.info("prepared %s in %.1f s: %s; rejected %d", out, time.perf_counter() - start,
             ", ".join(f"{k} {len(v)}" for k, v in kept.items()), len(rejected))
    return manifest


def read_manifest(uri: str, *, endpoint_url: str | None = None) -> dict:
    """Read and check ``manifest.json`` of a prepared dataset (``s3://...`` or a local folder).

    Raises:
        FileNotFoundError: If there is no manifest (not prepared, or still uploading).
        ValueError: If it is not a bincount shard manifest of a known version.
        S3Error: For S3 failures.
    """
    from bincount.data.s3 import read_bytes

    manifest_uri = join_uri(uri, MANIFEST)
    try:
        manifest = json.loads(read_bytes(manifest_uri, endpoint_url=endpoint_url))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{manifest_uri} not found: `bincount data prepare --out {uri}` writes it (last, after the chunks)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_uri} is not JSON ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_uri}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest
