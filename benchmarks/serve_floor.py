"""The least an HTTP server can do around the forward pass: the floor ``serve_latency.py`` compares with.

Usage (``serve_latency.py`` starts it on a free port; its figures are in that benchmark's results):
    python benchmarks/serve_floor.py --model-dir outputs/RUN/model --port 8081 --threads 1

FastAPI + uvicorn, like ``bincount serve``, with one endpoint that reads the photo and counts it
with the same handler functions (:func:`~bincount.serve.images.decode_image_bytes`,
:func:`~bincount.serve.inference.predict_fn`, :func:`~bincount.serve.inference.output_fn`) right
on the event loop: no batching, no thread hand-offs, no Server-Timing. What it costs over the
bare forward is what this HTTP stack and decoding alone cost on this machine: no server built
on them answers faster. For benchmarks only: it blocks its event loop for the whole forward pass, which
a real server must not (nothing else is answered meanwhile, not even ``/ping``).
A server, not a benchmark: it measures nothing and writes no result file.
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from bincount.serve.images import decode_image_bytes
from bincount.serve.inference import output_fn, predict_fn
from bincount.serve.model import CountingModel
from bincount.serve.request import CountRequest


def floor_app(model_dir: str, threads: int | None = None) -> FastAPI:
    """``GET /ping`` and ``POST /invocations`` (one JPEG or PNG photo -> the JSON answer)."""
    model = CountingModel.load(model_dir, threads=threads)
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"status": "ok"}

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        image = decode_image_bytes(await request.body(), limits=model.limits)
        payload, content_type = output_fn(predict_fn(CountRequest([image], [None]), model), None)
        return Response(payload, media_type=content_type)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the forward pass (default: ONNX Runtime's, one per physical core)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    torch.set_num_threads(1)  # preprocessing in one thread, as bincount serve does
    uvicorn.run(floor_app(args.model_dir, args.threads), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
