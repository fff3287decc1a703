"""Lightning callbacks for runs whose only window is a log stream (SageMaker jobs, CloudWatch).

Selected by ``conf/callbacks/sagemaker.yaml``. Spot interruptions need no callback of ours:
Lightning turns SIGTERM into ``SIGTERMException`` after the current batch, and
``ModelCheckpoint(save_on_exception=True)`` then writes ``last.ckpt`` (``conf/callbacks/default.yaml``).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

PREFIX = "[bincount]"


def format_metrics(metrics: dict[str, float]) -> str:
    """``{"val/acc": 0.8125}`` -> ``"val/acc=0.8125"``, sorted by name (scalar values only)."""
    return " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))


def metric_regex(name: str) -> str:
    """The regular expression that reads metric ``name`` from a :class:`MetricLines` line.

    SageMaker metric definitions and tuning objectives use it; the leading space keeps
    ``val/acc`` from matching inside ``val/obo_acc``, and ``=`` from matching ``val/acc_best``.
    """
    return f" {name}=([-+0-9.eE]+|nan|inf)"


class MetricLines(L.Callback):
    """One ``key=value`` log line per event, on global rank zero, for log scrapers.

    Lines (every value a scalar from ``trainer.callback_metrics``)::

        [bincount] fit start epoch=0 global_step=0 world_size=2
        [bincount] validation epoch=0 global_step=3 val/acc=0.4 val/acc_best=0.4 val/loss=1.6 ...
        [bincount] fit end epoch=1 global_step=6 train/loss_epoch=1.61 ...
        [bincount] test global_step=3 test/acc=0.375 ...

    ``fit start`` shows where a resumed run picks up (``global_step`` > 0).
    """

    def _line(self, event: str, trainer: L.Trainer, prefix: str, with_epoch: bool = True) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(prefix) and getattr(v, "numel", lambda: 1)() == 1}
        where = f"epoch={trainer.current_epoch} " if with_epoch else ""
        rank_zero_info(f"{PREFIX} {event} {where}global_step={trainer.global_step} {format_metrics(metrics)}".rstrip())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"{PREFIX} fit start epoch={trainer.current_epoch} global_step={trainer.global_step} "
                       f"world_size={trainer.world_size}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a checkpoint is restored (on_fit_start runs before): where training continues
        rank_zero_info(f"{PREFIX} train start epoch={trainer.current_epoch} global_step={trainer.global_step}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: the epoch's metrics are aggregated by now
        if not trainer.sanity_checking:
            self._line("validation", trainer, "val/")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the last epoch's train/* (epoch metrics are aggregated after on_train_epoch_end hooks)
        self._line("fit end", trainer, "train/")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line("test", trainer, "test/", with_epoch=False)
