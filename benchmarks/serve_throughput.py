"""Requests/s with concurrent clients: dynamic batching vs one request per forward pass.

Usage:
    python benchmarks/serve_throughput.py                               # untrained resnet18, 112 px (as the quickstart)
    python benchmarks/serve_throughput.py --model-dir outputs/RUN/model --clients 8 --requests 40

Starts ``bincount serve`` twice per round in a subprocess on loopback, with ``--max-batch-size 1``
(one at a time) and ``--max-batch-size 16`` (batched), and has ``--clients`` concurrent clients
each send ``--requests`` JPEGs (shared ABID photos). Prints requests/s and p50/p99 latency of each
(median over ``--rounds``, the two servers alternating ABBA), the size of the batch each request
was counted in (from the server's ``Server-Timing`` header; 1 when one at a time) and the ratio
batched / one at a time, the median of the per-round ratios (the goal is >= 2x at 8 clients).
Beside it, timed in this process in every round with the server's forward-pass threads: the forward
pass alone on a batch of one photo and on a batch of ``--clients``, i.e. what batching gives the
network itself (decoding, preprocessing and HTTP cost the same per photo batched or not).
Clients and server share this machine's CPUs. Writes ``<out>/results.json`` (with every
latency) and ``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from results_io import add_out_argument, write_results  # benchmarks/ is on sys.path
from serve_latency import SHARED_PHOTOS, default_model_dir, percentile, serving

from bincount.models.export import read_model_card

MODES = {"one at a time": ["--max-batch-size", "1"], "batched": ["--max-batch-size", "16"]}


async def load(url: str, photos: list[bytes], clients: int, requests: int) -> tuple[float, list[float], list[int]]:
    """``clients`` concurrent clients x ``requests`` each.

    Returns:
        (requests/s, latencies in ms, the size of the batch each request was counted in).
    """
    latencies: list[float] = []
    sizes: list[int] = []

    async def client(http: httpx.AsyncClient, c: int) -> None:
        for k in range(requests):
            data = photos[(c * requests + k) % len(photos)]
            t0 = time.perf_counter()
            r = await http.post("/invocations", content=data, headers={"Content-Type": "image/jpeg"})
            latencies.append(1000 * (time.perf_counter() - t0))
            r.raise_for_status()
            sizes.append(int(re.search(r'desc="size (\d+)"', r.headers["server-timing"]).group(1)))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http, c) for c in range(2)))  # warm-up
        latencies.clear()
        sizes.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    return clients * requests / elapsed, latencies, sizes


def forward_ms_per_photo(model, batch_size: int, repeats: int = 10) -> float:
    """Median time of the bare forward pass of ``model`` (a ``CountingModel``) on a batch, per photo, ms.

    ``forward`` returns its probabilities on the CPU, so a CUDA forward is timed to its end.
    """
    from bincount.serve.model import forward

    size = model.preset.image_size
    x = torch.randn(batch_size, 3, size, size)
    forward(model, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(model, x)
        times.append(1000 * (time.perf_counter() - t0) / batch_size)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: an untrained resnet18")
    parser.add_argument("--image-size", type=int, default=112, help="input size of the default model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--photos", type=Path, default=SHARED_PHOTOS)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the server's forward pass (default: ONNX Runtime's, one per physical core)")
    add_out_argument(parser, "serve_throughput")
    args = parser.parse_args()
    threads = [] if args.threads is None else ["--threads", str(args.threads)]

    photos = [p.read_bytes() for p in sorted(args.photos.glob("*.jpg"))[:64]]
    results: dict[str, list[tuple[float, list[float], list[int]]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or default_model_dir(args.image_size, Path(tmp))
        from bincount.serve.model import CountingModel

        torch.set_num_threads(1)  # preprocessing, as bincount serve runs it
        model = CountingModel.load(model_dir, threads=args.threads)  # on the device the server picks
        alone: dict[int, list[float]] = {1: [], args.clients: []}
        order: list[str] = []  # the sides in the order they ran
        fwd = {1: "forward alone, batch 1", args.clients: f"forward alone, batch {args.clients}"}
        for round_ in range(args.rounds):
            for batch_size in (list(alone)[::-1] if round_ % 2 else list(alone)):  # ABBA
                alone[batch_size].append(forward_ms_per_photo(model, batch_size))
                order.append(fwd[batch_size])
            for mode in (list(MODES)[::-1] if round_ % 2 else list(MODES)):  # ABBA
                with serving(model_dir, *MODES[mode], *threads) as url:
                    results[mode].append(asyncio.run(load(url, photos, args.clients, args.requests)))
                order.append(mode)
        card = read_model_card(model_dir)
    one, batched = "one at a time", "batched"
    fwd1, fwdn = fwd[1], fwd[args.clients]
    rounds = {mode: [rate for rate, _, _ in runs] for mode, runs in results.items()}
    rounds.update({fwd1: alone[1], fwdn: alone[args.clients]})
    write_results(
        args.out, name="serve_throughput", rounds=rounds, order=order,
        unit={one: "requests/s", batched: "requests/s", fwd1: "ms per photo", fwdn: "ms per photo"},
        what=f"{args.clients} concurrent clients x {args.requests} requests ({len(photos)} ABID photos) to "
             f"`bincount serve` on loopback, {card.arch} at {card.preset.image_size} px, server forward-pass threads "
             f"{args.threads or 'ONNX Runtime default'}: dynamic batching (--max-batch-size 16) vs one request per "
             f"forward (--max-batch-size 1); beside it the bare forward per photo at batch 1 vs batch "
             f"{args.clients} in this process. Goal: batched / one at a time >= 2x.",
        ratios={f"{batched} / {one} (requests/s)": (batched, one),
                f"{fwd1} / {fwdn} (ms per photo: what batching gives the network)": (fwd1, fwdn)},
        config={"model_dir": str(args.model_dir) if args.model_dir else None, "arch": card.arch,
                "image_size": card.preset.image_size, "clients": args.clients, "requests": args.requests,
                "rounds": args.rounds, "photos": len(photos), "threads": args.threads, "modes": MODES},
        extra={mode: {"p50_ms_per_round": [statistics.median(ms) for _, ms, _ in runs],
                      "p99_ms_per_round": [percentile(ms, 99) for _, ms, _ in runs],
                      "mean_batch_size": statistics.mean(size for _, _, sizes in runs for size in sizes),
                      "latencies_ms_per_round": [ms for _, ms, _ in runs],
                      "batch_sizes_per_round": [sizes for _, _, sizes in runs]}
               for mode, runs in results.items()})


if __name__ == "__main__":
    main()
