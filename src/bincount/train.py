"""Train a bin-count model, test its best checkpoint and export it for serving.

Usage:
    python train.py +experiment=quickstart data.root=../shared/abid
    python train.py +experiment=resnet18_subset data.root=data/abid trainer.max_epochs=20
    python train.py +experiment=quickstart hydra.run.dir=outputs/RUN ckpt_path=last   # resume
    python train.py -m hparams_search=lr_optuna +experiment=quickstart data.root=../shared/abid
    python train.py +experiment=quickstart data.root=../shared/abid logger=mlflow   # tracked in MLflow
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
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from omegaconf import DictConfig, OmegaConf

from bincount.config import config_dir
from bincount.data.datamodule import ABIDDataModule
from bincount.errors import one_error_line
from bincount.models.calibration import calibrate, held_out_report
from bincount.models.card import Calibration, EvalPreset, ModelCard
from bincount.models.export import save_model_dir
from bincount.models.module import BinCountModule
from bincount.stop import Stopped, stop_on_sigterm
from bincount.tracking import log_outputs, start
from bincount.trainer import checked_checkpoint, instantiate_trainer, report_test

log = logging.getLogger(__name__)


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


class StoppedRun(SystemExit):
    """A run stopped by SIGTERM or SIGINT before it finished: exits with status 128 + the signal.

    Attributes:
        message: The line printed for it (where it stopped, what was kept), without the resume command.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.message = message


def stop(signum: int, message: str, out_dir: Path, trainer: L.Trainer | None = None) -> StoppedRun:
    """Print ``message`` and the command that resumes the run; the exception to raise.

    Args:
        trainer: Given when each rank stops on its own (after training): every rank prints, naming
            itself under several processes. Else the ranks stop together and global rank 0 prints.
    """
    text = f"{message}. Resume with:\n  {resume_command(out_dir)}"
    if trainer is None:
        rank_zero_info(text)
    else:
        log.info(rank_prefixed_message(text, trainer.global_rank) if trainer.world_size > 1 else text)
    return StoppedRun(signum, message)


def fit(trainer: L.Trainer, model: BinCountModule, datamodule, ckpt_path: str | None, out_dir: Path) -> None:
    """``trainer.fit``; a run stopped by SIGTERM or Ctrl-C (after ``last.ckpt`` is written at the
    current step) exits with status 143 or 130 and says how to resume, never 0 as if finished.

    Raises:
        StoppedRun: With 143 (SIGTERM) or 130 (SIGINT) when the run was stopped.
    """
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit as stopped:  # Lightning's SIGTERMException or its exit(1) after Ctrl-C
        if not trainer.interrupted:
            raise
        signum = signal.SIGTERM if isinstance(stopped, SIGTERMException) else signal.SIGINT
        raise stop(signum, f"training stopped by {signum.name} at epoch {trainer.current_epoch}, step "
                           f"{trainer.global_step}; last.ckpt saved, nothing tested or exported", out_dir) from None


def select_weights(trainer: L.Trainer, model: BinCountModule) -> str:
    """Load the weights validation chose (the monitored checkpoint's ``state_dict``: with
    ``EMAWeightAveraging`` the average, where ``trainer.test(ckpt_path=...)`` would restore the raw
    weights) into ``model``. Global rank 0 reads the file (the instances of a job share no disk) and
    broadcasts the tensors.

    Returns:
        The checkpoint's path, or ``""`` when there is none (no validation ran): ``model`` keeps
        its final weights.
    """
    monitored = [cb for cb in trainer.checkpoint_callbacks if cb.monitor]
    best = monitored[0].best_model_path if monitored else ""
    if best:
        state = None
        if trainer.is_global_zero:
            state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(trainer.strategy.broadcast(state, src=0))
    else:
        log.warning("no best checkpoint (no validation ran?); testing the final weights")
    rank_zero_info(f"testing {best or 'the final weights'}")
    return best


def finish(trainer: L.Trainer, model: BinCountModule, datamodule: ABIDDataModule, out_dir: Path,
           checkpoint: str) -> None:
    """After the test: predict the validation split on every rank (a collective call); on global rank 0,
    fit the calibration on it, write the test report (with the calibration measured on the test split)
    and export ``model/``.

    Args:
        model: The tested model (weights validation chose, ``test_predictions`` gathered).
        checkpoint: Path of the checkpoint the weights came from, or ``""``.
    """
    # return_predictions=True: a spawning launcher, which cannot return them, fails here with Lightning's
    # error instead of calibrating on nothing
    val = model.gather_rows(trainer.predict(model, dataloaders=datamodule.val_dataloader(), return_predictions=True),
                            "logits")
    if not trainer.is_global_zero:
        return
    decode = model.hparams.decode
    calibration = calibrate(val["logits"], val["target"], decode=decode)
    held_out = held_out_report(model.test_predictions["probs"], model.test_predictions["target"], calibration,
                               decode=decode)
    report_test(model, datamodule, out_dir, title=f"test split of {datamodule.root}", extra=held_out)
    card = ModelCard(
        arch=model.hparams.arch, min_count=model.hparams.min_count, max_count=model.hparams.max_count,
        preset=EvalPreset.of(datamodule.eval_preset), decode=decode, tta=model.hparams.tta,
        checkpoint=Path(checkpoint).name if checkpoint else None, calibration=Calibration(**calibration),
    )
    save_model_dir(model.net, out_dir / "model", card)
    rank_zero_info(f"run folder: {out_dir}")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, select the weights validation chose, test them, then calibrate, report and export
    (with ``logger=mlflow``, into an MLflow run too). On any number of processes and instances,
    which need share no disk: global rank 0 writes the report and ``model/``.

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
    start(trainer, cfg, out_dir)  # logger=mlflow: the MLflow run, its tags and params (rank 0)

    fit(trainer, model, datamodule, ckpt_path, out_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # after training, Lightning's SIGTERM handler only records the signal and the default action
    # would end the process part-way through writing the outputs
    with stop_on_sigterm(sigint=True) as stopping:
        try:
            if cfg.get("test", True):
                best = select_weights(trainer, model)
                trainer.test(model, datamodule=datamodule)
                metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
                finish(trainer, model, datamodule, out_dir, best)
            log_outputs(trainer, out_dir)  # logger=mlflow: the report and model/ as artifacts (rank 0)
        except BaseException as err:
            # an error raised while the stop unwinds (Lightning's teardown of an interrupted test, a
            # collective whose peer has stopped) is the stop too
            signum = err.signum if isinstance(err, Stopped) else stopping.received
            if signum is not None:
                raise stop(signum, f"stopped by {signal.Signals(signum).name} after training (step "
                                   f"{trainer.global_step}), before the test, calibration and export were done; "
                                   "model/ not written", out_dir, trainer) from None
            if isinstance(err, OSError):  # a full disk, a read-only folder: training is safe in last.ckpt
                rank_zero_info("training finished, but its outputs could not be written (below); once that is "
                               f"fixed, test and export without training again:\n  {resume_command(out_dir)}")
            raise
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@one_error_line
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers. An expected failure is one
    ``error:`` line and exit status 2."""
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
