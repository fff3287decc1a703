"""The ``bincount`` command: one subcommand per ``add_*_command`` function in :data:`COMMANDS`.

Usage:
    bincount serve --model-dir outputs/RUN/model --port 8080
    bincount predict --model-dir outputs/RUN/model photos/ s3://BUCKET/bin-images/ --out predictions.csv
    bincount transform collect s3://BUCKET/counts/ --input-prefix s3://BUCKET/bin-images/ --model-dir model/ \
        --out counts.csv
    bincount export --model-dir outputs/RUN/model

Each ``add_*_command(subparsers)`` sets ``func(args) -> int`` (the exit code), imported when the
command runs. An expected failure is one ``error:`` line and exit 2 (:func:`bincount.errors.run_command`);
Ctrl-C exits 130; ``predict`` and ``transform collect`` stopped by SIGTERM leave no temporary file and exit 143.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from bincount.data.commands import add_data_command
from bincount.errors import run_command
from bincount.stop import Stopped, stop_on_sigterm


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default=os.environ.get("SM_MODEL_DIR", "/opt/ml/model"),
                        help="exported model/ folder (default: $SM_MODEL_DIR or /opt/ml/model)")
    parser.add_argument("--review-threshold", type=float, default=None,
                        help="calibrated confidence below which a verdict is 'review' (default: "
                             "$BINCOUNT_REVIEW_THRESHOLD, else model_config.json's)")
    parser.add_argument("--max-image-bytes", type=int, default=None,
                        help="largest photo, bytes (default: $BINCOUNT_MAX_IMAGE_BYTES or 10 MiB)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest photo, width x height, checked before decoding (default: "
                             "$BINCOUNT_MAX_PIXELS or 40 million)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N (default: cuda when onnxruntime has it; onnxruntime-gpu does)")


def _limits(args: argparse.Namespace):
    from dataclasses import replace

    from bincount.serve.images import Limits

    given = {k: getattr(args, k, None) for k in ("max_image_bytes", "max_pixels", "max_instances")}
    return replace(Limits.from_env(), **{k: v for k, v in given.items() if v is not None})


def add_serve_command(subparsers) -> None:
    """``bincount serve``: the SageMaker-compatible HTTP server (:mod:`bincount.serve.app`)."""
    parser = subparsers.add_parser("serve", help="serve a model over HTTP (SageMaker /ping and /invocations)")
    _add_model_options(parser)
    parser.add_argument("--host", default=os.environ.get("BINCOUNT_HOST", "127.0.0.1"),
                        help="interface (default: $BINCOUNT_HOST or 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SAGEMAKER_BIND_TO_PORT", 8080)),
                        help="TCP port (default: $SAGEMAKER_BIND_TO_PORT or 8080)")
    parser.add_argument("--max-instances", type=int, default=None,
                        help="photos per JSON request (default: $BINCOUNT_MAX_INSTANCES or 64)")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="largest JSON body, bytes")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="photos per forward pass across concurrent requests (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="wait this long for more requests before a forward pass (0: never wait)")
    parser.add_argument("--inline-decode-pixels", type=int, default=4_000_000,
                        help="a photo of up to this many pixels is decoded in the forward thread; a larger one "
                             "beside it, so that it cannot delay other requests (0: always beside)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the forward pass (default: ONNX Runtime's, one per physical core)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from bincount.serve.app import serve

    # no usable model folder: an error line at start, not 503 forever
    serve(args.model_dir, host=args.host, port=args.port, log_level=args.log_level, threads=args.threads,
          review_threshold=args.review_threshold, limits=_limits(args),
          max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
          inline_decode_pixels=args.inline_decode_pixels, device=args.device)
    return 0


def add_predict_command(subparsers) -> None:
    """``bincount predict``: batch prediction to CSV (:mod:`bincount.predict`)."""
    parser = subparsers.add_parser("predict", help="count the objects in photo files, folders or S3 prefixes")
    parser.add_argument("inputs", nargs="+", metavar="PATH_OR_S3_PREFIX", help="photo files, folders, s3:// prefixes")
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--labels", default=None,
                        help="CSV with image_id,expected_quantity: adds the expected quantity and the verdict")
    _add_model_options(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="processes reading and decoding photos")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from bincount.predict import predict
    from bincount.serve.inference import Settings

    # the serving settings of the environment (as on an endpoint), overridden by the given flags
    settings = Settings.from_env().override(review_threshold=args.review_threshold, limits=_limits(args),
                                            device=args.device)
    with stop_on_sigterm():
        summary = predict(args.model_dir, args.inputs, args.out, labels=args.labels, batch_size=args.batch_size,
                          num_workers=args.num_workers, review_threshold=settings.review_threshold,
                          limits=settings.limits, device=settings.device, progress=not args.no_progress)
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(summary["verdicts"].items()))
    print(f"{summary['photos']} photos -> {summary['out']} ({summary['failed']} unreadable"
          f"{'; ' + verdicts if verdicts else ''})", file=sys.stderr)
    return 0


def add_transform_command(subparsers) -> None:
    """``bincount transform collect``: a Batch Transform job's answers to one CSV
    (:mod:`bincount.transform_collect`)."""
    parser = subparsers.add_parser("transform", help="the answers of a SageMaker Batch Transform job")
    commands = parser.add_subparsers(dest="transform_command", required=True)
    collect = commands.add_parser("collect", help="join every .out answer with its photo into predict's CSV",
                                  description="Read every <path>.out under OUTPUT_PREFIX_OR_FOLDER (the answer to "
                                              "the photo <input prefix><path>) and write one CSV row per photo, "
                                              "with bincount predict's columns.")
    collect.add_argument("outputs", metavar="OUTPUT_PREFIX_OR_FOLDER",
                         help="the transform job's output prefix (s3://...) or a local copy of it")
    collect.add_argument("--input-prefix", required=True,
                         help="the job's input prefix (s3://...), or a local folder of the same photos")
    collect.add_argument("--model-dir", required=True,
                         help="the model the job ran (its exported model/ folder, or model.tar.gz unpacked)")
    collect.add_argument("--out", required=True, help="CSV to write")
    collect.add_argument("--labels", default=None,
                         help="CSV with image_id,expected_quantity: adds the expected quantity and the verdict")
    collect.add_argument("--review-threshold", type=float, default=None,
                         help="calibrated confidence below which a verdict is 'review' (default: "
                              "$BINCOUNT_REVIEW_THRESHOLD, else model_config.json's)")
    collect.add_argument("--no-progress", action="store_true", help="no progress bar")
    collect.set_defaults(func=_run_transform_collect)


def _run_transform_collect(args: argparse.Namespace) -> int:
    from bincount.serve.inference import Settings
    from bincount.transform_collect import collect

    threshold = Settings.from_env().override(review_threshold=args.review_threshold).review_threshold
    with stop_on_sigterm():
        summary = collect(args.outputs, args.input_prefix, args.out, model_dir=args.model_dir,
                          labels=args.labels, review_threshold=threshold, progress=not args.no_progress)
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(summary["verdicts"].items()))
    unmatched = f"; {summary['unmatched']} answers of no photo there, left out" if summary["unmatched"] else ""
    print(f"{summary['photos']} photos -> {summary['out']} ({summary['failed']} without a count"
          f"{'; ' + verdicts if verdicts else ''}{unmatched})", file=sys.stderr)
    return 0


def add_export_command(subparsers) -> None:
    """``bincount export``: rewrite a model folder's served network from its weights
    (:func:`bincount.models.export.save_model_dir`)."""
    parser = subparsers.add_parser(
        "export", help="rewrite a model/ folder's model.onnx from its model.pt and model_config.json",
        description="Export the network as served (model.onnx) from the folder's weights and card, check it against "
                    "the PyTorch forward, and replace the folder atomically: for a model/ exported without model.onnx.")
    parser.add_argument("--model-dir", required=True, help="the exported model/ folder")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from bincount.models.export import ONNX_FILE, load_model_dir, save_model_dir

    net, card = load_model_dir(args.model_dir)
    save_model_dir(net, args.model_dir, card)
    print(f"{Path(args.model_dir) / ONNX_FILE} written", file=sys.stderr)
    return 0


COMMANDS = (add_serve_command, add_predict_command, add_transform_command, add_data_command, add_export_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bincount", description="Count the objects in warehouse bin photos.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run_command(args.func, args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Stopped as stopped:
        print(f"error: stopped by {signal.Signals(stopped.signum).name}", file=sys.stderr)
        return 128 + stopped.signum


if __name__ == "__main__":
    sys.exit(main())
