"""The served network's forward pass in eager PyTorch vs ONNX Runtime (and ``torch.compile``), side by side.

Usage:
    python benchmarks/forward_runtimes.py --model-dir benchmarks/results/quickstart/runs/qs/model
    python benchmarks/forward_runtimes.py --model-dir outputs/RUN/model --threads 1 --compile

Exports the model folder's backbone (as ``bincount serve`` loads it: the card's test-time
augmentation, eval mode, channels-last) to ONNX with ``torch.onnx.export`` (a dynamic batch
dimension), then times, on the same preprocessed shared photos and in one process with
``--threads`` threads for both runtimes, each runtime's forward per photo at batch 1 and at
batch 8, the runtimes alternating within every round (ABBA). A round's value is the median of
``--reps`` calls. Also records how the runtimes agree on every photo: the largest difference of
the calibrated probabilities and whether every count (the card's decoding) is equal. Writes
``<out>/results.json`` and ``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import add_out_argument, alternate, write_results  # noqa: E402

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "abid" / "bin-images"


def per_photo_ms(run, batch: torch.Tensor, reps: int) -> float:
    """Median over ``reps`` calls of ``run(batch)``, in milliseconds per photo."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="an exported model/ folder")
    parser.add_argument("--photos", type=Path, default=SHARED_PHOTOS, help="folder of JPEGs (the first --n)")
    parser.add_argument("--n", type=int, default=64, help="photos to preprocess, time and compare")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of both runtimes")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=20, help="calls a round times, per runtime and batch size")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (inductor) the eager network")
    add_out_argument(parser, "forward_runtimes")
    args = parser.parse_args()

    import onnxruntime as ort

    from bincount.models.decoding import decode_counts, with_tta
    from bincount.models.export import load_model_dir
    from bincount.serve.model import CountingModel, preprocess

    torch.set_num_threads(args.threads)
    model = CountingModel.load(args.model_dir, device="cpu")  # the preprocessing and the temperature
    net, card = load_model_dir(args.model_dir)
    net = with_tta(net, card.tta).eval().to(memory_format=torch.channels_last)  # the eager forward serving had
    files = sorted(args.photos.glob("*.jpg"))[: args.n]
    if not files:
        parser.error(f"no JPEG in {args.photos}")
    x = preprocess(model, [decode_image(str(f), mode=ImageReadMode.RGB) for f in files])

    def eager(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(batch.contiguous(memory_format=torch.channels_last))

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        torch.onnx.export(net, (x[:1],), onnx_path, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

    def onnxruntime(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])

    runtimes = {"eager": eager, "onnxruntime": onnxruntime}
    compile_s = None
    if args.compile:
        compiled = torch.compile(net)
        start = time.perf_counter()
        for size in (1, 8):
            with torch.inference_mode():
                compiled(x[:size].contiguous(memory_format=torch.channels_last))
        compile_s = time.perf_counter() - start

        def torch_compile(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return compiled(batch.contiguous(memory_format=torch.channels_last))

        runtimes["torch.compile"] = torch_compile

    # agreement on every photo, one at a time as a lone request is answered
    probs = {name: torch.cat([(run(x[i:i + 1]).float() / model.temperature).softmax(1) for i in range(len(x))])
             for name, run in runtimes.items()}
    counts = {name: decode_counts(p, model.card.decode)[1] for name, p in probs.items()}
    agreement = {name: {"max_abs_prob_difference": float((probs[name] - probs["eager"]).abs().max()),
                        "counts_equal": bool(torch.equal(counts[name], counts["eager"]))}
                 for name in runtimes if name != "eager"}
    for run in runtimes.values():  # warm-up at both batch sizes
        run(x[:1]), run(x[:8])

    sides = {f"{name}, batch {size}": (lambda r, run=run, size=size: per_photo_ms(run, x[:size], args.reps))
             for size in (1, 8) for name, run in runtimes.items()}
    rounds, order = alternate(sides, args.rounds)
    ratios = {f"{name} / eager, batch {size} (ms per photo)": (f"{name}, batch {size}", f"eager, batch {size}")
              for size in (1, 8) for name in runtimes if name != "eager"}
    agree = "; ".join(f"{name}: every count equal {a['counts_equal']}, largest probability difference "
                      f"{a['max_abs_prob_difference']:.2g}" for name, a in agreement.items())
    write_results(
        args.out, name="forward_runtimes", unit="ms per photo", rounds=rounds, order=order, ratios=ratios,
        what=(f"The forward pass of {args.model_dir} ({model.card.arch}, {model.preset.image_size} px, tta "
              f"{model.card.tta}) per photo at batch 1 and 8, {args.threads} thread(s), on {len(x)} preprocessed "
              f"shared photos: eager PyTorch (channels-last, inference mode) vs ONNX Runtime's CPU provider"
              f"{' and torch.compile' if args.compile else ''}, each round the median of {args.reps} calls. "
              f"Agreement on the {len(x)} photos: {agree}."),
        config={"model_dir": str(args.model_dir), "n": len(x), "threads": args.threads, "rounds": args.rounds,
                "reps": args.reps, "onnxruntime": ort.__version__},
        extra={"agreement": agreement, "compile_s": compile_s})


if __name__ == "__main__":
    main()
