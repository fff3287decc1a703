"""What ``train`` and ``evaluate`` share: the Trainer of the config, checked checkpoints, the test report."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from bincount.data.datamodule import ABIDDataModule
from bincount.models.module import BinCountModule
from bincount.precision import AUTO, choose_precision
from bincount.report import print_report, write_report


def instantiate_trainer(cfg: DictConfig) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the non-null ``cfg.callbacks`` and ``cfg.logger`` entries.

    ``trainer.precision=auto`` becomes the precision :func:`bincount.precision.choose_precision`
    picks for this machine, logged once with its reason.
    """
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    kwargs = {}
    if cfg.trainer.get("precision") == AUTO:
        kwargs["precision"], reason = choose_precision(cfg.trainer.get("accelerator", AUTO))
        rank_zero_info(f"trainer.precision=auto: {kwargs['precision']} ({reason})")
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **kwargs)


def checked_checkpoint(path: str | Path) -> dict:
    """The Lightning checkpoint at ``path``, memory-mapped (its structure is read, not its weights).

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is not a Lightning checkpoint; both name the config key ``ckpt_path``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"ckpt_path={path}: not a Lightning checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def report_test(model: BinCountModule, datamodule: ABIDDataModule, out_dir: Path, title: str,
                extra: dict | None = None) -> dict:
    """Write the report of the last ``trainer.test`` into ``out_dir`` and print it (on global rank 0 only).

    ``model.test_predictions`` hold every rank's photos, the test split of ``datamodule`` names them;
    ``extra`` are more fields for ``metrics.json``. Returns the metrics (:func:`bincount.report.write_report`).
    """
    pred = model.test_predictions
    records = datamodule.splits["test"]
    image_ids = [records[i].image_id for i in pred["index"].tolist()]
    metrics = write_report(out_dir, image_ids, pred["target"], pred["probs"], min_count=model.hparams.min_count,
                           title=title, decode=model.hparams.decode, extra=extra)
    print_report(metrics, title)
    return metrics
