"""Validate, split and shard an ABID folder into litdata chunks (in S3 or a local folder), with an EDA report.

Usage:
    bincount data prepare --in data/abid --out s3://BUCKET/abid/v1
    bincount data prepare --in data/abid --out s3://BUCKET/abid/v1 --resize 256 --max-count 5
    bincount data prepare --in data/abid --list lists/file_list.json --out data/abid-shards
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 bincount data prepare --in data/abid --out s3://local/abid/v1

The output has the layout of :mod:`bincount.data.shards`. Every photo is decoded once here; one
that fails is reported in the manifest and left out. With ``--resize N`` photos whose shorter side
exceeds ``N`` pixels are scaled down to it and re-encoded; others keep their original bytes. The
data set is built in a staging folder, then uploaded with boto3, manifest last (S3), or renamed
into place (a local folder): a failed or killed run, with ``--overwrite`` too, leaves the old data
set whole or none, never splits of two runs, and a rerun removes what a killed run left.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from bincount.atomic import WRITE_ERRNOS, is_running, replace_folder, write_json_atomic
from bincount.data.abid import BinRecord, build_index
from bincount.data.decode import MIN_SIDE
from bincount.data.eda import write_eda
from bincount.data.optimize import optimize_split
from bincount.data.s3 import check_bucket, exists, is_s3_uri, join_uri, make_client, upload_tree
from bincount.data.shards import MANIFEST, SPLIT_NAMES, make_manifest
from bincount.data.splits import block_split

log = logging.getLogger(__name__)

STAGING_PREFIX = "bincount-prepare-"  # + "<pid>-": a rerun removes the folders of runs no longer alive


def _remove_dead_runs_staging(parent: Path) -> None:
    """Remove the staging folders in ``parent`` of prepare runs whose process is gone (killed)."""
    for path in parent.glob(f"{STAGING_PREFIX}*"):
        match = re.match(rf"{STAGING_PREFIX}(\d+)-", path.name)
        if match and path.is_dir() and not is_running(int(match.group(1))):
            log.info("removing %s, left by a prepare run that was killed", path)
            shutil.rmtree(path, ignore_errors=True)


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
        ValueError: If no photo is left, the split settings are invalid, ``out`` is a file or a
            folder that is not a prepared data set, or ``resize`` is under
            :data:`bincount.data.decode.MIN_SIDE`.
        S3Error: If the bucket is missing, access is refused or the endpoint is unreachable.
        OSError: If the output or staging folder cannot be written (read-only, full disk).
    """
    start = time.perf_counter()
    in_dir = Path(in_dir)
    remote = is_s3_uri(out)
    if not remote and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file: give a folder or an s3:// prefix")
    if resize is not None and resize < MIN_SIDE:
        raise ValueError(f"--resize {resize}: photos under {MIN_SIDE} pixels on a side are refused when read; "
                         f"give at least {MIN_SIDE}")
    client = make_client(endpoint_url=endpoint_url) if remote else None
    if remote:
        check_bucket(out, endpoint_url=endpoint_url, client=client)
    manifest_uri = join_uri(out, MANIFEST)
    if not overwrite and exists(manifest_uri, endpoint_url=endpoint_url, client=client):
        raise FileExistsError(f"{manifest_uri} exists: prepare into a new version (e.g. .../v2) or pass --overwrite")
    if not remote and Path(out).is_dir() and any(Path(out).iterdir()) and not (Path(out) / MANIFEST).is_file():
        raise ValueError(f"--out {out} holds files but no {MANIFEST} (not a prepared data set): give a new or "
                         "empty folder")

    records, index_report = build_index(in_dir, min_count=min_count, max_count=max_count, label_list=label_list)
    splits = block_split(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         block_size=block_size)
    if remote:
        staging_parent = Path(staging_dir or tempfile.gettempdir())
        staging_parent.mkdir(parents=True, exist_ok=True)
    else:
        Path(out).mkdir(parents=True, exist_ok=True)  # empty until the finished data set replaces it
        staging_parent = Path(out).resolve().parent
    workers = num_workers or os.cpu_count() or 1
    _remove_dead_runs_staging(staging_parent)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=staging_parent))
    try:
        kept: dict[str, list[BinRecord]] = {}
        rejected: dict[str, str] = {}
        shards: dict[str, dict] = {}
        for name in SPLIT_NAMES:
            split_rejects, shards[name] = optimize_split(
                in_dir, splits[name], stage / name, resize=resize, quality=quality, chunk_bytes=chunk_bytes,
                num_workers=workers, start_method=start_method,
            )
            for image_id, reason in split_rejects.items():
                log.warning("rejected %s: %s", image_id, reason)
            rejected |= split_rejects
            kept[name] = [r for r in splits[name] if r.image_id not in split_rejects]
        manifest = make_manifest(
            source=str(in_dir.resolve()), label_list=label_list, min_count=min_count, max_count=max_count,
            split={"method": "block", "val_fraction": val_fraction, "test_fraction": test_fraction,
                   "block_size": block_size, "seed": seed},
            resize=resize, quality=quality, kept=kept, shards=shards, rejected=rejected,
            index_report=index_report.summary(),
        )
        if eda:
            keys = ("rejected", "index_report", "shards", "min_count", "max_count", "resize_shorter_side")
            write_eda(stage / "eda", in_dir, kept, seed=seed, summary={k: manifest[k] for k in keys})
        write_json_atomic(stage / MANIFEST, manifest)  # complete or absent, even on a full disk
        if remote:
            upload_tree(stage, out, endpoint_url=endpoint_url, client=client, progress=progress, last=[MANIFEST])
        else:
            replace_folder(stage, Path(out))
    except OSError as err:
        # a failed write() names no file; a local run's staging folder is no name the user knows
        unnamed = err.filename is None and err.errno in WRITE_ERRNOS
        if unnamed or (not remote and str(err.filename or "").startswith(str(stage))):
            raise OSError(err.errno, err.strerror, str(stage) if remote else out) from err
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already when a local run succeeded
    log.info("prepared %s in %.1f s: %s; rejected %d", out, time.perf_counter() - start,
             ", ".join(f"{k} {len(v)}" for k, v in kept.items()), len(rejected))
    return manifest
