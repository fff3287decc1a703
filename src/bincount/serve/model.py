"""The served model: an exported ``model/`` folder loaded for inference, its forward pass, and
the answers it gives (count, confidence and verdict).

Needs torch, torchvision and Pillow only (no Hydra, no Lightning); preprocesses with the
training code's :class:`~bincount.data.transforms.CountingPresetEval`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bincount.data.transforms import CountingPresetEval
from bincount.models.card import ModelCard
from bincount.models.decoding import NEVER, decode_counts, with_tta
from bincount.models.export import load_model_dir
from bincount.serve.images import Limits

log = logging.getLogger(__name__)


@dataclass
class CountingModel:
    """What :func:`~bincount.serve.inference.model_fn` returns: the network and everything needed to answer with it.

    Args:
        net: Backbone in eval mode (with the card's test-time augmentation), ``(N, 3, S, S)`` ->
            ``(N, C)`` logits.
        card: The model's ``model_config.json``.
        preset: The eval preprocessing the network was trained with.
        temperature: Logits are divided by it before the softmax (1.0: uncalibrated).
        review_threshold: Verdicts below this calibrated confidence are ``"review"``.
        limits: Request limits.
        device: Where ``net`` runs.
    """

    net: nn.Module
    card: ModelCard
    preset: CountingPresetEval
    temperature: float
    review_threshold: float
    limits: Limits = field(default_factory=Limits)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def min_count(self) -> int:
        return self.card.min_count

    @property
    def max_count(self) -> int:
        return self.card.max_count

    @classmethod
    def load(cls, model_dir: str | Path, *, review_threshold: float | None = None, limits: Limits | None = None,
             device: str | torch.device | None = None) -> CountingModel:
        """Load an exported ``model/`` folder (``torch.load(weights_only=True)``) and warm it up.

        Args:
            model_dir: Folder with ``model.pt`` and ``model_config.json``.
            review_threshold: Overrides the calibrated threshold in ``model_config.json``.
            limits: Request limits (default :class:`~bincount.serve.images.Limits`).
            device: Default: CUDA when available, else CPU.

        Raises:
            FileNotFoundError: If a file of the folder is missing.
            ValueError: If ``model_config.json`` is malformed (one line naming the file and the field).
            RuntimeError: If ``model.pt`` does not match the card.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net, card = load_model_dir(model_dir, map_location=device)
        net = with_tta(net, card.tta)
        model = cls(
            net=net.to(device, memory_format=torch.channels_last).eval(),  # as in training; ~25% faster on CPU
            card=card,
            preset=card.preset.build(),
            temperature=1.0 if card.calibration is None else card.calibration.temperature,
            review_threshold=review_threshold_of(card, review_threshold, where=model_dir),
            limits=limits or Limits(),
            device=device,
        )
        size = model.preset.image_size
        forward(model, torch.zeros(1, 3, size, size))  # first call allocates; keep that out of the first request
        return model


def review_threshold_of(card: ModelCard, review_threshold: float | None = None, *,
                        where: str | Path = "the model") -> float:
    """The confidence below which verdicts are ``"review"``: ``review_threshold`` if given, else the
    card's calibrated one, else :data:`~bincount.models.decoding.NEVER` (every verdict ``"review"``,
    with a warning naming ``where``, the model folder).
    """
    if review_threshold is None and card.calibration is not None:
        review_threshold = card.calibration.review_threshold
    if review_threshold is None:
        log.warning("%s has no calibrated review threshold and none was given: every verdict will be "
                    "'review' (retrain, or pass --review-threshold)", where)
        review_threshold = NEVER
    return float(review_threshold)


def preprocess(model: CountingModel, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``uint8`` ``(3, H, W)`` photos -> the network's input batch ``(N, 3, S, S)`` float32."""
    return torch.stack([model.preset(img) for img in images])


@torch.inference_mode()
def forward(model: CountingModel, batch: torch.Tensor) -> torch.Tensor:
    """Calibrated probabilities ``(N, C)`` (CPU, float32) of a preprocessed batch ``(N, 3, S, S)``."""
    logits = model.net(batch.to(model.device, memory_format=torch.channels_last, non_blocking=True))
    return (logits.float() / model.temperature).softmax(dim=1).cpu()


def probabilities(model: CountingModel, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Calibrated probabilities ``(N, C)`` of ``uint8`` ``(3, H, W)`` photos (:func:`preprocess`, :func:`forward`)."""
    return forward(model, preprocess(model, images))


def verdict(count: int, confidence: float, expected: int, *, card: ModelCard, review_threshold: float) -> str:
    """``"match"``/``"mismatch"`` when the model is confident enough, else ``"review"``.

    An expected quantity outside ``min_count..max_count`` is always ``"review"``: the model
    cannot count it, so it cannot confirm or deny it.

    Args:
        count: The decoded count.
        confidence: Its calibrated probability, in ``[0, 1]``.
        expected: The quantity the bin should hold.
        card: The model's card: gives the count range.
        review_threshold: Confidences below it are ``"review"`` (:func:`review_threshold_of`).

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
