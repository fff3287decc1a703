"""Lightning callbacks: one stop on SIGTERM for every rank, and log lines for runs whose only window
is a log stream (SageMaker jobs, CloudWatch; ``conf/callbacks/sagemaker.yaml``)."""

from __future__ import annotations

import logging
import signal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

PREFIX = "[bincount]"


def format_metrics(metrics: dict[str, float]) -> str:
    """``{"val/acc": 0.8125}`` -> ``"val/acc=0.8125"``, sorted by name (scalar values only)."""
    return " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))


def metric_regex(name: str) -> str:
    """The regular expression that reads metric ``name`` from a :class:`MetricLines` line (SageMaker metric
    definitions); the leading space and ``=`` keep ``val/acc`` from matching ``val/obo_acc`` or ``val/acc_best``.
    """
    return f" {name}=([-+0-9.eE]+|nan|inf)"


class MetricLines(L.Callback):
    """One ``key=value`` log line per event, on global rank zero, for log scrapers::

        [bincount] fit start epoch=0 global_step=0 world_size=2
        [bincount] validation epoch=0 global_step=3 val/acc=0.4 val/acc_best=0.4 val/loss=1.6 ...
        [bincount] fit end epoch=1 global_step=6 train/loss_epoch=1.61 ...
        [bincount] test global_step=3 test/acc=0.375 ...
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


class StopOnSigterm(L.Callback):
    """Stop training at the same step on every rank when any rank receives SIGTERM.

    Lightning 2.6's own handler broadcasts inside the signal handler and each rank raises
    ``SIGTERMException`` at its own step or epoch end, so under DDP the ranks can end up waiting
    in different collectives. Here the handler only records the signal; after every training step
    the ranks add up their flags (one all-reduce) and all raise ``SIGTERMException`` together, after
    which ``ModelCheckpoint(save_on_exception=True)`` writes ``last.ckpt`` at that step. A signal
    during validation takes effect at the next training step.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def _record(self, signum, frame) -> None:
        self.received = True  # nothing else: a collective inside a signal handler can deadlock

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its own handler (Trainer._run) before: this one replaces it
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        stop = self.received
        if trainer.world_size > 1:  # one process needs no agreement (and no device sync per step)
            flag = torch.tensor(float(stop), device=trainer.strategy.root_device)
            stop = trainer.strategy.reduce(flag, reduce_op="sum").item() > 0
        if stop:
            log.info("[rank: %d] SIGTERM received: every rank stops after step %d", trainer.global_rank,
                     trainer.global_step)
            # the message reaches ModelCheckpoint's "An SIGTERMException was raised with message: ..." line
            raise SIGTERMException(f"SIGTERM received, training stopped after step {trainer.global_step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
