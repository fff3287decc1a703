"""Batch prediction over photo files, folders and S3 prefixes, written to one CSV.

Uses the serving code end to end (:class:`~bincount.serve.model.CountingModel`: the same decoding,
limits, calibrated probabilities and verdicts), batched through a DataLoader so decoding runs in
worker processes while the network counts.

Usage:
    bincount predict --model-dir outputs/RUN/model photos/ extra.jpg --out predictions.csv
    bincount predict --model-dir outputs/RUN/model s3://BUCKET/bin-images/ --labels labels.csv --out verdicts.csv

Each row: :func:`csv_columns`; a photo that cannot be read or decoded gets a row with only
``error`` filled, and the run goes on. The CSV is written atomically (:func:`bincount.atomic.atomic_write`):
an interrupted, stopped or failed run leaves no partial file.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from bincount.atomic import atomic_write
from bincount.data.abid import read_labels_csv
from bincount.data.s3 import list_objects
from bincount.data.transforms import CountingPresetEval
from bincount.models.card import ModelCard
from bincount.serve.errors import RequestError
from bincount.serve.images import Limits, decode_image_bytes, read_s3_object, s3_client
from bincount.serve.model import CountingModel, forward, make_predictions
from bincount.stop import stops_held

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_photos(inputs: Sequence[str]) -> list[str]:
    """Expand files, folders (searched recursively for ``.jpg``/``.jpeg``/``.png``) and S3 prefixes.

    Returns:
        Local paths and ``s3://`` URIs, in the order given, each folder's and prefix's sorted.

    Raises:
        FileNotFoundError: If a local input does not exist.
        ValueError: If the inputs hold no photo.
        bincount.data.s3.S3Error: If an S3 prefix cannot be listed.
    """
    photos: list[str] = []
    for item in inputs:
        if item.startswith("s3://"):
            found = list_objects(item, suffixes=IMAGE_SUFFIXES, client=s3_client())
        elif Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif Path(item).is_file():
            found = [item]
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        if not found:
            log.warning("%s holds no .jpg/.jpeg/.png photo", item)
        photos += found
    if not photos:
        raise ValueError(f"no photos found in {', '.join(inputs)}")
    return photos


def image_id(source: str) -> str:
    """``"s3://b/bin-images/00523.jpg"`` or ``"dir/00523.jpg"`` -> ``"00523"``."""
    return Path(source.rsplit("/", 1)[-1]).stem


def probability_columns(card: ModelCard) -> list[str]:
    """``prob_<count>`` for ``count`` in ``min_count..max_count``."""
    return [f"prob_{c}" for c in range(card.min_count, card.max_count + 1)]


def csv_columns(card: ModelCard) -> list[str]:
    """The CSV's header: ``source,image_id,count,confidence,prob_<count>...,expected_quantity,verdict,error``.

    ``image_id`` is the file name without its extension (ABID's id); ``expected_quantity`` and
    ``verdict`` are filled for photos named in the labels (``image_id,expected_quantity``).
    """
    return ["source", "image_id", "count", "confidence", *probability_columns(card), "expected_quantity", "verdict",
            "error"]


def prediction_row(source: str, prediction: dict, card: ModelCard) -> dict[str, object]:
    """The CSV row (column -> value) of one answer of :func:`~bincount.serve.model.make_predictions` on
    the photo ``source``: probabilities and confidence with 5 decimals, no ``error``."""
    return {"source": source, "image_id": image_id(source), "count": prediction["count"],
            "confidence": f"{prediction['confidence']:.5f}",
            **{c: f"{p:.5f}" for c, p in zip(probability_columns(card), prediction["probabilities"])},
            "expected_quantity": prediction.get("expected_quantity", ""), "verdict": prediction.get("verdict", "")}


def error_row(source: str, error: str) -> dict[str, str]:
    """The CSV row of a photo without an answer: only ``source``, ``image_id`` and ``error``."""
    return {"source": source, "image_id": image_id(source), "error": error}


class PhotoDataset(Dataset):
    """Photos by path or S3 URI, decoded and preprocessed (``preset``) as serving does.

    Item ``i`` is ``(image (3, S, S) float32 or None, i, error message or "")``.
    """

    def __init__(self, sources: Sequence[str], preset: CountingPresetEval, limits: Limits) -> None:
        self.sources = list(sources)
        self.preset = preset
        self.limits = limits

    def __len__(self) -> int:
        return len(self.sources)

    def _read(self, source: str) -> bytes:
        if source.startswith("s3://"):
            return read_s3_object(source, max_bytes=self.limits.max_image_bytes)
        size = Path(source).stat().st_size
        if size > self.limits.max_image_bytes:
            raise RequestError(f"image is {size} bytes; the limit is {self.limits.max_image_bytes} bytes")
        return Path(source).read_bytes()

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            image = decode_image_bytes(self._read(self.sources[index]), limits=self.limits)
        except (RequestError, OSError) as err:
            return None, index, str(err)
        return self.preset(image), index, ""


def collate_photos(batch: list[tuple[torch.Tensor | None, int, str]]) -> dict:
    """``{"images": (M, 3, S, S) of the readable photos, "indices": their M indices, "failed": [(index, error)]}``."""
    good = [(img, i) for img, i, _ in batch if img is not None]
    return {
        "images": torch.stack([img for img, _ in good]) if good else None,
        "indices": [i for _, i in good],
        "failed": [(i, err) for img, i, err in batch if img is None],
    }


def exit_on_sigterm(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM makes the worker exit at once, with status 0.

    A stop sent to the whole process group reaches the workers as well as ``predict``. Killed by
    the signal, a worker would make the DataLoader raise ``DataLoader worker ... is killed by
    signal`` over ``predict``'s own stop; exiting with status 0 leaves the stop to ``predict``.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by _write_rows while workers start


def check_csv_path(out: str | Path) -> Path:
    """``out`` as a path a CSV can be written to (its folder may not exist yet).

    Raises:
        ValueError: If ``out`` is a folder, or its parent is a file.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the CSV file to write")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is a file, not a folder")
    return out


