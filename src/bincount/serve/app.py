"""The HTTP server of SageMaker's inference container contract, on FastAPI + uvicorn.

``GET /ping`` answers 200 once :func:`~bincount.serve.inference.model_fn` has loaded the model
(503 before, or if loading failed); ``POST /invocations`` runs the handler functions
(:mod:`bincount.serve.inference`) with the request's headers and the server's settings in their
``context``; this module only adapts HTTP to them. The photos of concurrent requests share forward
passes (:class:`~bincount.serve.batching.Batcher`). Every answer says where its time went in a
``Server-Timing`` header (W3C Server Timing), in milliseconds: ``decode`` (``input_fn`` on this
request), ``batch`` (``predict_fn`` on the batch it shared, ``desc`` its size) and ``total``.

Usage:
    bincount serve --model-dir outputs/RUN/model --port 8080
    curl -s --data-binary @bin.jpg -H 'Content-Type: image/jpeg' \\
         -H 'X-Amzn-SageMaker-Custom-Attributes: expected_quantity=3' localhost:8080/invocations
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bincount.serve.batching import Batcher
from bincount.serve.errors import RequestError
from bincount.serve.images import Limits, read_image_header
from bincount.serve.inference import HandlerContext, Settings, error_answer, input_fn, model_fn, output_fn, predict_fn
from bincount.serve.model import CountingModel, onnx_file
from bincount.serve.request import IMAGE_CONTENT_TYPES, CountRequest, check_accept, check_content_type

log = logging.getLogger(__name__)


async def read_body(request: Request, limit: int, *, status: int) -> bytes:
    """The request body, refused with ``status`` as soon as it is known to exceed ``limit`` bytes.

    Raises:
        RequestError: (``status``) The declared or streamed body is over ``limit`` bytes.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body is {declared} bytes; the limit is {limit} bytes", status)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body is over the limit of {limit} bytes", status)
        chunks.append(chunk)
    return b"".join(chunks)


def photo_rows(request: CountRequest) -> list[tuple[torch.Tensor, int | None]]:
    """A decoded request as batch items: one ``(image (3, H, W) uint8, expected quantity or None)`` per photo."""
    return list(zip(request.images, request.expected))


def predict_rows(model: CountingModel, rows: Sequence[tuple[torch.Tensor, int | None]]) -> list[dict]:
    """:func:`~bincount.serve.inference.predict_fn` on the photos of several requests at once."""
    return predict_fn(CountRequest([image for image, _ in rows], [expected for _, expected in rows]), model)


