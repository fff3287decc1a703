"""Calibrated confidence and the review threshold behind bin verification, fitted on the validation split.

1. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar
   ``T > 0`` divides the logits, fitted by LBFGS on the negative log-likelihood; the count picked
   never changes.
2. Expected calibration error (torchmetrics ``MulticlassCalibrationError``) before and after.
3. The review threshold: the lowest calibrated confidence at which the model's count is right at
   least ``target_precision`` of the time; answers below it become "review" (a person looks).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve
from torch.nn import functional as F
from torchmetrics.classification import MulticlassCalibrationError

from bincount.models.decoding import NEVER, decode_counts

log = logging.getLogger(__name__)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature ``T > 0`` (optimised as ``log T``) minimising the NLL of ``softmax(logits / T)``, for
    ``logits`` ``(N, C)`` and ``targets`` ``(N,)`` class indices; ``T > 1`` softens an over-confident model.

    Raises:
        ValueError: If there are no samples.
    """
    if len(targets) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    logits, targets = logits.detach().double(), targets.detach()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, *, n_bins: int = 15) -> float:
    """Expected calibration error in ``[0, 1]`` (L1): the confidence-vs-accuracy gap averaged over
    ``n_bins`` equal-width confidence bins, of ``probs`` ``(N, C)`` against ``targets`` ``(N,)``."""
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1", sync_on_compute=False)
    return float(metric(probs.float(), targets))


def choose_review_threshold(confidence: torch.Tensor, correct: torch.Tensor, target_precision: float, *,
                            min_support: int = 30) -> float:
    """The lowest threshold whose answers (``confidence >= threshold``) are right ``target_precision``
    of the time on at least ``min_support`` photos (a floor that keeps it from resting on the handful of
    most confident photos).

    Args:
        confidence: ``(N,)`` calibrated top-1 probabilities.
        correct: ``(N,)`` bools, whether the top-1 count was right.
        target_precision: Wanted share of right answers among confident ones, in ``(0, 1]``.
        min_support: Fewest photos a threshold must answer.

    Returns:
        The threshold, or :data:`NEVER` (every verdict "review") when none reaches the precision.

    Raises:
        ValueError: If ``target_precision`` is outside ``(0, 1]``.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision={target_precision} must be in (0, 1]")
    correct = correct.bool()
    if not correct.any() or len(correct) < min_support:
        return NEVER
    if correct.all():
        return float(confidence.min())
    precision, _, thresholds = precision_recall_curve(correct.numpy(), confidence.double().numpy())
    answered = len(confidence) - np.searchsorted(np.sort(confidence.double().numpy()), thresholds, side="left")
    ok = (precision[:-1] >= target_precision) & (answered >= min_support)  # the last point (recall 0) has no threshold
    if not ok.any():
        return NEVER
    return float(thresholds[ok.argmax()])  # thresholds ascend: the first is the lowest


def verdict_stats(confidence: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict[str, float | None]:
    """``{"coverage": share with confidence >= threshold, "precision": share of them right}``
    (``precision`` is ``None`` when nothing is answered)."""
    answered = confidence >= threshold
    n = int(answered.sum())
    return {
        "coverage": n / max(len(confidence), 1),
        "precision": float(correct[answered].float().mean()) if n else None,
    }


def calibrate(logits: torch.Tensor, targets: torch.Tensor, *, target_precision: float = 0.95, min_support: int = 30,
              decode: str = "argmax") -> dict:
    """Fit the temperature and the review threshold on held-out labelled photos (the validation split).

    Args:
        logits: ``(N, C)`` the trained model's logits of every validation photo (all ranks' shares).
        targets: ``(N,)`` their class indices.
        target_precision: Wanted precision of "match" verdicts.
        min_support: Fewest validation photos the threshold must answer (see :func:`choose_review_threshold`).
        decode: The model's decoding rule (an answer's confidence is its count's calibrated probability).

    Returns:
        The fields of :class:`bincount.models.card.Calibration`.

    Raises:
        ValueError: If there is no photo.
    """
    if len(targets) == 0:
        raise ValueError("calibration needs labelled photos; the validation split yielded none")
    logits, targets = logits.detach().float().cpu(), targets.detach().cpu()
    temperature = fit_temperature(logits, targets)
    probs = logits.softmax(dim=1)
    calibrated = (logits / temperature).softmax(dim=1)
    confidence, pred = decode_counts(calibrated, decode)
    correct = pred == targets
    threshold = choose_review_threshold(confidence, correct, target_precision, min_support=min_support)
    out = {
        "temperature": temperature,
        "review_threshold": threshold,
        "target_precision": target_precision,
        "min_support": min_support,
        "ece_before": expected_calibration_error(probs, targets),
        "ece_after": expected_calibration_error(calibrated, targets),
        **verdict_stats(confidence, correct, threshold),
        "n": len(targets),
    }
    if threshold == NEVER:
        log.warning("no confidence threshold reaches %.0f%% precision on at least %d of %d validation photos: "
                    "every verdict will be 'review'", 100 * target_precision, min_support, len(targets))
    log.info("calibration: %s", out)
    return out


def held_out_report(probs: torch.Tensor, targets: torch.Tensor, calibration: dict, *, decode: str = "argmax") -> dict:
    """Calibration measured on photos it was not fitted on (the test split), for ``metrics.json``.

    Args:
        probs: ``(N, C)`` uncalibrated probabilities (``softmax(logits)``).
        targets: ``(N,)`` class indices.
        calibration: The output of :func:`calibrate`.
        decode: The model's decoding rule.

    Returns:
        ``ece_before``, ``ece_after``, ``temperature``, ``review_threshold``, ``target_precision``,
        ``review_coverage`` and ``review_precision`` (:func:`verdict_stats` on these photos).
    """
    # log(softmax(z)) = z - logsumexp(z): the logits up to a per-row constant, which softmax ignores
    calibrated = (probs.float().clamp_min(1e-30).log() / calibration["temperature"]).softmax(dim=1)
    confidence, pred = decode_counts(calibrated, decode)
    stats = verdict_stats(confidence, pred == targets, calibration["review_threshold"])
    return {
        "ece_before": expected_calibration_error(probs, targets),
        "ece_after": expected_calibration_error(calibrated, targets),
        "temperature": calibration["temperature"],
        "review_threshold": calibration["review_threshold"],
        "target_precision": calibration["target_precision"],
        "review_coverage": stats["coverage"],
        "review_precision": stats["precision"],
    }
