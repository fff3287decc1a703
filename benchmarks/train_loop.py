"""Training throughput: the Lightning loop vs a plain PyTorch loop, same data, model and batch.

Usage:
    python benchmarks/train_loop.py --root ../shared/abid --batches 30 --image-size 128

Both loops train a fresh BinCountModule (ResNet18, AdamW, channels_last) on the same
DataLoader of the train split for the same number of batches after a warm-up; the figure is
images/s of the timed batches. Lightning runs without checkpoints, loggers or progress bar, so
the ratio shows the loop's own overhead.
"""

from __future__ import annotations

import argparse
import functools
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bincount.data.datamodule import ABIDDataModule
from bincount.models.module import BinCountModule


def make_model() -> BinCountModule:
    torch.manual_seed(0)
    return BinCountModule(arch="resnet18", optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))


def plain_loop(model: BinCountModule, loader, warmup: int, batches: int) -> float:
    optimizer = model.configure_optimizers()
    model.train()
    seen, start = 0, None
    for i, (images, targets, _) in enumerate(loader):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        if i == warmup + batches:
            break
        images = images.contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model.net(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(targets)
    return seen / (time.perf_counter() - start)


class Timer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.seen, self.start = warmup, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start, self.seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.seen += len(batch[1])
            self.end = time.perf_counter()


def lightning_loop(model: BinCountModule, loader, warmup: int, batches: int) -> float:
    timer = Timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + batches, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, train_dataloaders=loader)
    return timer.seen / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/abid")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dm = ABIDDataModule(args.root, image_size=args.image_size, batch_size=args.batch_size,
                        num_workers=args.num_workers)
    dm.setup("fit")
    rates: dict[str, list[float]] = {"plain": [], "lightning": []}
    for _ in range(args.rounds):  # alternate so both loops see the same machine load
        rates["plain"].append(plain_loop(make_model(), dm.train_dataloader(), args.warmup, args.batches))
        rates["lightning"].append(lightning_loop(make_model(), dm.train_dataloader(), args.warmup, args.batches))
    best = {k: max(v) for k, v in rates.items()}
    print(f"ResNet18 {args.image_size}px, batch {args.batch_size}, {args.num_workers} workers, "
          f"{args.batches} timed batches, best of {args.rounds} rounds")
    for k, v in best.items():
        print(f"  {k:10s} {v:7.1f} images/s   (rounds: {', '.join(f'{x:.1f}' for x in rates[k])})")
    print(f"  ratio lightning / plain: {best['lightning'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
