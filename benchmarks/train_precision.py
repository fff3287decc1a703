"""Training throughput in float32 vs bfloat16 mixed precision: the quickstart's own training step.

Usage:
    python benchmarks/train_precision.py --root ../shared/abid --rounds 4 --batches 20

Each round trains a fresh model of the composed config (default: ``+experiment=quickstart``; any
``train.py`` override after ``--``) for ``--warmup`` + ``--batches`` steps with Lightning, once per
precision, the precisions alternating so both see the same machine load. The figure is
images/s over the timed steps (data loading included, as in a real run); the result is the
median over rounds and the ratio of medians. Writes ``<out>/results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir

from bincount.atomic import atomic_write
from bincount.config import config_dir
from bincount.precision import cpu_has_bf16
from train_loop import Timer  # benchmarks/ is on sys.path when this script runs

REPO = Path(__file__).resolve().parents[1]


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
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_precision")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: +experiment=quickstart)")
    args = parser.parse_args()

    overrides = args.overrides or ["+experiment=quickstart"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"data.root={Path(args.root).resolve()}"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")  # photos decoded (and, with cache_images, cached) once for all rounds

    rates: dict[str, list[float]] = {p: [] for p in args.precisions}
    for _ in range(args.rounds):
        for precision in args.precisions:
            rates[precision].append(train_rate(cfg, datamodule, precision, args.warmup, args.batches))
    median = {p: statistics.median(v) for p, v in rates.items()}
    base = args.precisions[0]
    result = {
        "benchmark": "train_precision",
        "command": " ".join(["python", "benchmarks/train_precision.py", *sys.argv[1:]]),
        "config": {"overrides": overrides, "arch": cfg.model.arch, "image_size": cfg.data.image_size,
                   "batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers},
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_bf16_instructions": cpu_has_bf16(), "torch": torch.__version__},
        "rounds": args.rounds, "warmup": args.warmup, "batches": args.batches,
        "images_per_s": rates, "median_images_per_s": median,
        "speedup_vs_" + base: {p: median[p] / median[base] for p in args.precisions},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / "results.json") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(f"{cfg.model.arch} {cfg.data.image_size} px, batch {cfg.data.batch_size}, "
          f"{cfg.data.num_workers} workers, {args.batches} timed steps, median of {args.rounds} alternating rounds")
    for p in args.precisions:
        print(f"  {p:11s} {median[p]:7.1f} images/s  x{median[p] / median[base]:.2f}   "
              f"(rounds: {', '.join(f'{x:.1f}' for x in rates[p])})")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
