"""From calibrated probabilities to answers: the count, its confidence and the verdict."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bincount.models.card import ModelCard
from bincount.models.decoding import decode_counts
from bincount.serve.model import CountingModel


def verdict(count: int, confidence: float, expected: int, *, card: ModelCard, review_threshold: float) -> str:
    """``"match"``/``"mismatch"`` when the model is confident enough, else ``"review"``.

    An expected quantity outside ``min_count..max_count`` is always ``"review"``: the model
    cannot count it, so it cannot confirm or deny it.

    Args:
        count: The decoded count.
        confidence: Its calibrated probability, in ``[0, 1]``.
        expected: The quantity the bin should hold.
        card: The model's card: gives the count range.
        review_threshold: Confidences below it are ``"review"`` (:func:`~bincount.serve.model.review_threshold_of`).

    Returns:
        ``"match"``, ``"mismatch"`` or ``"review"``.
    """
    if not card.min_count <= expected <= card.max_count or confidence < review_threshold:
        return "review"
    return "match" if count == expected else "mismatch"


def make_predictions(probs: torch.Tensor, expected: Sequence[int | None], model: CountingModel) -> list[dict]:
    """One answer per photo from calibrated probabilities.

    Args:
        probs: ``(N, C)`` calibrated probabilities of ``min_count..max_count`` objects.
        expected: ``N`` expected quantities, ``None`` where there is nothing to verify.
        model: Gives the decoding rule, the count range and the review threshold.

    Returns:
        ``[{"count", "probabilities", "confidence"[, "expected_quantity", "verdict"]}, ...]``;
        probabilities and confidence rounded to 6 decimals; the last two keys only with an
        expected quantity.
    """
    confidence, index = decode_counts(probs, model.card.decode)
    out = []
    for p, c, k, e in zip(probs.tolist(), confidence.tolist(), index.tolist(), expected):
        pred = {"count": model.min_count + k, "probabilities": [round(x, 6) for x in p], "confidence": round(c, 6)}
        if e is not None:
            pred["expected_quantity"] = e
            pred["verdict"] = verdict(model.min_count + k, c, e, card=model.card,
                                      review_threshold=model.review_threshold)
        out.append(pred)
    return out
