"""Which ABID photos to fetch: a label list, id ranges or the whole bucket, optionally balanced per count.

Usage (through ``bincount data fetch``, see :mod:`bincount.data.fetch` for the download itself):
    bincount data fetch --list abid_counting_train.json --out data/abid
    bincount data fetch --ids 1-20000 --per-class 500 --max-count 5 --out data/abid-balanced
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from bincount.atomic import atomic_write
from bincount.data.abid import IMAGE_DIR, METADATA_DIR, PUBLIC_BUCKET, LabelError, read_label_list, read_metadata_count
from bincount.data.fetch import FetchReport, check_out_dir, fetch
from bincount.data.s3 import list_objects, make_client

log = logging.getLogger(__name__)


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
    out = check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    listed: dict[str, int] = {}
    if list_path is not None:
        listed = read_label_list(Path(list_path))
        kept_list = out / "lists" / Path(list_path).name
        kept_list.parent.mkdir(exist_ok=True)
        if not kept_list.exists():
            with open(list_path, "rb") as source, atomic_write(kept_list, "wb") as f:  # complete or absent
                shutil.copyfileobj(source, f)
        ids = sorted(listed)
    elif id_spec is not None:
        ids = parse_id_ranges(id_spec)
    else:
        bucket = fetch_kwargs.get("bucket", PUBLIC_BUCKET)
        endpoint = fetch_kwargs.get("endpoint_url")
        client = fetch_kwargs.get("client") or make_client(endpoint_url=endpoint,
                                                           anonymous=fetch_kwargs.get("anonymous", True))
        uris = list_objects(f"s3://{bucket}/{IMAGE_DIR}/", suffixes=(".jpg",), endpoint_url=endpoint, client=client)
        # list_objects matches suffixes in any case; ABID's photos are <id>.jpg, the name fetch reads
        ids = sorted(uri.rpartition("/")[2].removesuffix(".jpg") for uri in uris if uri.endswith(".jpg"))
        log.info("s3://%s lists %d photos", bucket, len(ids))
    if per_class is not None:
        counts = {i: c for i, c in listed.items() if c >= 0}
        if len(counts) < len(ids):
            fetch(ids, out, kinds=("metadata",), report_name=None, **fetch_kwargs)
            counts |= _counts_of(out, (i for i in ids if i not in counts))
        ids = choose_per_class(counts, per_class, max_count=max_count, seed=seed)
        log.info("--per-class %d: %d photos chosen", per_class, len(ids))
    return fetch(ids, out, **fetch_kwargs)