def create_app(model_dir: str | Path, *, review_threshold: float | None = None, limits: Limits | None = None,
               max_body_bytes: int = 32 * 2**20, max_batch_size: int = 16, max_wait_ms: float = 0.0,
               inline_decode_pixels: int = 4_000_000, device: str | None = None,
               threads: int | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background once the server starts.

    Settings not given here come from the environment, as on a SageMaker endpoint
    (:meth:`~bincount.serve.inference.Settings.from_env`).

    Args:
        review_threshold: Overrides ``BINCOUNT_REVIEW_THRESHOLD`` and the calibrated review threshold.
        limits: Per-photo and per-request limits (default :meth:`Limits.from_env`).
        max_body_bytes: Largest JSON body (larger: 413). An image body's limit is
            ``limits.max_image_bytes`` (larger: 400).
        max_batch_size: Photos per forward pass (1: one request at a time).
        max_wait_ms: See :class:`~bincount.serve.batching.Batcher`.
        inline_decode_pixels: A single photo of at most this many pixels (by its header) is
            decoded in the forward thread just before its batch (one thread hand-off instead of
            two); a larger one, and a JSON body, in a thread pool, beside other requests' batches.
        device: See :func:`~bincount.serve.model.inference_session`.
        threads: See :func:`~bincount.serve.model.inference_session`.

    Returns:
        The app; ``app.state.model`` is ``None`` until loaded, ``app.state.load_error`` says why
        loading failed, ``app.state.load_finished`` (a :class:`threading.Event`) is set once
        either is known, ``app.state.batcher.stats`` counts batches.

    Raises:
        ValueError: If a ``BINCOUNT_*`` variable is malformed.
    """
    settings = Settings.from_env().override(review_threshold=review_threshold, limits=limits, device=device,
                                            threads=threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            try:
                model = await asyncio.to_thread(model_fn, str(model_dir), HandlerContext(settings))
            except Exception as err:  # noqa: BLE001 - reported by /ping; the process stays up to say so
                log.exception("cannot load the model from %s", model_dir)
                app.state.load_error = f"{type(err).__name__}: {err}"
                app.state.load_finished.set()
                return
            app.state.batcher = Batcher(partial(predict_rows, model), max_batch_size=max_batch_size,
                                        max_wait_ms=max_wait_ms)
            worker = asyncio.create_task(app.state.batcher.run())
            worker.add_done_callback(lambda t: t.cancelled() or log.error("batch worker stopped: %r", t.exception()))
            app.state.tasks.append(worker)
            app.state.model = model
            log.info("model %s loaded from %s (review threshold %.4f, temperature %.3f)", model.card.arch,
                     model_dir, model.review_threshold, model.temperature)
            app.state.load_finished.set()

        app.state.tasks = [asyncio.create_task(load())]
        yield
        for task in app.state.tasks:
            task.cancel()
        if app.state.batcher is not None:
            app.state.batcher.close()

    app = FastAPI(title="bincount", summary="Count the objects in a bin photo", lifespan=lifespan)
    app.state.model = None
    app.state.load_error = None
    app.state.batcher = None
    app.state.load_finished = threading.Event()

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        status, body = error_answer(err, settings)
        return JSONResponse(body, status_code=status)

    @app.get("/ping")
    async def ping() -> JSONResponse:
        if app.state.model is not None:
            return JSONResponse({"status": "ok"})
        if app.state.load_error is not None:
            return JSONResponse({"status": "error", "error": app.state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        start = time.perf_counter()
        if app.state.model is None:
            return JSONResponse({"error": "the model is not loaded (see GET /ping)"}, status_code=503)
        content_type, accept = request.headers.get("content-type"), request.headers.get("accept")
        # what the handler would refuse anyway, refused before the body is read or the network runs
        kind = check_content_type(content_type)
        check_accept(accept)
        context = HandlerContext(settings, request.headers)
        decode = partial(input_fn, request_content_type=content_type, context=context)
        if kind in IMAGE_CONTENT_TYPES:
            body = await read_body(request, settings.limits.max_image_bytes, status=400)
            # the header says how long decoding will take, and refuses oversized photos before it
            _, width, height = read_image_header(body, limits=settings.limits,
                                                 expected_format=IMAGE_CONTENT_TYPES[kind])
            inline = width * height <= inline_decode_pixels
        else:
            body = await read_body(request, max_body_bytes, status=413)
            inline = False
        if inline:
            batched = await app.state.batcher.submit([body], prepare=lambda b: photo_rows(decode(b))[0])
            decode_ms = batched.prepare_ms
        else:  # a big photo or a JSON body would hold up everyone's forward pass: decode it beside them
            t0 = time.perf_counter()
            count_request = await run_in_threadpool(decode, body)
            decode_ms = 1000 * (time.perf_counter() - t0)
            batched = await app.state.batcher.submit(photo_rows(count_request))
        payload, answer_type = output_fn(list(batched.rows), accept, context)
        timing = (f"decode;dur={decode_ms:.3f}, batch;dur={batched.batch_ms:.3f};desc=\"size {batched.batch_size}\", "
                  f"total;dur={1000 * (time.perf_counter() - start):.3f}")
        return Response(payload, media_type=answer_type, headers={"Server-Timing": timing})

    return app


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
          **app_kwargs) -> None:
    """Run :func:`create_app` under uvicorn (one process: batching needs one model per process).

    A model folder without ``model.onnx``, ``model.pt`` or a well-formed ``model_config.json``
    fails here, before the server starts: on SageMaker the container exits with the error in its
    log instead of answering ``/ping`` with 503 until the endpoint times out.

    Args:
        host: Interface to bind (``0.0.0.0`` in a container).
        port: TCP port (SageMaker: 8080).
        **app_kwargs: See :func:`create_app`.

    Raises:
        FileNotFoundError: If ``model_dir`` lacks ``model.onnx``, ``model.pt`` or ``model_config.json``.
        ValueError: If ``model_config.json`` or a ``BINCOUNT_*`` variable is malformed.
    """
    import uvicorn

    from bincount.models.export import read_model_card

    read_model_card(model_dir)
    onnx_file(model_dir)
    torch.set_num_threads(1)  # preprocessing, a photo at a time: torch's waiting threads would slow ONNX Runtime's
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(model_dir, **app_kwargs), host=host, port=port, log_level=log_level)
