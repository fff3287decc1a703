"""The input pipeline's speed per CPU core: photos/s of decode + the training transform from shards.

Usage:
    python benchmarks/input_pipeline.py --root ../shared/abid --rounds 3

Prepares the photos of ``--root`` once into local litdata shards at ``--resize`` pixels (256: the
size ``bincount data prepare --resize 256`` writes for training), then, in one process computing
on one thread with no DataLoader workers, times an epoch of the train split through the
streaming data module (``data=abid_stream``: read a shard sample, decode the JPEG,
``CountingPresetTrain``) for each ``--image-sizes`` entry, rounds alternating the sizes (ABBA).
The figure is photos per second on one core: a GPU that trains ``N`` photos/s needs about
``N / figure`` cores of data-loader workers (``data.num_workers``) to stay busy. Writes
``<out>/results.json`` and ``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import add_out_argument, alternate, write_results  # noqa: E402

from bincount.data.prepare import prepare  # noqa: E402
from bincount.data.stream import ABIDStreamDataModule  # noqa: E402


def epoch_rate(shards: Path, image_size: int, batch_size: int) -> float:
    """Photos/s of one epoch of the train split: shard sample -> decode -> training transform -> batch."""
    datamodule = ABIDStreamDataModule(str(shards), image_size=image_size, batch_size=batch_size, num_workers=0)
    datamodule.setup("fit")
    seen, start = 0, time.perf_counter()
    for batch in datamodule.train_dataloader():
        seen += len(batch[1])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid", help="ABID-layout folder")
    parser.add_argument("--resize", type=int, default=256, help="shorter side of the photos in the shards")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[112, 224], help="training input sizes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    add_out_argument(parser, "input_pipeline")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # one core: the figure a DataLoader worker delivers
    work = Path(tempfile.mkdtemp(prefix="input-pipeline-"))
    try:
        manifest = prepare(args.root, str(work / "shards"), resize=args.resize, eda=False, chunk_bytes="8MB")
        sides = {f"{size} px": (lambda _round, size=size: epoch_rate(work / "shards", size, args.batch_size))
                 for size in args.image_sizes}
        rounds, order = alternate(sides, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    train = len(manifest["splits"]["train"]["image_ids"])
    write_results(
        args.out, name="input_pipeline", unit="photos/s per core", rounds=rounds, order=order,
        what=f"One epoch of the {train} train photos of {args.root}, from local shards resized to {args.resize} px: "
             "read, JPEG decode and CountingPresetTrain at each input size, batch "
             f"{args.batch_size}, one process on one thread (no workers). Photos/s on one CPU core: a GPU that trains "
             "N photos/s needs about N / this many data-loader workers.",
        config={"root": args.root, "resize": args.resize, "image_sizes": args.image_sizes,
                "batch_size": args.batch_size, "rounds": args.rounds, "train_photos": train})


if __name__ == "__main__":
    main()
