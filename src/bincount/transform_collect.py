"""A Batch Transform job's answers joined with their photos into one CSV, as ``bincount predict`` writes it.

Usage:
    bincount transform collect s3://BUCKET/counts/ --input-prefix s3://BUCKET/bin-images/ --model-dir model/ \
        --out counts.csv
    bincount transform collect counts/ --input-prefix s3://BUCKET/bin-images/ --model-dir model/ \
        --labels labels.csv --out verdicts.csv

A transform job (``python -m sagemaker_launch.transform``) sends every photo ``<input><path>`` to
the handler of :mod:`bincount.serve.inference` alone and writes its answer to ``<output><path>.out``.
The model folder gives the probability columns and, with ``--labels``, the count range and review
threshold of the verdicts, which the job cannot give: Batch Transform sends no per-photo header.
"""

from __future__ import annotations

import csv
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from bincount.atomic import atomic_write
from bincount.data.abid import read_labels_csv
from bincount.data.s3 import S3Error, list_objects
from bincount.models.card import ModelCard
from bincount.models.export import read_model_card
from bincount.predict import check_csv_path, csv_columns, error_row, find_photos, image_id, prediction_row, progress_bar
from bincount.serve.errors import RequestError
from bincount.serve.images import read_s3_object, s3_client
from bincount.serve.model import review_threshold_of, verdict

OUT_SUFFIX = ".out"  # Batch Transform's: the answer to input object KEY is KEY.out
MAX_ANSWER_BYTES = 2**20  # an answer is a few hundred bytes; anything this big is not one
READERS = 16  # .out files read at a time (S3 round trips overlap)


class Prediction(BaseModel):
    """One answer of the handler (:func:`~bincount.serve.model.make_predictions`); other keys ignored."""

    count: StrictInt
    probabilities: list[StrictFloat | StrictInt]
    confidence: StrictFloat | StrictInt


class Answer(BaseModel):
    """The handler's answer to one photo: ``{"predictions": [one prediction]}``."""

    predictions: list[Prediction] = Field(min_length=1, max_length=1)


class Refusal(BaseModel):
    """The handler's answer to a photo it cannot count, under Batch Transform: ``{"error": "<why>"}``
    (:func:`~bincount.serve.inference.error_answer`)."""

    model_config = ConfigDict(extra="forbid")

    error: StrictStr


def parse_answer(data: bytes, where: str, card: ModelCard) -> dict:
    """The prediction, or the handler's refusal, of one ``.out`` file: ``data``, read from ``where``.

    Args:
        card: The model's card: the answer must have its ``C`` probabilities and a count in its range.

    Returns:
        ``{"count": int, "probabilities": [C floats], "confidence": float}``, or
        ``{"error": "<why the handler could not count the photo>"}`` (one line).

    Raises:
        ValueError: One line naming ``where`` and what is wrong.
    """
    try:
        return {"error": " ".join(Refusal.model_validate_json(data).error.split())}
    except ValidationError:
        pass  # not a refusal: it must be an answer
    try:
        prediction = Answer.model_validate_json(data).predictions[0]
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "the document"
        raise ValueError(f"{where}: not an answer of bincount's handler ({field}: {first['msg']})") from None
    if len(prediction.probabilities) != card.num_classes or not card.min_count <= prediction.count <= card.max_count:
        raise ValueError(f"{where}: count {prediction.count} with {len(prediction.probabilities)} probabilities, but "
                         f"the model counts {card.min_count}..{card.max_count} ({card.num_classes} classes): "
                         "answered by another model?")
    return prediction.model_dump()


def folder_prefix(location: str) -> str:
    """An S3 prefix as a folder (``s3://b/bin-images`` -> ``s3://b/bin-images/``); a local path as given."""
    return location.rstrip("/") + "/" if location.startswith("s3://") else location


def under(location: str, path: str) -> str:
    """``path`` under an S3 prefix (``s3://b/counts`` -> ``s3://b/counts/<path>``) or a local folder."""
    return folder_prefix(location) + path if location.startswith("s3://") else str(Path(location) / path)


def input_photos(input_prefix: str) -> dict[str, str]:
    """The photos under ``input_prefix`` by their path under it, in ``bincount predict``'s order:
    ``{"sub/00001.jpg": "s3://b/bin-images/sub/00001.jpg" or "bin-images/sub/00001.jpg", ...}``.

    Raises:
        FileNotFoundError: A local ``input_prefix`` that is not a folder.
        ValueError: No photos under it.
        bincount.data.s3.S3Error: The prefix cannot be listed.
    """
    if not input_prefix.startswith("s3://") and not Path(input_prefix).is_dir():
        raise FileNotFoundError(f"--input-prefix {input_prefix}: no such folder")
    prefix = folder_prefix(input_prefix)
    if prefix.startswith("s3://"):
        return {uri[len(prefix):]: uri for uri in find_photos([prefix])}
    return {Path(p).relative_to(prefix).as_posix(): p for p in find_photos([prefix])}


