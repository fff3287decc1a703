"""Latency of one photo through HTTP vs the bare model forward on the same photo, side by side.

Usage:
    python benchmarks/serve_latency.py                                  # untrained resnet18, 112 px (as the quickstart)
    python benchmarks/serve_latency.py --model-dir outputs/RUN/model --n 300
    python benchmarks/serve_latency.py --image-size 224 --photo ../shared/abid/bin-images/00001.jpg

Starts ``bincount serve`` and the floor server (``serve_floor.py``: the same handler functions
on the event loop, with no batching and no thread hand-offs, i.e. what HTTP and decoding alone
cost here) in subprocesses on free loopback ports, then times on the same photo, in alternating
blocks of ``--block``: the bare forward ``net(x)`` of the preprocessed photo in this process,
the handler functions without HTTP (decode + preset + forward), ``POST /invocations`` with the
JPEG to ``bincount serve`` from two clients on a kept-alive connection: the standard library's
``http.client`` (a lean client, as load tools are) and httpx (a convenient one, whose own
per-request cost is part of its figure), and the same http.client request to the floor server.
Prints p50/p99 of each over ``--n`` timings, in milliseconds, the server's own account of the
http.client requests (its ``Server-Timing`` header: decode, preprocess + forward, handler total;
and the rest, the HTTP round trip), and the ratios to the bare forward of ``bincount serve`` (the
goal is p50 <= 1.2x) and of the floor server (what FastAPI + uvicorn cost here with nothing
around the handler functions).

Blocks, with a pause between them, because after a forward pass a runtime's threads may spin
for a while (milliseconds): timing this process and the server back to back would have each
one's idle threads slow the other's forward on a 2-core machine. The kinds run in the same
order in even blocks and in reverse in odd ones (ABBA). A round is one block of every kind;
its value is the block's median, and each ratio is the median of the per-block ratios. Writes
``<out>/results.json`` (with every timing) and ``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from results_io import add_out_argument, write_results  # benchmarks/ is on sys.path

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "abid" / "bin-images"


def default_model_dir(image_size: int, out: Path, arch: str = "resnet18") -> Path:
    """An untrained ``arch`` counting 1..5 at ``image_size`` px, exported like training does."""
    from bincount.models.backbones import build_backbone
    from bincount.models.card import Calibration, EvalPreset, ModelCard
    from bincount.models.export import save_model_dir

    torch.manual_seed(0)
    card = ModelCard(arch=arch, min_count=1, max_count=5, preset=EvalPreset(image_size=image_size),
                     calibration=Calibration(temperature=1.0, review_threshold=0.5))
    return save_model_dir(build_backbone(arch, 5), out / "model", card)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


FLOOR_SERVER = Path(__file__).with_name("serve_floor.py")


@contextmanager
def serving(model_dir: Path, *extra: str, command: tuple[str, ...] = ("-m", "bincount.cli", "serve")):
    """Run ``bincount serve`` (or ``python *command``) on a free loopback port until the block ends; yield its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, *command, "--model-dir", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/ping").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not become ready in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post_stdlib(conn: http.client.HTTPConnection, data: bytes) -> dict[str, float]:
    """``POST /invocations`` on a kept-alive ``http.client`` connection; the server's timings (ms)."""
    conn.request("POST", "/invocations", body=data, headers={"Content-Type": "image/jpeg"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
    return server_timing(response.getheader("Server-Timing", ""))


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: decode;dur=0.7, batch;dur=15.2;desc="size 1", ...`` -> ``{"decode": 0.7, ...}``."""
    out = {}
    for metric in filter(None, header.split(",")):
        name, *params = (p.strip() for p in metric.split(";"))
        out[name] = float(dict(p.split("=", 1) for p in params)["dur"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: an untrained resnet18")
    parser.add_argument("--image-size", type=int, default=112, help="input size of the default model")
    parser.add_argument("--photo", type=Path, default=SHARED_PHOTOS / "00001.jpg")
    parser.add_argument("--n", type=int, default=300, help="timings of each kind")
    parser.add_argument("--block", type=int, default=25, help="timings in a row of one kind, the kinds alternating")
    parser.add_argument("--threads", type=int, default=None,
                        help="forward-pass threads here and in the servers (default: ONNX Runtime's, one per "
                             "physical core); preprocessing runs in one torch thread everywhere, as in bincount serve")
    add_out_argument(parser, "serve_latency")
    args = parser.parse_args()
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    torch.set_num_threads(1)  # preprocessing, as bincount serve runs it

    from bincount.serve.inference import HandlerContext, Settings, input_fn, model_fn, predict_fn
    from bincount.serve.model import forward, preprocess

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or default_model_dir(args.image_size, Path(tmp))
        model = model_fn(str(model_dir), HandlerContext(Settings(threads=args.threads)))
        data = args.photo.read_bytes()
        x = preprocess(model, input_fn(data, "image/jpeg").images)
        post = {"content": data, "headers": {"Content-Type": "image/jpeg"}}
        steps = {
            "bare forward net(x)": lambda: forward(model, x),
            "handler, no HTTP": lambda: predict_fn(input_fn(data, "image/jpeg"), model),
            "HTTP POST /invocations": lambda: post_stdlib(conn, data),
            "HTTP POST /invocations (httpx)": lambda: client.post("/invocations", **post).raise_for_status(),
            "floor server, HTTP (http.client)": lambda: post_stdlib(floor_conn, data),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        block_medians: dict[str, list[float]] = {name: [] for name in steps}
        order: list[str] = []
        inside: dict[str, list[float]] = {"decode": [], "batch": [], "total": [], "outside": []}
        with (serving(model_dir, *threads) as url, serving(model_dir, *threads, command=(str(FLOOR_SERVER),)) as floor,
              httpx.Client(base_url=url, timeout=60) as client):
            conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
            floor_conn = http.client.HTTPConnection(floor.removeprefix("http://"), timeout=60)
            kept_alive = {"HTTP POST /invocations": conn, "floor server, HTTP (http.client)": floor_conn}
            for block in range(-1, -(-args.n // args.block)):  # block -1 warms up
                for name in (list(steps)[::-1] if block % 2 else list(steps)):  # ABBA
                    step = steps[name]
                    if name in kept_alive:  # uvicorn drops a connection idle for 5 s, as the gap between two
                        kept_alive[name].close()  # blocks of a kind can be: reopen it with one untimed request
                        step()
                    time.sleep(0.1)  # let the other process's idle threads stop spinning
                    this_block = []
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        out = step()
                        ms = 1000 * (time.perf_counter() - t0)
                        if block < 0:
                            continue
                        this_block.append(ms)
                        times[name].append(ms)
                        if name == "HTTP POST /invocations":
                            for key in ("decode", "batch", "total"):
                                inside[key].append(out[key])
                            inside["outside"].append(ms - out["total"])
                    if block >= 0:
                        block_medians[name].append(statistics.median(this_block))
                        order.append(name)
    bare, serve, floor_ = "bare forward net(x)", "HTTP POST /invocations", "floor server, HTTP (http.client)"
    write_results(
        args.out, name="serve_latency", unit="ms (median of a block)", rounds=block_medians, order=order,
        what=f"Latency of one photo ({args.photo.name}, {len(data)} bytes) -> {model.card.arch} at "
             f"{model.preset.image_size} px: the bare forward in this process, the handler without HTTP, "
             f"`bincount serve` over HTTP (http.client and httpx) and the floor server (serve_floor.py), on loopback, "
             f"{len(times[bare])} timings each in alternating blocks of {args.block}. Goal: serve / bare p50 <= 1.2x.",
        ratios={"bincount serve (http.client) / bare forward": (serve, bare),
                "floor server (http.client) / bare forward": (floor_, bare)},
        config={"model_dir": str(args.model_dir) if args.model_dir else None, "arch": model.card.arch,
                "image_size": model.preset.image_size, "photo": str(args.photo), "photo_bytes": len(data),
                "n": args.n, "block": args.block, "threads": args.threads},
        extra={"p50_ms": {k: statistics.median(v) for k, v in times.items()},
               "p99_ms": {k: percentile(v, 99) for k, v in times.items()},
               "inside_server_p50_ms": {k: statistics.median(v) for k, v in inside.items() if v},
               "inside_server_note": "Server-Timing of the http.client requests to bincount serve: decode (JPEG -> "
                                     "uint8), batch (preprocess + forward), total (handler), outside (client time - "
                                     "handler total)",
               "timings_ms": times, "inside_server_ms": inside})

if __name__ == "__main__":
    main()
