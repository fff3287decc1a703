"""The LightningModule that fine-tunes a torchvision backbone to count objects in bin photos."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MaxMetric

from bincount.models.backbones import build_backbone
from bincount.models.metrics import count_metrics


class BinCountModule(L.LightningModule):
    """Counting as classification over ``min_count..max_count`` with cross-entropy.

    This is the ABID challenge baseline's formulation (silverbottlep/abid_challenge): class ``k``
    means ``min_count + k`` objects. Hyperparameters are primitives, so
    ``BinCountModule.load_from_checkpoint(path)`` needs no Hydra.

    Args:
        arch: torchvision model name (``resnet18``, ``resnet50``, ...).
        min_count: Count of class 0.
        max_count: Count of the last class.
        weights: torchvision pretrained weights name or ``None`` (random init).
        weights_path: Local file of those weights (offline machines).
        label_smoothing: Cross-entropy label smoothing.
        channels_last: Use the channels-last memory format (faster convolutions on CPU and GPU).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); needed only for training.
        scheduler: ``optimizer -> LRScheduler`` (a Hydra ``_partial_``) or ``None``.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        min_count: int = 1,
        max_count: int = 5,
        weights: str | None = None,
        weights_path: str | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = build_backbone(arch, self.num_classes, weights=weights, weights_path=weights_path)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.metrics = nn.ModuleDict(
            {stage: count_metrics(self.num_classes) for stage in ("train_", "val_", "test_")}
        )
        self.val_acc_best = MaxMetric()
        self.test_outputs: list[dict[str, torch.Tensor]] = []
        self.test_predictions: dict[str, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.hparams.max_count - self.hparams.min_count + 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, num_classes)`` logits."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _shared_step(self, batch, stage: str) -> dict[str, torch.Tensor] | None:
        if batch is None:  # every photo of the batch failed to decode (each was warned about)
            return None
        images, targets, indices = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        preds = logits.argmax(dim=1)
        metrics = self.metrics[f"{stage}_"]
        for name, metric in metrics.items():
            if name == "acc":
                metric.update(preds, targets)
            else:
                metric.update(preds.float(), targets.float())
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(targets),
                 sync_dist=not on_step)
        self.log_dict(
            {f"{stage}/{k}": m for k, m in metrics.items()},
            on_step=False,
            on_epoch=True,
            prog_bar=stage != "train",
            batch_size=len(targets),
        )
        return {"loss": loss, "logits": logits, "preds": preds, "targets": targets, "indices": indices}

    def training_step(self, batch, batch_idx: int):
        out = self._shared_step(batch, "train")
        return None if out is None else out["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.metrics["val_"]["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self.test_outputs = []

    def test_step(self, batch, batch_idx: int) -> None:
        out = self._shared_step(batch, "test")
        if out is None:
            return
        self.test_outputs.append(
            {"index": out["indices"], "target": out["targets"], "probs": out["logits"].float().softmax(dim=1)}
        )

    def on_test_epoch_end(self) -> None:
        """Gather every rank's per-photo predictions into ``self.test_predictions``.

        ``index`` ``(N,)`` (dataset index), ``target`` ``(N,)`` (class index), ``probs``
        ``(N, num_classes)``; duplicates that DDP's sampler pads with are removed.
        """
        if self.test_outputs:
            local = {k: torch.cat([o[k] for o in self.test_outputs]) for k in self.test_outputs[0]}
        else:
            local = {
                "index": torch.empty(0, dtype=torch.long, device=self.device),
                "target": torch.empty(0, dtype=torch.long, device=self.device),
                "probs": torch.empty(0, self.num_classes, device=self.device),
            }
        if self.trainer.world_size > 1:
            # all_gather needs equal shapes; ranks differ when a photo failed to decode
            longest = int(self.all_gather(torch.tensor(len(local["index"]), device=self.device)).max())
            pad = longest - len(local["index"])
            local = {
                "index": F.pad(local["index"], (0, pad), value=-1),
                "target": F.pad(local["target"], (0, pad)),
                "probs": F.pad(local["probs"], (0, 0, 0, pad)),
            }
            gathered = {k: v.flatten(0, 1) for k, v in self.all_gather(local).items()}
            real = gathered["index"] >= 0
            gathered = {k: v[real] for k, v in gathered.items()}
        else:
            gathered = local
        order = torch.argsort(gathered["index"], stable=True)
        gathered = {k: v[order].cpu() for k, v in gathered.items()}
        keep = torch.ones_like(gathered["index"], dtype=torch.bool)
        keep[1:] = gathered["index"][1:] != gathered["index"][:-1]
        self.test_predictions = {k: v[keep] for k, v in gathered.items()}
        self.test_outputs = []

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        if batch is None:
            return None
        images, targets, indices = batch
        return {"index": indices, "target": targets, "probs": self(images).float().softmax(dim=1)}

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("BinCountModule needs an optimizer to train (model.optimizer in the config)")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
