"""JPEG decoding + preprocessing throughput: PIL vs torchvision (libjpeg-turbo), side by side.

Usage:
    python benchmarks/decode.py --root ../shared/abid --n 600 --image-size 128

Prints photos/s for each decoder on the same files (decode to a uint8 tensor, then the eval
preset), alternating rounds so both see the same machine load, and the ratio torchvision / PIL.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bincount.data.decode import decode_rgb_file
from bincount.data.transforms import CountingPresetEval


def one_round(paths: list[Path], decoder: str, preset: CountingPresetEval) -> float:
    start = time.perf_counter()
    for path in paths:
        preset(decode_rgb_file(path, decoder))
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/abid")
    parser.add_argument("--n", type=int, default=600, help="photos per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    paths = sorted((Path(args.root) / "bin-images").glob("*.jpg"))[: args.n]
    preset = CountingPresetEval(image_size=args.image_size)
    rates: dict[str, list[float]] = {"pil": [], "torchvision": []}
    one_round(paths[:20], "pil", preset), one_round(paths[:20], "torchvision", preset)  # warm-up
    for _ in range(args.rounds):
        for decoder in rates:
            rates[decoder].append(one_round(paths, decoder, preset))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{len(paths)} photos from {args.root}, decode + CountingPresetEval({args.image_size}), 1 thread, "
          f"median of {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:12s} {v:8.1f} photos/s")
    print(f"  ratio torchvision / pil: {med['torchvision'] / med['pil']:.2f}x")


if __name__ == "__main__":
    main()
