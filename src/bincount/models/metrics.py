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


def count_metrics(num_classes: int, **metric_kwargs) -> MetricCollection:
    """Scalar counting metrics over predicted and true class indices of shape ``(N,)``.

    ``acc`` (top-1 accuracy over all photos), ``obo_acc`` (off-by-one accuracy), ``mae`` and
    ``rmse`` in objects. Class indices and counts differ by a constant, so errors are in objects.
    ``metric_kwargs`` go to every metric (``sync_on_compute=False`` for predictions that one
    process already gathered: syncing them would wait for ranks that are not computing).
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro", **metric_kwargs),
            "obo_acc": OffByOneAccuracy(**metric_kwargs),
            "mae": MeanAbsoluteError(**metric_kwargs),
            "rmse": MeanSquaredError(squared=False, **metric_kwargs),
        }
    )


def per_class_metrics(num_classes: int, **metric_kwargs) -> dict[str, Metric]:
    """Per-class accuracy ``(num_classes,)`` (recall of each count) and the confusion matrix
    ``(num_classes, num_classes)`` (rows: true count, columns: predicted)."""
    return {
        "per_class_acc": MulticlassAccuracy(num_classes=num_classes, average=None, **metric_kwargs),
        "confusion_matrix": MulticlassConfusionMatrix(num_classes=num_classes, **metric_kwargs),
    }
