"""Counting metrics, built from torchmetrics so they are correct under DDP, and the per-photo
predictions every rank gathers for the reports and the calibration."""

from __future__ import annotations

import torch
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.distributed import gather_all_tensors


class OffByOneAccuracy(MeanMetric):
    """Share of predictions within one object of the truth, ``|pred - true| <= 1``.

    ``update(preds, target)`` takes class indices or counts of shape ``(N,)``.
    """

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(((preds - target).abs() <= 1).float())


def count_metrics(num_classes: int, **metric_kwargs) -> MetricCollection:
    """``acc``, ``obo_acc`` (off-by-one), ``mae`` and ``rmse`` (in objects) over predicted and true class
    indices ``(N,)``. ``metric_kwargs`` go to every metric (``sync_on_compute=False`` for predictions
    that one process already gathered).
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro", **metric_kwargs),
            "obo_acc": OffByOneAccuracy(**metric_kwargs),
            "mae": MeanAbsoluteError(**metric_kwargs),
            "rmse": MeanSquaredError(squared=False, **metric_kwargs),
        }
    )


def gather_by_index(strategy, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's per-photo rows, on every rank, in dataset order, each photo once (a rank's share may
    be padded with repeated photos: the first row of each ``index`` is kept). A collective call.

    Args:
        strategy: The Trainer's strategy (``trainer.strategy``); one process needs no gathering.
        local: ``index`` ``(N,)`` dataset indices, and other per-photo tensors with ``N`` rows;
            ``N`` may differ between ranks (a photo that failed to decode is missing).

    Returns:
        The same keys with the rows of every rank, on the CPU, sorted by ``index``.
    """
    if strategy.world_size > 1:  # torchmetrics pads the uneven shares to gather them, then trims them
        local = {k: torch.cat(gather_all_tensors(v.to(strategy.root_device).contiguous())) for k, v in local.items()}
    order = torch.argsort(local["index"], stable=True)
    local = {k: v[order].cpu() for k, v in local.items()}
    keep = torch.ones_like(local["index"], dtype=torch.bool)
    keep[1:] = local["index"][1:] != local["index"][:-1]
    return {k: v[keep] for k, v in local.items()}