def progress_bar(show: bool = True) -> Progress:
    """A rich progress bar: done/total, elapsed and remaining time (``show=False``: silent)."""
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not show)


def predict(model_dir: str | Path, inputs: Sequence[str], out: str | Path, *, labels: str | Path | None = None,
            batch_size: int = 32, num_workers: int = 2, review_threshold: float | None = None,
            limits: Limits | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Count the objects in every photo of ``inputs`` and write one CSV row per photo.

    Args:
        inputs: Files, folders and ``s3://`` prefixes (:func:`find_photos`).
        labels: CSV with ``image_id,expected_quantity``: adds the expected quantity and the verdict.
        num_workers: DataLoader processes reading and decoding photos (0: in this process).
        review_threshold: Overrides the calibrated review threshold.
        limits: Per-photo limits (default :class:`~bincount.serve.images.Limits`).

    Returns:
        ``{"photos": rows written, "failed": unreadable photos, "verdicts": {verdict: n}, "out": path}``.

    Raises:
        FileNotFoundError: A missing input, model folder or labels file.
        ValueError: No photos in ``inputs``, or ``out`` is a folder.
        bincount.data.s3.S3Error: An S3 prefix cannot be listed.
        bincount.data.abid.LabelError: ``labels`` lacks the needed columns.
        OSError: ``out`` cannot be written (read-only or full disk); an existing ``out`` is kept.
    """
    out = check_csv_path(out)
    model = CountingModel.load(model_dir, review_threshold=review_threshold, limits=limits, device=device)
    sources = find_photos(inputs)
    expected = read_labels_csv(Path(labels)) if labels else {}
    loader = DataLoader(PhotoDataset(sources, model.preset, model.limits), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_photos, worker_init_fn=exit_on_sigterm)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, newline="") as f, progress_bar(progress) as bar:
        failed, verdicts = _write_rows(f, loader, sources, expected, model, bar)
    return {"photos": len(sources), "failed": failed, "verdicts": dict(verdicts), "out": str(out)}


def _write_rows(f, loader: DataLoader, sources: Sequence[str], expected: dict[str, int], model: CountingModel,
                bar: Progress) -> tuple[int, Counter[str]]:
    """Count every batch of ``loader`` and write its rows to ``f``; returns (unreadable photos, verdicts)."""
    verdicts: Counter[str] = Counter()
    failed = 0
    writer = csv.DictWriter(f, csv_columns(model.card))
    writer.writeheader()
    task = bar.add_task("counting", total=len(sources))
    # a stop while the DataLoader's workers start is raised once they are up; SIGTERM stays blocked
    # (and pending) until then, in the workers too (a fork inherits the mask) until exit_on_sigterm
    # is their handler: one killed before it would end predict in a "worker killed" traceback
    with stops_held():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            batches = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    for batch in batches:
        rows = {i: error_row(sources[i], err) for i, err in batch["failed"]}
        failed += len(rows)
        if batch["images"] is not None:
            ids = [image_id(sources[i]) for i in batch["indices"]]
            preds = make_predictions(forward(model, batch["images"]), [expected.get(x) for x in ids], model)
            for i, pred in zip(batch["indices"], preds):
                verdicts.update([pred["verdict"]] if "verdict" in pred else [])
                rows[i] = prediction_row(sources[i], pred, model.card)
        writer.writerows(rows[i] for i in sorted(rows))
        bar.advance(task, len(rows))
    return failed, verdicts
