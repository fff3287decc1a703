"""The Amazon Bin Image Dataset (ABID): its layout, labels and the index of usable photos.

The dataset lives in the public bucket ``s3://aft-vbi-pds`` as ``bin-images/<id>.jpg`` with one
``metadata/<id>.json`` each, whose ``EXPECTED_QUANTITY`` is the number of objects in the bin
(registry.opendata.aws/amazon-bin-imagery). A dataset root here uses the same layout, optionally
with a ``labels.csv`` (``image_id,expected_quantity,...``) for photos that have no metadata file.

Ids are strings: ``523`` and ``00523`` are different photos, so ids are never parsed for lookup.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PUBLIC_BUCKET = "aft-vbi-pds"
IMAGE_DIR = "bin-images"
METADATA_DIR = "metadata"
LABELS_CSV = "labels.csv"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class BinRecord:
    """One labelled bin photo.

    Attributes:
        image_id: The ABID id, exactly as in the bucket key (leading zeros kept).
        expected_quantity: Number of objects in the bin (``EXPECTED_QUANTITY``).
    """

    image_id: str
    expected_quantity: int


@dataclass
class IndexReport:
    """What :func:`build_index` kept and why it skipped the rest (counts of photos)."""

    kept: int = 0
    out_of_range: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    label_conflicts: int = 0

    def summary(self) -> str:
        dropped = sum(self.out_of_range.values())
        parts = [f"kept {self.kept} photos"]
        if dropped:
            by_count = ", ".join(f"{k}: {v}" for k, v in sorted(self.out_of_range.items()))
            parts.append(f"dropped {dropped} outside the class range (by count: {by_count})")
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"skipped {n} ({reason})")
        if self.label_conflicts:
            parts.append(f"{self.label_conflicts} metadata/labels.csv conflicts (metadata used)")
        return "; ".join(parts)


class LabelError(ValueError):
    """A label source (metadata file, labels.csv, label list) is missing or malformed."""


def parse_count(value: object, source: str) -> int:
    """Return ``value`` as a non-negative integer count.

    Raises:
        LabelError: If ``value`` is not a whole number >= 0 (e.g. ``"3"``, ``2.5``, ``None``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LabelError(f"{source}: count {value!r} is not an integer")
    try:
        number = float(value)
    except ValueError:
        raise LabelError(f"{source}: count {value!r} is not an integer") from None
    if not number.is_integer() or number < 0:
        raise LabelError(f"{source}: count {value!r} is not a non-negative integer")
    return int(number)


def read_metadata_count(path: Path) -> int:
    """Read ``EXPECTED_QUANTITY`` from one ABID metadata JSON file.

    Raises:
        LabelError: If the file cannot be read or parsed, or has no valid ``EXPECTED_QUANTITY``.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelError(f"{path}: unreadable metadata ({err})") from None
    if not isinstance(meta, dict) or "EXPECTED_QUANTITY" not in meta:
        raise LabelError(f"{path}: no EXPECTED_QUANTITY")
    return parse_count(meta["EXPECTED_QUANTITY"], str(path))


def read_labels_csv(path: Path) -> dict[str, int]:
    """Read ``labels.csv`` (columns ``image_id,expected_quantity``; others ignored).

    Rows with a bad count are skipped with a warning.

    Raises:
        LabelError: If the header lacks ``image_id`` or ``expected_quantity``.
    """
    labels: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image_id", "expected_quantity"} <= set(reader.fieldnames or ()):
            raise LabelError(f"{path}: needs columns image_id,expected_quantity")
        for row in reader:
            try:
                labels[row["image_id"]] = parse_count(row["expected_quantity"], f"{path}:{row['image_id']}")
            except LabelError as err:
                log.warning("skipping label: %s", err)
    return labels


def read_label_list(path: Path) -> dict[str, int]:
    """Read a label list in one of the formats ABID users have.

    - The Udacity subset ``file_list.json``: ``{"1": ["data/metadata/00710.json", ...], ...}``
      (class name -> metadata paths; the id is the file stem).
    - The ABID challenge counting splits (``abid_counting_train.json``): ``[[index, count], ...]``
      with image id ``'%05d' % (index + 1)`` (silverbottlep/abid_challenge).
    - A text file with one id per line (labels then come from metadata / labels.csv; count -1).

    Returns:
        Mapping image id -> count (``-1`` where the list gives no count).

    Raises:
        LabelError: If the file is missing or in none of these formats.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise LabelError(f"label list {path}: {err}") from None
    if path.suffix != ".json":
        return {line.strip(): -1 for line in text.splitlines() if line.strip()}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LabelError(f"label list {path}: not JSON ({err})") from None
    labels: dict[str, int] = {}
    if isinstance(data, dict):
        for cls, paths in data.items():
            count = parse_count(cls, f"{path} class")
            for p in paths:
                labels[Path(p).stem] = count
        return labels
    if isinstance(data, list) and all(isinstance(x, list) and len(x) == 2 for x in data):
        for index, count in data:
            labels["%05d" % (int(index) + 1)] = parse_count(count, f"{path} index {index}")
        return labels
    raise LabelError(f"label list {path}: expected file_list.json or [[index, count], ...] format")


def _jpeg_problem(path: Path) -> str | None:
    """Cheap check (no decode) that ``path`` looks like a complete JPEG; returns the problem."""
    try:
        size = path.stat().st_size
        if size < 4:
            return "empty or tiny image file"
        with path.open("rb") as f:
            head = f.read(2)
            f.seek(-2, 2)
            tail = f.read(2)
    except OSError as err:
        return f"unreadable image ({err.strerror})"
    if head != _JPEG_SOI:
        return "not a JPEG"
    if tail != _JPEG_EOI:
        return "truncated JPEG"
    return None


def build_index(
    root: str | Path,
    *,
    min_count: int,
    max_count: int,
    label_list: str | Path | None = None,
) -> tuple[list[BinRecord], IndexReport]:
    """List the usable labelled photos under an ABID-layout root.

    The label of a photo comes from ``metadata/<id>.json``, else from ``labels.csv``, else from
    ``label_list``. With ``label_list`` only the ids it names are used. Photos whose count is
    outside ``[min_count, max_count]`` are dropped and counted; unreadable, truncated or unlabelled
    ones are skipped with one warning each (a full decode happens later, in the dataset).

    Args:
        root: Folder with ``bin-images/`` and ``metadata/`` and/or ``labels.csv``.
        min_count: Smallest count kept (inclusive).
        max_count: Largest count kept (inclusive).
        label_list: Optional label list (see :func:`read_label_list`); relative paths are
            resolved against ``root`` first, then the working directory.

    Returns:
        The records sorted by id, and a report of what was skipped.

    Raises:
        FileNotFoundError: If ``root/bin-images`` does not exist.
        LabelError: If a label list or labels.csv is malformed.
        ValueError: If no usable photo is left.
    """
    root = Path(root)
    image_dir = root / IMAGE_DIR
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"{image_dir} not found: data.root must be a folder in the ABID layout "
            f"(bin-images/<id>.jpg, metadata/<id>.json); `bincount data fetch` creates one"
        )
    if min_count > max_count:
        raise ValueError(f"min_count={min_count} > max_count={max_count}")
    csv_labels = read_labels_csv(root / LABELS_CSV) if (root / LABELS_CSV).is_file() else {}
    listed: dict[str, int] | None = None
    if label_list is not None:
        list_path = Path(label_list)
        if not list_path.is_absolute() and (root / list_path).exists():
            list_path = root / list_path
        listed = read_label_list(list_path)

    ids: Iterable[str] = listed.keys() if listed is not None else (p.stem for p in image_dir.glob("*.jpg"))
    report = IndexReport()
    records = []
    for image_id in sorted(set(ids)):
        image_path = image_dir / f"{image_id}.jpg"
        if not image_path.exists():
            report.skipped["listed but no image file"] += 1
            continue
        problem = _jpeg_problem(image_path)
        if problem:
            log.warning("skipping %s: %s", image_path, problem)
            report.skipped[problem] += 1
            continue
        count = _label_of(root, image_id, csv_labels, listed, report)
        if count is None:
            continue
        if not min_count <= count <= max_count:
            report.out_of_range[count] += 1
            continue
        records.append(BinRecord(image_id, count))
    report.kept = len(records)
    log.info("%s: %s", root, report.summary())
    if not records:
        raise ValueError(
            f"no usable photo in {root} for counts {min_count}..{max_count} ({report.summary()})"
        )
    return records, report


def _label_of(
    root: Path,
    image_id: str,
    csv_labels: dict[str, int],
    listed: dict[str, int] | None,
    report: IndexReport,
) -> int | None:
    meta_path = root / METADATA_DIR / f"{image_id}.json"
    fallback = csv_labels.get(image_id)
    if fallback is None and listed is not None and listed.get(image_id, -1) >= 0:
        fallback = listed[image_id]
    if meta_path.exists():
        try:
            count = read_metadata_count(meta_path)
        except LabelError as err:
            if fallback is None:
                log.warning("skipping %s: %s", image_id, err)
                report.skipped["malformed metadata"] += 1
                return None
            log.warning("%s; using labels.csv/list count %d", err, fallback)
            return fallback
        if fallback is not None and fallback != count:
            report.label_conflicts += 1
        return count
    if fallback is None:
        log.warning("skipping %s: no metadata/%s.json and no label in labels.csv or the list", image_id, image_id)
        report.skipped["no label"] += 1
    return fallback
