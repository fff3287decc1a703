"""The LightningModule that fine-tunes a torchvision backbone to count objects in bin photos."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn import functional as F
from torchmetrics import MaxMetric, MinMetric

from bincount.models.backbones import build_backbone
from bincount.models.card import check_count_range, check_option
from bincount.models.decoding import DecodeRule, TtaMode, decode_counts, with_tta
from bincount.models.metrics import count_metrics, gather_by_index

Loss = Literal["ce", "soft_ce"]
SchedulerInterval = Literal["epoch", "step"]


def soft_count_targets(targets: torch.Tensor, num_classes: int, sigma: float) -> torch.Tensor:
    """Soft labels over neighbouring counts, ``p(k) ∝ exp(-(k - y)^2 / (2 sigma^2))``: cross-entropy
    against them charges a near miss less than a far one (Gao et al. 2017, "Deep Label Distribution
    Learning With Label Ambiguity"). ``targets`` ``(N,)`` class indices -> ``(N, num_classes)`` rows summing to 1.
    """
    k = torch.arange(num_classes, device=targets.device, dtype=torch.float32)
    logits = -((k[None, :] - targets[:, None].float()) ** 2) / (2 * sigma**2)
    return logits.softmax(dim=1)


class BinCountModule(L.LightningModule):
    """Counting as classification over ``min_count..max_count``, as the ABID challenge baseline
    (silverbottlep/abid_challenge): class ``k`` means ``min_count + k`` objects. Hyperparameters are
    primitives, so ``BinCountModule.load_from_checkpoint(path)`` needs no Hydra.

    Args:
        arch: torchvision model name (``resnet18``, ``resnet50``, ...).
        min_count: Count of class 0.
        max_count: Count of the last class.
        weights: torchvision pretrained weights name or ``None`` (random init).
        weights_path: Local file of those weights (offline machines).
        label_smoothing: Cross-entropy label smoothing (``loss="ce"`` only).
        loss: ``"ce"`` or ``"soft_ce"`` (see :func:`soft_count_targets`).
        label_sigma: Width of the soft labels in objects (``loss="soft_ce"``).
        decode: How probabilities become a count (:func:`bincount.models.decoding.decode_counts`).
        tta: Test-time augmentation for validation, test and serving: ``"none"`` or ``"flips"``.
        channels_last: Use the channels-last memory format (faster convolutions).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); needed only for training.
        scheduler: ``optimizer -> LRScheduler`` (a Hydra ``_partial_``) or ``None``.
        scheduler_interval: ``"epoch"`` or ``"step"``; with ``"step"`` the scheduler is also given
            ``total_steps`` (the trainer's estimate), as ``torch.optim.lr_scheduler.OneCycleLR`` needs.

    Raises:
        ValueError: Naming the config key, if the count range is not whole numbers ``0 <= min_count <
            max_count``, an option is unknown, or ``label_smoothing`` is set with ``loss="soft_ce"``.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        min_count: int = 1,
        max_count: int = 5,
        weights: str | None = None,
        weights_path: str | None = None,
        label_smoothing: float = 0.0,
        loss: Loss = "ce",
        label_sigma: float = 1.0,
        decode: DecodeRule = "argmax",
        tta: TtaMode = "none",
        channels_last: bool = True,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: SchedulerInterval = "epoch",
    ) -> None:
        super().__init__()
        check_count_range(min_count, max_count, keys=" (data.min_count, data.max_count)")
        for name, value, kind in (("loss", loss, Loss), ("decode", decode, DecodeRule), ("tta", tta, TtaMode),
                                  ("scheduler_interval", scheduler_interval, SchedulerInterval)):
            check_option(f"model.{name}", value, kind)
        if loss == "soft_ce" and label_smoothing > 0:
            raise ValueError("model.label_smoothing applies to loss=ce; soft_ce already spreads its labels "
                             "(set model.label_sigma instead)")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.planned_steps: int | None = None  # a resumed step schedule's length (on_load_checkpoint)
        self.net = build_backbone(arch, self.num_classes, weights=weights, weights_path=weights_path)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.metrics = nn.ModuleDict(
            {stage: count_metrics(self.num_classes) for stage in ("train_", "val_", "test_")}
        )
        self.val_acc_best = MaxMetric()
        self.val_mae_best = MinMetric()  # what sweeps minimise (optimized_metric: val/mae_best)
        self.test_outputs: list[dict[str, torch.Tensor]] = []
        self.test_predictions: dict[str, torch.Tensor] = {}
        if optimizer is not None:
            try:  # a bad value (model.optimizer.lr=abc) fails here, not after the data is set up
                optimizer(params=self.parameters())
            except (TypeError, ValueError) as err:
                raise ValueError(f"model.optimizer: {err}") from None

    @property
    def num_classes(self) -> int:
        return self.hparams.max_count - self.hparams.min_count + 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, num_classes)`` logits; outside training with the
        model's TTA and in float32 even under a mixed-precision Trainer (the weights as served)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.training:
            return self.net(images)
        with torch.autocast(images.device.type, enabled=False):
            return with_tta(self.net, self.hparams.tta)(images.float())

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``(N, C)`` logits against ``(N,)`` class indices."""
        if self.hparams.loss == "soft_ce":
            return F.cross_entropy(logits, soft_count_targets(targets, self.num_classes, self.hparams.label_sigma))
        return F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)

    def _shared_step(self, batch, stage: str) -> dict[str, torch.Tensor] | None:
        if batch is None:  # every photo of the batch failed to decode
            return None
        images, targets, indices = batch
        logits = self(images)
        loss = self.loss(logits, targets)
        _, preds = decode_counts(logits.detach().float().softmax(dim=1), self.hparams.decode)
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
        self.val_mae_best(self.metrics["val_"]["mae"].compute())
        self.log("val/mae_best", self.val_mae_best.compute(), prog_bar=True, sync_dist=True)

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
        """Gather every rank's per-photo predictions into ``self.test_predictions``
        (:meth:`gather_rows`, with ``probs`` ``(N, num_classes)``)."""
        self.test_predictions = self.gather_rows(self.test_outputs, "probs")
        self.test_outputs = []

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        """``index`` ``(N,)``, ``target`` ``(N,)`` and ``logits`` ``(N, num_classes)`` float32 of a batch
        (``None``: its photos all failed to decode), for ``trainer.predict``."""
        if batch is None:
            return None
        images, targets, indices = batch
        return {"index": torch.as_tensor(indices, device=self.device), "target": targets,
                "logits": self(images).float()}

    def gather_rows(self, rows: list[dict[str, torch.Tensor] | None], values: str) -> dict[str, torch.Tensor]:
        """This rank's per-batch rows joined and gathered from every rank (:func:`gather_by_index`); collective.

        Args:
            rows: Batches of ``index`` ``(N,)``, ``target`` ``(N,)`` and ``values`` ``(N, num_classes)``
                (``None``: a batch whose photos all failed to decode).
            values: The key of the per-class values (``"probs"``, ``"logits"``).

        Returns:
            ``index``, ``target`` and ``values`` of every photo once, on the CPU, in dataset order.
        """
        rows = [r for r in rows if r is not None]
        if rows:
            local = {k: torch.cat([r[k] for r in rows]) for k in ("index", "target", values)}
        else:
            local = {"index": torch.empty(0, dtype=torch.long), "target": torch.empty(0, dtype=torch.long),
                     values: torch.empty(0, self.num_classes)}
        return gather_by_index(self.trainer.strategy, local)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resumed one-cycle schedule keeps its planned length
        schedulers = checkpoint.get("lr_schedulers") or [{}]
        self.planned_steps = schedulers[0].get("total_steps")

    def configure_optimizers(self):
        """The optimizer, and the scheduler stepped every ``scheduler_interval``.

        A step schedule (one-cycle) is planned over the trainer's ``estimated_stepping_batches``;
        one whose warm-up would be shorter than two steps (``OneCycleLR`` divides by zero or gives
        ``lr=0`` there) is left out and the run trains at the optimizer's constant ``lr``.

        Raises:
            RuntimeError: If the module was built without an optimizer.
            ValueError: If a resumed step schedule's length differs from this run's, or the run's
                length cannot bound its schedule (``trainer.max_epochs`` or ``trainer.max_steps``).
        """
        if self.optimizer_factory is None:
            raise RuntimeError("BinCountModule needs an optimizer to train (model.optimizer in the config)")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        interval = self.hparams.scheduler_interval
        if interval == "epoch":
            if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
                raise ValueError(f"model.scheduler steps once an epoch over trainer.max_epochs, which is "
                                 f"{self.trainer.max_epochs}: set trainer.max_epochs >= 1, or use model/scheduler=none "
                                 "for a run bounded by trainer.max_steps")
            scheduler = self.scheduler_factory(optimizer=optimizer)
        else:
            total = self.trainer.estimated_stepping_batches
            if total == float("inf"):
                raise ValueError("model.scheduler is planned over the run's steps: set trainer.max_epochs or "
                                 "trainer.max_steps")
            if self.planned_steps is not None and self.planned_steps != total:
                raise ValueError(
                    f"the checkpoint's step schedule (one-cycle) was planned for {self.planned_steps} steps and cannot "
                    f"be extended to this run's {total} (trainer.max_epochs changed?): resume with the run's own "
                    "trainer.max_epochs, or start a new run")
            # the warm-up share as the scheduler will see it: the config's value, else the class default
            warmup = inspect.signature(self.scheduler_factory).parameters.get("pct_start")
            if self.planned_steps is None and warmup is not None and warmup.default * total < 2:
                rank_zero_info(f"model.scheduler: {total} steps leave no room for one-cycle's warm-up "
                               f"(pct_start={warmup.default} x {total} < 2 steps): training at a constant "
                               f"lr={optimizer.param_groups[0]['lr']:g}")
                return optimizer
            scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
