"""Train a bin-count model, test its best checkpoint and export it for serving.

Usage:
    python train.py +experiment=quickstart data.root=../shared/abid
    python train.py +experiment=resnet18_subset data.root=data/abid trainer.max_epochs=20
    python train.py +experiment=quickstart hydra.run.dir=outputs/RUN ckpt_path=last   # resume
    python train.py -m hparams_search=lr_optuna +experiment=quickstart data.root=../shared/abid
"""

from __future__ import annotations

import logging
import shlex
import signal
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from bincount.config import config_dir
from bincount.data.datamodule import ABIDDataModule
from bincount.models.calibration import calibrate, held_out_report
from bincount.models.card import Calibration, EvalPreset, ModelCard
from bincount.models.export import save_model_dir
from bincount.models.module import BinCountModule, gather_by_index
from bincount.precision import AUTO, choose_precision
from bincount.report import print_report, write_report

log = logging.getLogger(__name__)


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


def report_test(trainer: L.Trainer, model: BinCountModule, datamodule: ABIDDataModule, out_dir: Path,
                title: str, extra: dict | None = None) -> dict:
    """Write and print the test report from ``model.test_predictions`` (global rank 0 only);
    ``extra`` fields go into ``metrics.json`` too."""
    if not trainer.is_global_zero:
        return {}
    pred = model.test_predictions
    records = datamodule.splits["test"]
    image_ids = [records[i].image_id for i in pred["index"].tolist()]
    metrics = write_report(out_dir, image_ids, pred["target"], pred["probs"], min_count=model.hparams.min_count,
                           title=title, decode=model.hparams.decode, extra=extra)
    print_report(metrics, title)
    return metrics


def load_selected_weights(trainer: L.Trainer, model: BinCountModule, checkpoint_path: str) -> None:
    """Load the weights that validation chose into ``model``, on every rank.

    They are the checkpoint's ``state_dict``: with ``EMAWeightAveraging`` that is the average
    (the weights validation scored); the raw weights of that step are in ``current_model_state``,
    which ``trainer.test(ckpt_path=...)`` would restore while the callback is attached. Only
    global rank 0 reads the file, because ``ModelCheckpoint`` writes on its disk alone and the
    instances of a multi-instance job share no disk; the other ranks get the tensors broadcast.

    Raises:
        FileNotFoundError: On global rank 0, if the checkpoint is missing.
    """
    state = None
    if trainer.is_global_zero:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(trainer.strategy.broadcast(state, src=0))


def checked_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict:
    """The Lightning checkpoint at ``path``, memory-mapped (its structure is read, not its weights).

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is not a Lightning checkpoint; both name the config ``key``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{key}={path}: not a Lightning checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{key}={path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``cfg.ckpt_path`` names (``"last"``: ``last.ckpt`` of the run folder), checked.

    Raises:
        FileNotFoundError: If there is no such file (Lightning would start from scratch for "last").
        ValueError: If the file is not a checkpoint.
    """
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if ckpt_path == "last":
        path = Path(cfg.callbacks.model_checkpoint.dirpath) / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path=last: no checkpoint at {path}; pass hydra.run.dir=<the run folder> "
                                    "of the run to resume, or ckpt_path=<file.ckpt>")
    checked_checkpoint(path)
    return str(path)


def resume_command(out_dir: Path) -> str:
    """The command that resumes this run from its ``last.ckpt``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return f"the same call with ckpt_path={out_dir / 'checkpoints' / 'last.ckpt'}"
    keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return shlex.join(["python", "train.py", *keep, f"hydra.run.dir={out_dir}", "ckpt_path=last"])


def fit(trainer: L.Trainer, model: BinCountModule, datamodule, ckpt_path: str | None, out_dir: Path) -> None:
    """``trainer.fit``; a run stopped by SIGTERM or Ctrl-C (after ``last.ckpt`` is written at the
    current step) exits with status 143 or 130 and says how to resume, never 0 as if finished.

    Raises:
        SystemExit: With 143 (SIGTERM) or 130 (SIGINT) when the run was stopped.
    """
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit as stop:  # Lightning's SIGTERMException (exit code None: 0) or its exit(1) after Ctrl-C
        if not trainer.interrupted:
            raise
        by_sigterm = isinstance(stop, SIGTERMException)
        rank_zero_info(f"training stopped by {'SIGTERM' if by_sigterm else 'SIGINT'} at epoch {trainer.current_epoch}, "
                       f"step {trainer.global_step}; nothing tested or exported. Resume with:\n  {resume_command(out_dir)}")
        raise SystemExit(128 + (signal.SIGTERM if by_sigterm else signal.SIGINT)) from None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test, calibrate and export the weights of the best checkpoint.

    Works on any number of processes and instances (instances need share no disk): every rank
    tests its share of the test split and predicts its share of the validation split; global
    rank 0 writes the report and ``model/``.

    Args:
        cfg: The composed ``train.yaml`` config.

    Returns:
        The trainer's final callback metrics (``train/*``, ``val/*``, ``test/*``) as floats.
    """
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg)
    datamodule: ABIDDataModule = hydra.utils.instantiate(cfg.data)
    model: BinCountModule = hydra.utils.instantiate(cfg.model)
    trainer = instantiate_trainer(cfg)
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)

    fit(trainer, model, datamodule, ckpt_path, out_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if not cfg.get("test", True):
        return metrics

    monitored = [cb for cb in trainer.checkpoint_callbacks if cb.monitor]
    best = monitored[0].best_model_path if monitored else ""
    if best:
        load_selected_weights(trainer, model, best)
    else:
        log.warning("no best checkpoint (no validation ran?); testing the final weights")
    rank_zero_info(f"testing {best or 'the final weights'}")
    trainer.test(model, datamodule=datamodule)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    # calibration needs the whole validation split: every rank predicts its share, all are gathered
    model.to(trainer.strategy.root_device)
    val = gather_by_index(trainer.strategy, model.predict_batches(datamodule.val_dataloader()))
    model.cpu()
    if trainer.is_global_zero:
        decode = model.hparams.decode
        calibration = calibrate(val["logits"], val["target"], decode=decode)
        held_out = held_out_report(model.test_predictions["probs"], model.test_predictions["target"], calibration,
                                   decode=decode)
        report_test(trainer, model, datamodule, out_dir, title=f"test split of {datamodule.root}", extra=held_out)
        card = ModelCard(
            arch=model.hparams.arch, min_count=model.hparams.min_count, max_count=model.hparams.max_count,
            preset=EvalPreset.of(datamodule.eval_preset), decode=decode, tta=model.hparams.tta,
            checkpoint=Path(best).name if best else None, calibration=Calibration.from_dict(calibration),
        )
        save_model_dir(model.net, out_dir / "model", card)
        rank_zero_info(f"run folder: {out_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
