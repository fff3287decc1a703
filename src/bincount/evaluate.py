"""Evaluate an exported ``model/`` folder or a Lightning checkpoint on a folder of ABID photos.

Usage:
    python eval.py model_dir=outputs/RUN/model data.root=../shared/abid data.split=all
    python eval.py ckpt_path=outputs/RUN/checkpoints/last.ckpt data.root=../shared/abid
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from bincount.config import config_dir
from bincount.data.datamodule import CountingDataModule
from bincount.errors import one_error_line
from bincount.models.card import EvalPreset
from bincount.models.export import load_model_dir
from bincount.models.module import BinCountModule
from bincount.trainer import checked_checkpoint, instantiate_trainer, report_test

log = logging.getLogger(__name__)


def load_for_eval(cfg: DictConfig) -> tuple[BinCountModule, CountingDataModule]:
    """The model named by ``cfg.model_dir`` or ``cfg.ckpt_path``, and ``cfg.data`` prepared as it expects.

    The class range and the preprocessing come from the model: a model folder's card gives the
    whole eval preset, a checkpoint the input size only (else ``cfg.data.image_size`` is used).

    Returns:
        The model and the data module (not set up).

    Raises:
        ValueError: If neither or both are given, or the model folder's card is malformed.
        FileNotFoundError: If the folder or checkpoint lacks a file.
    """
    if bool(cfg.get("model_dir")) == bool(cfg.get("ckpt_path")):
        raise ValueError("give exactly one of model_dir=<run>/model or ckpt_path=<file.ckpt>")
    if cfg.get("model_dir"):
        net, card = load_model_dir(cfg.model_dir)
        model = BinCountModule(arch=card.arch, min_count=card.min_count, max_count=card.max_count,
                               decode=card.decode, tta=card.tta)
        model.net.load_state_dict(net.state_dict())
        preset = card.preset
    else:
        checkpoint = checked_checkpoint(cfg.ckpt_path)  # memory-mapped: only the hyperparameters are read here
        model = BinCountModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
        image_size = checkpoint.get("datamodule_hyper_parameters", {}).get("image_size")
        preset = None if image_size is None else EvalPreset(image_size=image_size)
    from_model = {"min_count": model.hparams.min_count, "max_count": model.hparams.max_count}
    if preset is not None:
        from_model["image_size"] = preset.image_size
    datamodule = hydra.utils.instantiate(cfg.data, **from_model)
    if preset is not None:
        datamodule.eval_preset = preset.build()  # before setup(): the test split's photos go through it
    return model, datamodule


def evaluate(cfg: DictConfig) -> dict:
    """Test the model of :func:`load_for_eval` on ``cfg.data`` and write ``metrics.json``,
    ``predictions.csv`` and ``confusion_matrix.png`` into ``cfg.paths.output_dir``.

    Returns:
        The report (see :func:`bincount.report.count_report`); ``{}`` on ranks other than global 0.
    """
    model, datamodule = load_for_eval(cfg)
    trainer = instantiate_trainer(cfg)
    trainer.test(model, datamodule=datamodule)
    if not trainer.is_global_zero:
        return {}
    source = cfg.get("model_dir") or cfg.get("ckpt_path")
    out_dir = Path(cfg.paths.output_dir)
    report = report_test(model, datamodule, out_dir, title=f"{source} on {datamodule.root} ({cfg.data.split})")
    rank_zero_info(f"wrote metrics.json, predictions.csv and confusion_matrix.png to {out_dir}")
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@one_error_line
def main(cfg: DictConfig) -> None:
    """Hydra entry point; an expected failure is one ``error:`` line and exit status 2."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
