"""Training throughput: the Lightning loop vs a plain PyTorch loop, same data, model, batch and step.

Usage:
    python benchmarks/train_loop.py --root ../shared/abid --batches 20 --rounds 4 --image-size 128

Both loops train a fresh BinCountModule (ResNet18, AdamW, channels_last) on the same
DataLoader of the train split for the same number of batches after a warm-up, in rounds that
alternate the two loops (ABBA). Both do equal work per batch: each calls the module's own
``training_step`` (its ``_shared_step``: forward, the module's loss, and the update of the
train metrics acc/obo_acc/mae/rmse), then ``zero_grad``, ``backward``, ``step``. Outside a
Trainer the module's ``self.log`` calls return at once; inside one they are part of Lightning's
cost. Lightning runs without checkpoints, loggers, progress bar or validation, so the ratio
lightning / plain (the median of per-round ratios) is the loop's own overhead. The figure is
images/s over the timed batches, each timed window covering the same batch fetches.
Writes ``<out>/results.json`` and ``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bincount.data.datamodule import ABIDDataModule
from bincount.models.module import BinCountModule
from results_io import add_out_argument, alternate, write_results  # benchmarks/ is on sys.path


def make_model() -> BinCountModule:
    torch.manual_seed(0)
    return BinCountModule(arch="resnet18", optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))


def plain_loop(model: BinCountModule, loader, warmup: int, batches: int) -> float:
    """Images/s of ``batches`` steps of the module's own ``training_step`` in a plain loop."""
    optimizer = model.configure_optimizers()
    model.train()
    seen, start, end = 0, None, None
    with warnings.catch_warnings():  # self.log without a Trainer warns, then does nothing
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for i, batch in enumerate(loader):
            if i == warmup:
                start, seen = time.perf_counter(), 0
            loss = model.training_step(batch, i)  # the module's loss + train metric updates, as under Lightning
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(batch[1])
            if i == warmup + batches - 1:  # stop the clock after the last step, as Timer does
                end = time.perf_counter()
                break
    if end is None:
        raise RuntimeError(f"the loader ran out before {warmup + batches} batches: lower --batches or --warmup")
    return seen / (end - start)


class Timer(Callback):
    """Images seen and wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seen, self.start, self.end = warmup, 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start, self.seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.seen += len(batch[1])
            self.end = time.perf_counter()


def lightning_loop(model: BinCountModule, loader, warmup: int, batches: int) -> float:
    """Images/s of ``batches`` Lightning training steps of ``model``."""
    timer = Timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + batches, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, train_dataloaders=loader)
    return timer.seen / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per round and loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    add_out_argument(parser, "train_loop")
    args = parser.parse_args()
    dm = ABIDDataModule(args.root, image_size=args.image_size, batch_size=args.batch_size,
                        num_workers=args.num_workers)
    dm.setup("fit")
    loops = {"plain": plain_loop, "lightning": lightning_loop}
    rates, order = alternate(
        {name: (lambda _r, loop=loop: loop(make_model(), dm.train_dataloader(), args.warmup, args.batches))
         for name, loop in loops.items()}, args.rounds)
    write_results(args.out, name="train_loop", unit="images/s", rounds=rates, order=order,
                  what=f"Training steps of BinCountModule (ResNet18, {args.image_size} px, batch {args.batch_size}, "
                       f"{args.num_workers} workers, {args.batches} timed batches after {args.warmup}): Lightning's "
                       "loop vs a plain PyTorch loop. Equal work: both call the module's training_step "
                       "(forward, loss, train metric updates), zero_grad, backward, step.",
                  ratios={"lightning / plain": ("lightning", "plain")},
                  config={"root": str(args.root), "arch": "resnet18", "image_size": args.image_size,
                          "batch_size": args.batch_size, "num_workers": args.num_workers, "warmup": args.warmup,
                          "batches": args.batches, "rounds": args.rounds,
                          "equal_work": "both sides call BinCountModule.training_step (loss + train metric updates)"})


if __name__ == "__main__":
    main()
