"""A tiny seeded training run whose numbers are committed: the per-step training loss and the final
``val/mae`` of the quickstart's recipe (augmentation, soft ordinal loss, one-cycle AdamW, EMA) on
fake photos, in float32 on the CPU (in the spirit of torchtune's recipe tests, which compare
per-step losses with committed values).

Usage:
    python -m tests.golden.training           # print this machine's values (JSON)
    python -m tests.golden.training --write   # rewrite tests/golden/training.json after an intended change

A ResNet's training amplifies the last bit of a float within a few steps (a ReLU or a max-pool
decides on a near tie), and the CPU's kernels differ in those bits from one instruction set,
cache size or thread count to another. So this run is computed on one thread, by ATen's kernels
built for the instructions every x86-64 CPU has and MKL's matrix products in its code path that
gives the same results on Intel and AMD CPUs (``tests.golden.REPRODUCIBLE``, set before torch is imported),
without oneDNN and NNPACK, whose kernels adapt to the CPU: slower than usual, the same numbers on
every x86-64 machine. Run it as its own process.
"""

from __future__ import annotations

import os

from tests.golden import GOLDEN, REPRODUCIBLE

os.environ.update(REPRODUCIBLE)  # this process only: run it as its own (python -m tests.golden.training)

import argparse  # noqa: E402  (the environment above must come before torch)
import csv  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bincount.config import compose  # noqa: E402
from bincount.train import train  # noqa: E402
from tests.fakes import FAST, make_fake_abid, set_output_dir  # noqa: E402

OVERRIDES = [
    "+experiment=quickstart", *FAST, "data.cache_images=false", "trainer.max_epochs=5",
    "trainer.precision=32-true", "trainer.log_every_n_steps=1", "test=false", "logger.tensorboard=null",
    "callbacks.rich_model_summary=null", "seed=42",
]


def run(workdir: Path) -> dict:
    """Train the golden run on 60 fake photos (32 px, batches of 8) in ``workdir``.

    Returns:
        ``{"train_loss": [...], "val_mae": ...}``: the loss of each of the 20 steps (4 an epoch,
        5 epochs) and the last epoch's validation MAE (objects).
    """
    root = workdir / "abid"
    make_fake_abid(root, n=60, bad=False)
    cfg = set_output_dir(compose("train", [f"data.root={root}", *OVERRIDES]), workdir / "run")
    # convolutions by ATen's own kernels (im2col + MKL's products), not oneDNN's or NNPACK's
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        metrics = train(cfg)
    rows = csv.DictReader((workdir / "run" / "csv" / "version_0" / "metrics.csv").open())
    return {"train_loss": [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")],
            "val_mae": metrics["val/mae"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} instead of printing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        values = run(Path(tmp))
    if args.write:
        GOLDEN.write_text(json.dumps({**values, "torch": torch.__version__}, indent=1) + "\n")
    print(json.dumps(values))


if __name__ == "__main__":
    main()
