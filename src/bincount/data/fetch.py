"""Download ABID photos and metadata from the public bucket into a local ABID-layout folder.

Usage:
    bincount data fetch --list file_list.json --out data/abid
    bincount data fetch --list abid_counting_train.json --out data/abid
    bincount data fetch --ids 1-5000 --out data/abid
    bincount data fetch --all --out data/abid-full --workers 64
    bincount data fetch --ids 1-20000 --per-class 500 --max-count 5 --out data/abid-balanced
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 bincount data fetch --ids 1-50 --bucket mirror --out /tmp/abid

Requests are anonymous (the bucket is public), threaded and retried by botocore; see :func:`fetch`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bincount.atomic import PART_SUFFIX, atomic_write, write_json_atomic
from bincount.data.abid import IMAGE_DIR, METADATA_DIR, PUBLIC_BUCKET
from bincount.data.s3 import explain, is_not_found, make_client, resolve_endpoint

log = logging.getLogger(__name__)

REPORT_NAME = "fetch_report.json"
KINDS = {"images": (IMAGE_DIR, ".jpg"), "metadata": (METADATA_DIR, ".json")}


@dataclass
class FetchReport:
    """What one fetch run did; ``fetch_report.json`` is this as JSON.

    ``fetched``/``present``/``missing``/``failed`` are keyed by kind (``images``, ``metadata``);
    ``missing`` lists ids whose key the bucket does not have (404), ``failed`` maps ids to the
    error of a transfer that broke after botocore's retries (a rerun tries them again).
    """

    bucket: str
    endpoint_url: str | None
    requested: int = 0
    fetched: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    present: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    missing: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    failed: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict:
        photos = len(self.fetched["images"])
        return {
            "bucket": self.bucket,
            "endpoint_url": self.endpoint_url,
            "requested": self.requested,
            "fetched": {k: sorted(v) for k, v in self.fetched.items()},
            "already_present": self.present,
            "missing": {k: sorted(v) for k, v in self.missing.items()},
            "failed": self.failed,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "photos_per_second": round(photos / self.seconds, 2) if self.seconds > 0 else None,
            "error": self.error,
        }

    def summary(self) -> str:
        parts = [f"{len(self.fetched['images'])} photos and {len(self.fetched['metadata'])} metadata files fetched "
                 f"({self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s)",
                 f"{self.present['images']} photos already present"]
        for kind in KINDS:
            if self.missing[kind]:
                parts.append(f"{len(self.missing[kind])} {kind} not in the bucket")
            if self.failed[kind]:
                parts.append(f"{len(self.failed[kind])} {kind} failed (rerun to retry)")
        return "; ".join(parts)


class _Fetcher:
    """Downloads ``(kind, id)`` objects into ``out`` with one shared, thread-safe boto3 client."""

    def __init__(self, client, bucket: str, out: Path, report: FetchReport, endpoint_url: str | None) -> None:
        self.client = client
        self.bucket = bucket
        self.out = out
        self.report = report
        self.endpoint_url = endpoint_url
        self.lock = threading.Lock()

    def path(self, kind: str, image_id: str) -> Path:
        folder, suffix = KINDS[kind]
        return self.out / folder / f"{image_id}{suffix}"

    def get(self, kind: str, image_id: str) -> None:
        """Fetch one object; raises :class:`S3Error` only for failures that doom the whole run."""
        final = self.path(kind, image_id)
        key = f"{final.parent.name}/{final.name}"
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            # complete or absent; a write error (a full disk: the run stops) names the file
            with atomic_write(final, "wb") as f:
                shutil.copyfileobj(body, f, 1 << 20)  # botocore raises if fewer bytes than Content-Length arrive
        except (ClientError, BotoCoreError) as err:
            if is_not_found(err):
                with self.lock:
                    self.report.missing[kind].append(image_id)
                return
            explained = explain(err, uri=f"s3://{self.bucket}/{key}", endpoint_url=self.endpoint_url)
            if _dooms_the_run(err):
                raise explained from None
            with self.lock:  # a server error or broken transfer left after botocore's retries
                self.report.failed[kind][image_id] = str(explained)
            return
        with self.lock:
            self.report.fetched[kind].append(image_id)
            self.report.bytes += final.stat().st_size


def _dooms_the_run(err: BaseException) -> bool:
    """A refused request (4xx other than 404) or an unreachable endpoint fails every key alike."""
    if isinstance(err, ClientError):
        return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) < 500
    return isinstance(err, (EndpointConnectionError, ConnectTimeoutError, NoCredentialsError))


def _remove_partial_files(out: Path) -> int:
    removed = 0
    for folder, _ in KINDS.values():
        for part in (out / folder).glob(f"*{PART_SUFFIX}"):
            part.unlink(missing_ok=True)
            removed += 1
    return removed


def fetch(
    ids: Sequence[str],
    out: str | Path,
    *,
    bucket: str = PUBLIC_BUCKET,
    endpoint_url: str | None = None,
    kinds: Iterable[str] = ("images", "metadata"),
    workers: int = 16,
    retry_mode: str = "standard",
    max_attempts: int = 8,
    anonymous: bool = True,
    progress: bool = True,
    client=None,
    report_name: str | None = REPORT_NAME,
) -> FetchReport:
    """Download ``bin-images/<id>.jpg`` and ``metadata/<id>.json`` for ``ids`` into ``out``.

    Files already under their final name are kept (they are complete: every write goes to a
    temporary ``*.part`` file renamed into place); leftover ``*.part`` files are removed.

    Args:
        ids: Photo ids exactly as in the bucket (``"00523"`` and ``"523"`` differ).
        out: Destination folder (ABID layout, created if needed).
        bucket: Source bucket.
        endpoint_url: S3-compatible endpoint (default ``$AWS_ENDPOINT_URL`` or AWS).
        kinds: ``"images"`` and/or ``"metadata"``.
        workers: Concurrent downloads (threads sharing one client and connection pool).
        retry_mode: botocore retry mode (``standard``, ``adaptive``, ``legacy``).
        max_attempts: botocore attempts per request.
        anonymous: Unsigned requests (public bucket); ``False`` signs with the usual credentials.
        progress: Show a rich progress bar.
        client: A boto3 S3 client to use instead of building one.
        report_name: File in ``out`` to write the :class:`FetchReport` to (``None``: do not write).

    Returns:
        The report (also written to ``out/fetch_report.json``).

    Raises:
        S3Error: If the bucket is missing, access is refused, credentials are rejected or the
            endpoint is unreachable (the report of what was done is written first).
        ValueError: If ``workers < 1``, a kind is unknown or ``out`` is a file.
        OSError: If ``out`` cannot be written (read-only, full disk): the run stops; files already
            complete are kept, the temporary file of the failed one is removed.
    """
    kinds = tuple(kinds)
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if unknown := set(kinds) - set(KINDS):
        raise ValueError(f"unknown kinds {sorted(unknown)}: use {sorted(KINDS)}")
    out = check_out_dir(out)
    for kind in kinds:
        (out / KINDS[kind][0]).mkdir(parents=True, exist_ok=True)
    if removed := _remove_partial_files(out):
        log.info("removed %d incomplete files left by an interrupted run", removed)
    endpoint = resolve_endpoint(endpoint_url)
    client = client or make_client(endpoint_url=endpoint, anonymous=anonymous, retry_mode=retry_mode,
                                   max_attempts=max_attempts, max_pool_connections=workers)
    report = FetchReport(bucket=bucket, endpoint_url=endpoint, requested=len(ids))
    fetcher = _Fetcher(client, bucket, out, report, endpoint)
    todo = []
    for image_id in dict.fromkeys(ids):
        for kind in kinds:
            if fetcher.path(kind, image_id).exists():
                report.present[kind] += 1
            else:
                todo.append((kind, image_id))

    start = time.perf_counter()
    columns = (TextColumn("fetch {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(f"s3://{bucket}", total=len(todo))
            pending: set = set()
            for kind, image_id in todo:  # a bounded window: 536k photos must not become 1M futures at once
                if len(pending) >= 4 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # raises the error that stopped a download
                    bar.advance(task, len(done))
                pending.add(pool.submit(fetcher.get, kind, image_id))
            done, _ = wait(pending)
            for future in done:
                future.result()
            bar.advance(task, len(done))
    except BaseException as err:
        report.error = f"{type(err).__name__}: {err}"
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        report.seconds = time.perf_counter() - start
        if report_name:
            _write_report(out / report_name, report)
    log.info("%s: %s", out, report.summary())
    return report


def check_out_dir(out: str | Path) -> Path:
    """``out`` as a path; raises ValueError if it names a file rather than a (possibly new) folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder")
    return out


def _write_report(path: Path, report: FetchReport) -> None:
    """Write the report; when the run already failed (say, a full disk), a failed write only logs,
    so that the error that stopped the run is the one reported."""
    try:
        write_json_atomic(path, report.to_json())
    except OSError as err:
        if report.error is None:
            raise
        log.warning("cannot write %s: %s", path, err.strerror or err)
