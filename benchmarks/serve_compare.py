"""Serving at a baseline commit vs this checkout, side by side: latency, throughput, the SageMaker
toolkit's handler, and whether the answers agree.

Usage:
    python benchmarks/serve_compare.py --baseline 057758a --model-dir benchmarks/results/quickstart/runs/qs/model
    python benchmarks/serve_compare.py --baseline 057758a --arch resnet50 --image-size 224 --agreement-photos 256

Clones ``--baseline`` into a temporary folder and serves the same weights from both checkouts with
this environment's Python (the baseline's ``src/`` first on ``PYTHONPATH``): ``--model-dir`` (default:
an untrained ``--arch`` at ``--image-size`` px) is copied and, when it has no ``model.onnx``, given
one by this checkout's ``bincount export``. Each
round runs every side back to back, in the reverse order every other round (ABBA), with a pause
before each block so that the other process's idle threads stop spinning:

- ``serve`` (``bincount serve`` of each side, started once): one client on a kept-alive
  ``http.client`` connection posts one photo ``--n`` times; the block's median (p50), ms;
- ``clients`` (the same servers): ``--clients`` concurrent clients post ``--requests`` photos each
  (64 shared photos); photos/s;
- ``toolkit``: each side's ``model.tar.gz`` (``sagemaker_launch.model_archive``) in a worker running
  SageMaker's inference toolkit as the PyTorch serving image does (``tests/inference_toolkit.py``),
  timing its ``handle`` of the same photo ``--n`` times; p50, ms;
- ``bare forward``: this checkout's forward of the preprocessed photo at batch 1 in this process
  (``bincount.serve.model.forward``), and the eager PyTorch forward of the same weights; p50, ms.

Agreement: this checkout's served probabilities (``forward``) against the PyTorch model's (the
weights of ``model.pt`` with the card's test-time augmentation and temperature) on every shared
photo (the first ``--agreement-photos``), preprocessed once: how many counts differ and the
largest probability difference.

Goals: head / baseline serve p50 <= 0.6x; head / baseline photos/s with 8 clients >= 1.5x; head
serve p50 and head toolkit p50 <= 1.2x the head's bare forward; every count equal and every
probability within 1e-4. Writes ``<out>/results.json`` (every timing) and ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from results_io import REPO, add_out_argument, write_results  # benchmarks/ is on sys.path
from serve_latency import SHARED_PHOTOS, default_model_dir, post_stdlib, serving
from serve_throughput import load

sys.path.insert(0, str(REPO))  # tests.inference_toolkit: SageMaker's toolkit wired as the serving image wires it
from tests.inference_toolkit import serve as toolkit_serve  # noqa: E402

SIDES = ("baseline", "head")


def baseline_checkout(commit: str, into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", commit], check=True)
    return into


def side_env(checkout: Path) -> dict[str, str]:
    """The environment that runs ``checkout``'s code with this Python (its packages first on the path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout / "src"), str(checkout)])}


def toolkit_model_dir(checkout: Path, model_dir: Path, tmp: Path) -> Path:
    """/opt/ml/model as the serving image unpacks ``checkout``'s ``model.tar.gz`` of ``model_dir``."""
    tmp.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from tests.inference_toolkit import unpacked_model_tar_gz; "
            "print(unpacked_model_tar_gz(Path(sys.argv[1]), Path(sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir), str(tmp)], env=side_env(checkout), cwd=checkout,
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.splitlines()[-1])


