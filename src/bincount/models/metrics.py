"""Counting metrics, built from torchmetrics so they are correct under DDP."""

from __future__ import annotations

import torch
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix


class OffByOneAccuracy(MeanMetric):
    """Share of predictions within one object of the truth, ``|pred - true| <= 1``.

    ``update(preds, target)`` takes class indices or counts of shape ``(N,)``.
    """

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(((preds - target).abs() <= 1).float())


def count_metrics(num_classes: int) -> MetricCollection:
    """Scalar counting metrics over predicted and true class indices of shape ``(N,)``.

    ``acc`` (top-1 accuracy over all photos), ``obo_acc`` (off-by-one accuracy), ``mae`` and
    ``rmse`` in objects. Class indices and counts differ by a constant, so errors are in objects.
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "obo_acc": OffByOneAccuracy(),
            "mae": MeanAbsoluteError(),
            "rmse": MeanSquaredError(squared=False),
        }
    )


def per_class_metrics(num_classes: int) -> dict[str, Metric]:
    """Per-class accuracy ``(num_classes,)`` (recall of each count) and the confusion matrix
    ``(num_classes, num_classes)`` (rows: true count, columns: predicted)."""
    return {
        "per_class_acc": MulticlassAccuracy(num_classes=num_classes, average=None),
        "confusion_matrix": MulticlassConfusionMatrix(num_classes=num_classes),
    }
