"""Calibrated confidence and the review threshold behind bin verification.

A verdict ("this bin holds the expected quantity" or "it does not") is only as good as the
confidence it rests on. After training, on the validation split:

1. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar
   ``T > 0`` divides the logits, fitted by LBFGS on the negative log-likelihood. It changes how
   sure the model says it is, never which count it picks.
2. Expected calibration error (torchmetrics ``MulticlassCalibrationError``, 15 equal-width
   bins, L1) before and after, so the gain is measured rather than assumed.
3. The review threshold: the lowest calibrated confidence at which the model's count is right
   at least ``target_precision`` of the time. A "match" verdict is right exactly when the
   predicted count is right, so this is the precision of "match" verdicts; answers below the
   threshold become "review" (a person looks).
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



def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)``.

    ``log T`` is optimised, so ``T`` stays positive without a constraint.

    Args:
        logits: ``(N, C)``.
        targets: ``(N,)`` class indices.
        max_iter: LBFGS iterations.

    Returns:
        ``T`` (``> 1`` softens an over-confident model, ``< 1`` sharpens an under-confident one).

    Raises:
        ValueError: If there are no samples.
    """
    if len(targets) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    logits, targets = logits.detach().double(), targets.detach()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, *, n_bins: int = 15) -> float:
    """Expected calibration error: the confidence-vs-accuracy gap averaged over confidence bins.

    Args:
        probs: ``(N, C)`` probabilities.
        targets: ``(N,)`` class indices.
        n_bins: Equal-width confidence bins.

    Returns:
        ECE in ``[0, 1]`` (L1, weighted by the share of samples in each bin).
    """
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1", sync_on_compute=False)
    return float(metric(probs.float(), targets))


def choose_review_threshold(confidence: torch.Tensor, correct: torch.Tensor, target_precision: float, *,
                            min_support: int = 30) -> float:
    """The lowest confidence threshold whose confident answers are right ``target_precision`` of the time.

    "Confident" means ``confidence >= threshold``. Among thresholds meeting the precision on at
    least ``min_support`` photos, the lowest answers the most photos without review. The support
    floor keeps a threshold from resting on the handful of most confident photos, whose
    precision says little about the next thousand.

    Args:
        confidence: ``(N,)`` calibrated top-1 probabilities.
        correct: ``(N,)`` bools, whether the top-1 count was right.
        target_precision: Wanted share of right answers among confident ones, in ``(0, 1]``.
        min_support: Fewest photos a threshold must answer.

    Returns:
        The threshold, or :data:`NEVER` (every verdict "review") when no threshold reaches the
        precision on enough of these photos.

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
    """Share of photos answered without review and the precision of those answers.

    Returns:
        ``{"coverage": share with confidence >= threshold, "precision": share of them right}``
        (``precision`` is ``None`` when nothing is answered).
    """
    answered = confidence >= threshold
    n = int(answered.sum())
    return {
        "coverage": n / max(len(confidence), 1),
        "precision": float(correct[answered].float().mean()) if n else None,
    }


def calibrate(logits: torch.Tensor, targets: torch.Tensor, *, target_precision: float = 0.95, min_support: int = 30,
              n_bins: int = 15, decode: str = "argmax") -> dict:
    """Fit the temperature and the review threshold on held-out labelled photos (the validation split).

    Args:
        logits: ``(N, C)`` the trained model's logits of every validation photo (all ranks'
            shares gathered: :func:`bincount.models.metrics.gather_by_index`).
        targets: ``(N,)`` their class indices.
        target_precision: Wanted precision of "match" verdicts.
        min_support: Fewest validation photos the threshold must answer (see :func:`choose_review_threshold`).
        n_bins: ECE bins.
        decode: The model's decoding rule; the confidence of an answer is the calibrated
            probability of the count it decodes to.

    Returns:
        The ``calibration`` entry of ``model_config.json``: ``temperature``, ``review_threshold``,
        ``target_precision``, ``min_support``, ``ece_before``, ``ece_after``, ``coverage`` and
        ``precision`` (of the threshold on these photos) and ``n`` (photos used).

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
        "ece_before": expected_calibration_error(probs, targets, n_bins=n_bins),
        "ece_after": expected_calibration_error(calibrated, targets, n_bins=n_bins),
        **verdict_stats(confidence, correct, threshold),
        "n": len(targets),
    }
    if threshold == NEVER:
        log.warning("no confidence threshold reaches %.0f%% precision on at least %d of %d validation photos: "
                    "every verdict will be 'review'", 100 * target_precision, min_support, len(targets))
    log.info("calibration: %s", out)
    return out


def held_out_report(probs: torch.Tensor, targets: torch.Tensor, calibration: dict, *, n_bins: int = 15,
                    decode: str = "argmax") -> dict:
    """Calibration measured on photos it was not fitted on (the test split), for ``metrics.json``.

    Args:
        probs: ``(N, C)`` uncalibrated probabilities (``softmax(logits)``).
        targets: ``(N,)`` class indices.
        calibration: The output of :func:`calibrate`.
        n_bins: ECE bins.
        decode: The model's decoding rule.

    Returns:
        ``ece_before``, ``ece_after``, ``temperature``, ``review_threshold``, ``target_precision``,
        and ``review_coverage`` / ``review_precision``: the share of these photos answered
        without review and how often those answers were right.
    """
    # log(softmax(z)) = z - logsumexp(z): the logits up to a per-row constant, which softmax ignores
    calibrated = (probs.float().clamp_min(1e-30).log() / calibration["temperature"]).softmax(dim=1)
    confidence, pred = decode_counts(calibrated, decode)
    stats = verdict_stats(confidence, pred == targets, calibration["review_threshold"])
    return {
        "ece_before": expected_calibration_error(probs, targets, n_bins=n_bins),
        "ece_after": expected_calibration_error(calibrated, targets, n_bins=n_bins),
        "temperature": calibration["temperature"],
        "review_threshold": calibration["review_threshold"],
        "target_precision": calibration["target_precision"],
        "review_coverage": stats["coverage"],
        "review_precision": stats["precision"],
    }