def answer_files(outputs: str) -> dict[str, str]:
    """The ``.out`` files under ``outputs`` (an S3 prefix or a local folder) by the path of their photo:
    ``{"sub/00001.jpg": "<outputs>/sub/00001.jpg.out", ...}``.

    Raises:
        FileNotFoundError: A local ``outputs`` that is not a folder.
        bincount.data.s3.S3Error: The prefix cannot be listed.
    """
    if outputs.startswith("s3://"):
        prefix = folder_prefix(outputs)
        uris = list_objects(prefix, suffixes=(OUT_SUFFIX,), client=s3_client())
        return {uri[len(prefix):-len(OUT_SUFFIX)]: uri for uri in uris}
    if not Path(outputs).is_dir():
        raise FileNotFoundError(f"{outputs}: no such folder")
    return {p.relative_to(outputs).as_posix()[:-len(OUT_SUFFIX)]: str(p)
            for p in sorted(Path(outputs).rglob(f"*{OUT_SUFFIX}")) if p.is_file()}


def read_answer(location: str) -> bytes:
    """The bytes of one ``.out`` file, local or on S3.

    Raises:
        bincount.data.s3.S3Error: An S3 object cannot be read.
        ValueError: A file over :data:`MAX_ANSWER_BYTES`.
        OSError: A local file cannot be read.
    """
    if location.startswith("s3://"):
        try:
            return read_s3_object(location, max_bytes=MAX_ANSWER_BYTES)
        except RequestError as err:
            raise S3Error(str(err)) from None
    if Path(location).stat().st_size > MAX_ANSWER_BYTES:
        raise ValueError(f"{location}: over {MAX_ANSWER_BYTES} bytes, not an answer of bincount's handler")
    return Path(location).read_bytes()


def collect(outputs: str, input_prefix: str, out: str | Path, *, model_dir: str | Path,
            labels: str | Path | None = None, review_threshold: float | None = None, progress: bool = True) -> dict:
    """Write one CSV row per photo under ``input_prefix`` from its answer under ``outputs``.

    A photo without a ``.out`` (the job failed on it, or has not reached it) or with the handler's
    refusal gets an error row, as :func:`~bincount.predict.predict` writes an unreadable photo.

    Args:
        outputs: The transform job's output prefix (``s3://...``), or a local copy of it.
        input_prefix: Its input prefix (``s3://...``), or a local folder of the same photos.
        model_dir: The model the job ran (only its ``model_config.json`` is read).
        labels: CSV with ``image_id,expected_quantity``: adds the expected quantity and the verdict.

    Returns:
        ``{"photos": rows written, "failed": photos without a count, "verdicts": {verdict: n},
        "unmatched": answers of no photo under input_prefix, "out": path}``.

    Raises:
        FileNotFoundError: A missing folder, model folder or labels file.
        ValueError: A malformed ``.out`` (the message names it), no photos, no answers, or no
            answer that belongs to a photo under ``input_prefix``; ``out`` is a folder.
        bincount.data.s3.S3Error: A prefix cannot be listed or an answer read.
        bincount.data.abid.LabelError: ``labels`` lacks the needed columns.
        OSError: ``out`` cannot be written; an existing ``out`` is kept.
    """
    out = check_csv_path(out)
    card = read_model_card(model_dir)
    threshold = review_threshold_of(card, review_threshold, where=model_dir)
    expected = read_labels_csv(Path(labels)) if labels else {}
    photos, answers = input_photos(input_prefix), answer_files(outputs)
    if not answers:
        raise ValueError(f"no {OUT_SUFFIX} files under {outputs}")
    if not answers.keys() & photos.keys():
        path = next(iter(photos))
        raise ValueError(f"none of the {len(answers)} {OUT_SUFFIX} files under {outputs} answers a photo under "
                         f"{input_prefix}: the answer to {under(input_prefix, path)} is "
                         f"{under(outputs, path + OUT_SUFFIX)}")
    verdicts: Counter[str] = Counter()
    failed = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, newline="") as f, progress_bar(progress) as bar, ThreadPoolExecutor(READERS) as pool, \
            ExitStack() as before_pool_exit:
        # on an error, Ctrl-C or a stop, reads not yet started are cancelled: the pool's exit would wait for them
        before_pool_exit.callback(pool.shutdown, wait=False, cancel_futures=True)
        writer = csv.DictWriter(f, csv_columns(card))
        writer.writeheader()
        task = bar.add_task("collecting", total=len(photos))
        read = pool.map(read_answer, [answers[p] for p in photos if p in answers])  # in this order, as they come
        for path, source in photos.items():
            if path not in answers:
                failed += 1
                writer.writerow(error_row(source, f"no answer: {under(outputs, path + OUT_SUFFIX)} is missing "
                                                  "(the transform job failed on this photo or has not finished)"))
            elif "error" in (prediction := parse_answer(next(read), answers[path], card)):
                failed += 1  # the handler could not count it (Batch Transform answers it so, not with a 4xx)
                writer.writerow(error_row(source, prediction["error"]))
            else:
                if (quantity := expected.get(image_id(source))) is not None:
                    prediction["expected_quantity"] = quantity
                    prediction["verdict"] = verdict(prediction["count"], prediction["confidence"], quantity,
                                                    card=card, review_threshold=threshold)
                    verdicts[prediction["verdict"]] += 1
                writer.writerow(prediction_row(source, prediction, card))
            bar.advance(task)
    return {"photos": len(photos), "failed": failed, "verdicts": dict(verdicts),
            "unmatched": len(answers.keys() - photos.keys()), "out": str(out)}
