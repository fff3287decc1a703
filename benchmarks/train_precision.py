"""Training throughput in float32 vs bfloat16 mixed precision: the quickstart's own training step.

Usage:
    python benchmarks/train_precision.py --root ../shared/abid --rounds 4 --batches 20

Each round trains a fresh model of the composed config (default: ``+experiment=quickstart``; any
``train.py`` override after ``--``) for ``--warmup`` + ``--batches`` steps with Lightning, once per
precision, the precisions alternating (ABBA) so both see the same machine load. The figure is
images/s over the timed steps (data loading included, as in a real run); each speedup over the
first precision is the median of the per-round ratios. Writes ``<out>/results.json`` and
``<out>/summary.md`` through ``results_io`` (schema ``bincount-benchmark/1``; the committed
``benchmarks/results/train_precision/results.json`` predates it and reads as before until re-run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir

from bincount.config import config_dir
from bincount.precision import cpu_has_bf16
from results_io import add_out_argument, alternate, write_results  # benchmarks/ is on sys.path
from train_loop import Timer


def train_rate(cfg, datamodule, precision: str, warmup: int, batches: int) -> float:
    """Images/s of ``batches`` training steps of a fresh ``cfg.model`` in ``precision``."""
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    timer = Timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=warmup + batches,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
    return timer.seen / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid", help="ABID-layout folder (data.root)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="timed training steps per round and precision")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    add_out_argument(parser, "train_precision")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: +experiment=quickstart)")
    args = parser.parse_args()

    overrides = args.overrides or ["+experiment=quickstart"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"data.root={Path(args.root).resolve()}"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")  # photos decoded (and, with cache_images, cached) once for all rounds

    rates, order = alternate(
        {p: (lambda _r, p=p: train_rate(cfg, datamodule, p, args.warmup, args.batches)) for p in args.precisions},
        args.rounds)
    base = args.precisions[0]
    write_results(args.out, name="train_precision", unit="images/s", rounds=rates, order=order,
                  what=f"Lightning training steps of {cfg.model.arch} ({' '.join(overrides)}; "
                       f"{cfg.data.image_size} px, "
                       f"batch {cfg.data.batch_size}, {cfg.data.num_workers} workers, {args.batches} timed steps "
                       f"after {args.warmup}, data loading included) in {' vs '.join(args.precisions)}.",
                  ratios={f"{p} / {base}": (p, base) for p in args.precisions[1:]},
                  config={"overrides": overrides, "root": str(args.root), "arch": cfg.model.arch,
                          "image_size": cfg.data.image_size, "batch_size": cfg.data.batch_size,
                          "num_workers": cfg.data.num_workers, "rounds": args.rounds, "warmup": args.warmup,
                          "batches": args.batches, "precisions": args.precisions},
                  extra={"cpu_bf16_instructions": cpu_has_bf16()})


if __name__ == "__main__":
    main()
