"""Download ABID photos and metadata from the public bucket into a local ABID-layout folder.

Usage:
    bincount data fetch --list file_list.json --out data/abid
    bincount data fetch --list abid_counting_train.json --out data/abid
    bincount data fetch --ids 1-5000 --out data/abid
    bincount data fetch --all --out data/abid-full --workers 64
    bincount data fetch --ids 1-20000 --per-class 500 --max-count 5 --out data/abid-balanced
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 bincount data fetch --ids 1-50 --bucket mirror --out /tmp/abid

Requests are anonymous (botocore ``UNSIGNED``; the bucket is public), run in a thread pool and
are retried by botocore's retry modes. Every file is written to a temporary name and renamed
into place, so a file under its final name is complete: a rerun after an interruption fetches
only what is missing. Keys the bucket does not have (404) are listed in ``fetch_report.json``
and do not stop the run; a missing bucket, refused access or an unreachable endpoint stops it
at once with a clear error, after writing the report of what was done.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections import defaultdict
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

from bincount.atomic import PART_SUFFIX, WRITE_ERRNOS, atomic_write
from bincount.data.abid import IMAGE_DIR, METADATA_DIR, PUBLIC_BUCKET, LabelError, read_label_list, read_metadata_count
from bincount.data.s3 import explain, is_not_found, make_client, resolve_endpoint

log = logging.getLogger(__name__)

REPORT_NAME = "fetch_report.json"
KINDS = {"images": (IMAGE_DIR, ".jpg"), "metadata": (METADATA_DIR, ".json")}


def parse_id_ranges(spec: str) -> list[str]:
    """Expand ``"1-5000,7,9-10"`` into ABID ids, numbers written ``'%05d'`` as in the bucket.

    The bucket names photos ``00001.jpg`` ... ``99999.jpg``, ``100000.jpg`` ...; ids spelt
    differently (``523`` besides ``00523``) go in a text list file instead.

    Raises:
        ValueError: If a part is not ``N`` or ``A-B`` with ``0 < A <= B``.
    """
    ids: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--ids {spec!r}: {part!r} is not N or A-B (e.g. 1-5000,7)")
        start = int(match.group(1))
        stop = int(match.group(2) or start)
        if not 0 < start <= stop:
            raise ValueError(f"--ids {spec!r}: {part!r} needs 0 < A <= B")
        ids.extend("%05d" % i for i in range(start, stop + 1))
    return list(dict.fromkeys(ids))


def list_bucket_ids(client, bucket: str, *, endpoint_url: str | None = None) -> list[str]:
    """Every photo id in ``bucket`` (``bin-images/<id>.jpg`` keys), sorted.

    Raises:
        S3Error: If the bucket cannot be listed.
    """
    ids = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{IMAGE_DIR}/"):
            for obj in page.get("Contents", ()):
                name = obj["Key"].rpartition("/")[2]
                if name.endswith(".jpg"):
                    ids.append(name[: -len(".jpg")])
    except (ClientError, BotoCoreError) as err:
        raise explain(err, uri=f"s3://{bucket}/{IMAGE_DIR}/", endpoint_url=endpoint_url) from None
    return sorted(ids)


def choose_per_class(
    counts: dict[str, int],
    per_class: int,
    *,
    max_count: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Pick up to ``per_class`` ids of each count (a balanced set), reproducibly.

    Args:
        counts: Image id -> count; negative counts (unknown) are ignored.
        per_class: Photos per count; a count with fewer photos gives all it has.
        max_count: Ignore counts above this.
        seed: Seed of the draw within each count.

    Returns:
        The chosen ids, sorted.
    """
    by_count: dict[int, list[str]] = defaultdict(list)
    for image_id, count in counts.items():
        if count >= 0 and (max_count is None or count <= max_count):
            by_count[count].append(image_id)
    rng = random.Random(seed)
    chosen = []
    for count in sorted(by_count):
        ids = sorted(by_count[count])
        chosen += rng.sample(ids, min(per_class, len(ids)))
    return sorted(chosen)


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
        folder, suffix = KINDS[kind]
        key = f"{folder}/{image_id}{suffix}"
        final = self.path(kind, image_id)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}{PART_SUFFIX}")
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with open(tmp, "wb") as f:
                shutil.copyfileobj(body, f, 1 << 20)  # botocore raises if fewer bytes than Content-Length arrive
            os.replace(tmp, final)
        except (ClientError, BotoCoreError) as err:
            tmp.unlink(missing_ok=True)
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
        except OSError as err:  # e.g. a full disk: it fails every photo alike, so the run stops
            tmp.unlink(missing_ok=True)
            if err.filename is None and err.errno in WRITE_ERRNOS:
                raise OSError(err.errno, err.strerror, str(final)) from err
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self.lock:
            self.report.fetched[kind].append(image_id)
            self.report.bytes += final.stat().st_size


