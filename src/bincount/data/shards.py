"""The shard format: what ``bincount data prepare`` writes and the streaming data module reads.

A prepared dataset (``s3://BUCKET/PREFIX`` or a local folder)::

    manifest.json          written last: which photos are in which split, classes, settings
    {train,val,test}/      litdata chunks + index.json, one sample per photo (see make_sample)
    eda/                   the EDA report (bincount.data.eda)

The writer is :mod:`bincount.data.prepare`, the reader :mod:`bincount.data.stream`; both go
through this module, so neither imports the other.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from bincount.data.abid import BinRecord
from bincount.data.s3 import join_uri

MANIFEST = "manifest.json"
FORMAT = "bincount-abid-shards"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")


def make_sample(image_id: str, count: int, image: bytes) -> dict:
    """One stored sample: a photo's id, its ``expected_quantity`` and its encoded (JPEG) bytes."""
    return {"image_id": image_id, "count": count, "image": image}


def read_sample(sample: dict) -> tuple[str, int, bytes]:
    """``(image_id, count, image bytes)`` of a sample written by :func:`make_sample`."""
    return sample["image_id"], sample["count"], sample["image"]


def make_manifest(
    *,
    source: str,
    label_list: str | None,
    min_count: int,
    max_count: int,
    split: dict,
    resize: int | None,
    quality: int,
    kept: dict[str, list[BinRecord]],
    shards: dict[str, dict],
    rejected: dict[str, str],
    index_report: str,
) -> dict:
    """The manifest of a prepared dataset (stamped with the current UTC time).

    Args:
        source: The ABID folder the photos came from.
        label_list: The label list that selected them, if any.
        min_count: Count of class 0.
        max_count: Largest count kept.
        split: How the splits were made (``method`` and its settings).
        resize: Shorter side photos were scaled down to (``None``: originals).
        quality: JPEG quality of the re-encoded photos (recorded only when ``resize`` is set).
        kept: The photos stored in each split, in order.
        shards: Per split: ``photos``, ``chunks`` and ``bytes`` of its chunks.
        rejected: Photos left out, with the reason.
        index_report: Summary of what the index skipped.
    """
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "label_list": label_list,
        "min_count": min_count,
        "max_count": max_count,
        "split": split,
        "resize_shorter_side": resize,
        "jpeg_quality": quality if resize else None,
        "splits": {name: {"dir": name, "image_ids": [r.image_id for r in recs],
                          "counts": [r.expected_quantity for r in recs]} for name, recs in kept.items()},
        "shards": shards,
        "rejected": dict(sorted(rejected.items())),
        "index_report": index_report,
    }


def split_records(manifest: dict, name: str) -> list[BinRecord]:
    """The photos of split ``name`` in manifest order (the order sample indices refer to)."""
    entry = manifest["splits"][name]
    return [BinRecord(i, c) for i, c in zip(entry["image_ids"], entry["counts"])]


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