def agreement(model_dir: Path, photos: list[Path], batch_size: int = 32) -> dict:
    """This checkout's served probabilities vs the PyTorch model's on ``photos`` (see the module doc)."""
    from bincount.models.decoding import decode_counts, with_tta
    from bincount.models.export import load_model_dir
    from bincount.serve.model import CountingModel, forward, preprocess

    model = CountingModel.load(model_dir, device="cpu")
    net, card = load_model_dir(model_dir)
    net = with_tta(net, card.tta).eval()
    differ, largest = 0, 0.0
    for start in range(0, len(photos), batch_size):
        x = preprocess(model, [decode_image(str(p), mode=ImageReadMode.RGB) for p in photos[start:start + batch_size]])
        with torch.inference_mode():
            expected = (net(x) / model.temperature).softmax(dim=1)
        served = forward(model, x)
        differ += int((decode_counts(served, card.decode)[1] != decode_counts(expected, card.decode)[1]).sum())
        largest = max(largest, float((served - expected).abs().max()))
    return {"photos": len(photos), "counts_that_differ": differ, "max_probability_difference": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare this checkout with")
    parser.add_argument("--model-dir", type=Path, default=None, help="an exported model/ folder (default: untrained)")
    parser.add_argument("--arch", default="resnet18", help="architecture of the default model")
    parser.add_argument("--image-size", type=int, default=112, help="input size of the default model")
    parser.add_argument("--agreement-photos", type=int, default=None, help="photos compared (default: all)")
    parser.add_argument("--photo", type=Path, default=SHARED_PHOTOS / "00001.jpg", help="the photo timed one at a time")
    parser.add_argument("--photos", type=Path, default=SHARED_PHOTOS, help="photos of the throughput and agreement")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--n", type=int, default=40, help="timed requests per block (serve, toolkit, bare forward)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="per client and round")
    add_out_argument(parser, "serve_compare")
    args = parser.parse_args()

    from bincount.models.export import load_model_dir
    from bincount.serve.model import CountingModel, forward, preprocess

    data = args.photo.read_bytes()
    photo_files = sorted(args.photos.glob("*.jpg"))
    photos = [p.read_bytes() for p in photo_files[:64]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkouts = {"baseline": baseline_checkout(args.baseline, tmp / "baseline"), "head": REPO}
        model_dir = (shutil.copytree(args.model_dir, tmp / "model") if args.model_dir
                     else default_model_dir(args.image_size, tmp, args.arch))
        if not (model_dir / "model.onnx").is_file():
            subprocess.run([sys.executable, "-m", "bincount.cli", "export", "--model-dir", str(model_dir)], check=True)
        agree = agreement(model_dir, photo_files[:args.agreement_photos])
        print(f"agreement: {agree}", flush=True)
        toolkit_dirs = {side: toolkit_model_dir(checkouts[side], model_dir, tmp / f"toolkit-{side}") for side in SIDES}
        model = CountingModel.load(model_dir, device="cpu")
        x = preprocess(model, [decode_image(str(args.photo), mode=ImageReadMode.RGB)])
        net, _ = load_model_dir(model_dir)
        net = net.to(memory_format=torch.channels_last)

        def eager() -> None:
            with torch.inference_mode():
                net(x.contiguous(memory_format=torch.channels_last))

        def timed(step, n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                step()
                out.append(1000 * (time.perf_counter() - t0))
            return out

        request = [({"Content-Type": "image/jpeg", "Accept": "application/json"}, data)] * (args.n + 5)
        timings: dict[str, list[list[float]]] = {}
        order: list[str] = []
        os.environ.update(side_env(checkouts["baseline"]))  # the baseline server's environment...
        with serving(model_dir, "--device", "cpu") as base_url:
            os.environ.update(side_env(REPO))  # ...and this checkout's
            with serving(model_dir, "--device", "cpu") as head_url:
                urls = {"baseline": base_url, "head": head_url}
                conns = {side: http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
                         for side, url in urls.items()}
                steps = {
                    **{f"{side} serve p50": (lambda side=side: timed(lambda: post_stdlib(conns[side], data), args.n))
                       for side in SIDES},
                    **{f"{side} photos/s, {args.clients} clients":
                       (lambda side=side: asyncio.run(load(urls[side], photos, args.clients, args.requests))[0])
                       for side in SIDES},
                    **{f"{side} toolkit p50": (  # each model.tar.gz runs its own code/: the side's bincount
                        lambda side=side: [a["ms"] for a in toolkit_serve(toolkit_dirs[side], tmp, request)][5:])
                       for side in SIDES},
                    "head bare forward p50": lambda: timed(lambda: forward(model, x), args.n),
                    "eager bare forward p50": lambda: timed(eager, args.n),
                }
                for round_ in range(-1, args.rounds):  # round -1 warms up
                    for name in (list(steps)[::-1] if round_ % 2 else list(steps)):
                        for conn in conns.values():  # uvicorn drops a connection idle for 5 s: reopen it
                            conn.close()
                            post_stdlib(conn, data)
                        time.sleep(0.2)
                        value = steps[name]()
                        if round_ >= 0:
                            timings.setdefault(name, []).append(value if isinstance(value, list) else [value])
                            order.append(name)
                        shown = statistics.median(value) if isinstance(value, list) else value
                        print(f"round {round_} {name}: {shown:.2f}", flush=True)
    rounds = {name: [statistics.median(v) for v in values] for name, values in timings.items()}
    throughput = f"photos/s, {args.clients} clients"
    write_results(
        args.out, name="serve_compare", rounds=rounds, order=order,
        unit={name: "photos/s" if "photos/s" in name else "ms (median of a block)" for name in rounds},
        what=f"Serving at {args.baseline} (baseline) and this checkout (head), the same weights ({model.card.arch} at "
             f"{model.preset.image_size} px, on the CPU): one photo ({args.photo.name}) over HTTP to `bincount serve` "
             f"({args.n} per block), {args.clients} concurrent clients x {args.requests} photos, the same photo through "
             f"SageMaker's inference toolkit and model.tar.gz ({args.n} per block), and the head's bare forward, "
             f"alternating ABBA over {args.rounds} rounds. Goals: serve p50 head / baseline <= 0.6x, photos/s head / "
             f"baseline >= 1.5x, head serve and toolkit p50 <= 1.2x its bare forward; answers agree (counts equal, "
             f"probabilities within 1e-4 of the PyTorch model's).",
        ratios={"serve p50, head / baseline": ("head serve p50", "baseline serve p50"),
                f"{throughput}, head / baseline": (f"head {throughput}", f"baseline {throughput}"),
                "toolkit p50, head / baseline": ("head toolkit p50", "baseline toolkit p50"),
                "head serve p50 / head bare forward": ("head serve p50", "head bare forward p50"),
                "head toolkit p50 / head bare forward": ("head toolkit p50", "head bare forward p50"),
                "head bare forward / eager bare forward": ("head bare forward p50", "eager bare forward p50")},
        config={"baseline": args.baseline, "model_dir": str(args.model_dir) if args.model_dir else None,
                "arch": model.card.arch,
                "image_size": model.preset.image_size, "tta": model.card.tta, "photo": str(args.photo),
                "rounds": args.rounds, "n": args.n, "clients": args.clients, "requests": args.requests,
                "photos": len(photos), "threads": torch.get_num_threads()},
        extra={"agreement": agree, "timings": timings})


if __name__ == "__main__":
    main()