def _dooms_the_run(err: BaseException) -> bool:
    """A refused request (4xx other than 404) or an unreachable endpoint fails every key alike."""
    if isinstance(err, ClientError):
        return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) < 500
    return isinstance(err, (EndpointConnectionError, ConnectTimeoutError, NoCredentialsError))


def _raise_first_error(done) -> None:
    for future in done:
        if future.exception() is not None:
            raise future.exception()


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
    out = _check_out_dir(out)
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
                    _raise_first_error(done)
                    bar.advance(task, len(done))
                pending.add(pool.submit(fetcher.get, kind, image_id))
            done, _ = wait(pending)
            _raise_first_error(done)
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


def _check_out_dir(out: str | Path) -> Path:
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


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path``, complete or not at all (:func:`bincount.atomic.atomic_write`).

    Raises:
        OSError: If the file cannot be written.
    """
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=1) + "\n")


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, so that ``dst`` is complete or absent."""
    with open(src, "rb") as source, atomic_write(dst, "wb") as f:
        shutil.copyfileobj(source, f)


def _counts_of(out: Path, ids: Iterable[str]) -> dict[str, int]:
    """Counts from the fetched metadata files (ids without a readable one are left out)."""
    counts = {}
    for image_id in ids:
        path = out / METADATA_DIR / f"{image_id}.json"
        if path.exists():
            try:
                counts[image_id] = read_metadata_count(path)
            except LabelError as err:
                log.warning("ignoring %s for --per-class: %s", image_id, err)
    return counts


def select_and_fetch(
    out: str | Path,
    *,
    list_path: str | Path | None = None,
    id_spec: str | None = None,
    all_ids: bool = False,
    per_class: int | None = None,
    max_count: int | None = None,
    seed: int = 0,
    **fetch_kwargs,
) -> FetchReport:
    """Resolve which photos to fetch (exactly one of a list, id ranges or the whole bucket), then fetch.

    With ``per_class`` the counts come from the list when it has them (``file_list.json``,
    counting splits); otherwise the metadata of every candidate is fetched first, and then the
    photos of the balanced choice. A label list is copied to ``out/lists/`` so that
    ``bincount data prepare --list lists/<name>`` can use its labels.

    Args:
        out: Destination folder.
        list_path: A label list (see :func:`bincount.data.abid.read_label_list`).
        id_spec: Id ranges (see :func:`parse_id_ranges`).
        all_ids: Every photo of the bucket (listed).
        per_class: Fetch at most this many photos of each count.
        max_count: With ``per_class``, leave out counts above this.
        seed: Seed of the per-class draw.
        **fetch_kwargs: Passed to :func:`fetch`.

    Raises:
        ValueError: If not exactly one id source is given, ``per_class < 1`` or ``out`` is a file.
        LabelError: If the list file is missing or malformed.
        S3Error: See :func:`fetch`.
        OSError: See :func:`fetch`.
    """
    if sum(x is not None and x is not False for x in (list_path, id_spec, all_ids)) != 1:
        raise ValueError("give exactly one of --list FILE, --ids RANGES or --all")
    if per_class is not None and per_class < 1:
        raise ValueError(f"--per-class {per_class} must be >= 1")
    out = _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    listed: dict[str, int] = {}
    if list_path is not None:
        listed = read_label_list(Path(list_path))
        (out / "lists").mkdir(exist_ok=True)
        if not (out / "lists" / Path(list_path).name).exists():
            _copy_atomic(Path(list_path), out / "lists" / Path(list_path).name)
        ids = sorted(listed)
    elif id_spec is not None:
        ids = parse_id_ranges(id_spec)
    else:
        bucket = fetch_kwargs.get("bucket", PUBLIC_BUCKET)
        endpoint = fetch_kwargs.get("endpoint_url")
        client = fetch_kwargs.get("client") or make_client(endpoint_url=endpoint,
                                                           anonymous=fetch_kwargs.get("anonymous", True))
        ids = list_bucket_ids(client, bucket, endpoint_url=endpoint)
        log.info("s3://%s lists %d photos", bucket, len(ids))
    if per_class is not None:
        counts = {i: c for i, c in listed.items() if c >= 0}
        if len(counts) < len(ids):
            fetch(ids, out, kinds=("metadata",), report_name=None, **fetch_kwargs)
            counts |= _counts_of(out, (i for i in ids if i not in counts))
        ids = choose_per_class(counts, per_class, max_count=max_count, seed=seed)
        log.info("--per-class %d: %d photos chosen", per_class, len(ids))
    return fetch(ids, out, **fetch_kwargs)
