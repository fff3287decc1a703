"""JPEG decoding + preprocessing throughput: PIL vs torchvision (libjpeg-turbo), side by side.

Usage:
    python benchmarks/decode.py --root ../shared/abid --n 400 --image-size 128

Times photos/s of each decoder on the same files (decode to a uint8 tensor, then the eval
preset) in one thread, as in a DataLoader worker, in rounds that alternate the two decoders
(ABBA) so both see the same machine load. The ratio torchvision / PIL is the median of the
per-round ratios. Writes ``<out>/results.json`` and ``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bincount.data.decode import decode_rgb_file
from bincount.data.transforms import CountingPresetEval
from results_io import add_out_argument, alternate, write_results  # benchmarks/ is on sys.path


def one_round(paths: list[Path], decoder: str, preset: CountingPresetEval) -> float:
    """Photos/s of decoding and preprocessing ``paths`` with ``decoder``."""
    start = time.perf_counter()
    for path in paths:
        preset(decode_rgb_file(path, decoder))
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid")
    parser.add_argument("--n", type=int, default=600, help="photos per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    add_out_argument(parser, "decode")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    paths = sorted((Path(args.root) / "bin-images").glob("*.jpg"))[: args.n]
    preset = CountingPresetEval(image_size=args.image_size)
    one_round(paths[:20], "pil", preset), one_round(paths[:20], "torchvision", preset)  # warm-up
    rates, order = alternate({d: (lambda _r, d=d: one_round(paths, d, preset)) for d in ("pil", "torchvision")},
                             args.rounds)
    write_results(args.out, name="decode", unit="photos/s", rounds=rates, order=order,
                  what=f"{len(paths)} photos from {args.root}: decode to uint8 + "
                       f"CountingPresetEval({args.image_size}), 1 torch thread, PIL vs torchvision.io (libjpeg-turbo).",
                  ratios={"torchvision / pil": ("torchvision", "pil")},
                  config={"root": str(args.root), "n": len(paths), "rounds": args.rounds,
                          "image_size": args.image_size, "torch_threads": 1})


if __name__ == "__main__":
    main()
