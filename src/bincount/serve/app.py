"""The HTTP server of SageMaker's inference container contract, on FastAPI + uvicorn.

``GET /ping`` answers 200 once the model is loaded (503 before, or if loading failed);
``POST /invocations`` decodes with :func:`~bincount.serve.inference.decode_request`, counts, and
answers with :func:`~bincount.serve.inference.output_fn`: the handler functions the SageMaker
PyTorch image runs. Client mistakes get a 4xx with ``{"error": "<what was wrong>"}``. Every
answer says where its time went in a ``Server-Timing`` header (W3C Server Timing), in
milliseconds: ``decode`` (this request's photos), ``batch`` (preprocess + forward of the batch
it shared, ``desc`` its size) and ``total`` (in the handler, from headers read to answer ready).

Concurrent requests share forward passes: requests that queue up while the network is busy are
preprocessed and counted together in the next batch (:class:`Batcher`), so a lone request waits
for nobody. A single photo of up to ``inline_decode_pixels`` is decoded in the forward thread
just before its batch (one thread hand-off per request instead of two); a larger one, and a JSON
body (it may name S3 objects), are decoded in a thread pool so that they never hold up the
network.

Usage:
    bincount serve --model-dir outputs/RUN/model --port 8080
    curl -s --data-binary @bin.jpg -H 'Content-Type: image/jpeg' \\
         -H 'X-Amzn-SageMaker-Custom-Attributes: expected_quantity=3' localhost:8080/invocations
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bincount.serve.inference import (
    CONTENT_TYPES,
    CUSTOM_ATTRIBUTES,
    IMAGE_CONTENT_TYPES,
    CountingModel,
    Limits,
    RequestError,
    UnsupportedContentType,
    check_accept,
    decode_image_pixels,
    decode_request,
    make_predictions,
    media_type,
    output_fn,
    parse_custom_attributes,
    probabilities,
    read_image_header,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batched:
    """One request's share of a batch.

    Attributes:
        rows: ``fn``'s output rows for the request's items, ``(len(items), ...)``.
        prepare_ms: Time spent preparing this request's items, milliseconds.
        batch_ms: Time of the ``fn`` call the rows came from, milliseconds (shared by the
            requests of the batch).
        batch_size: Items in that call.
    """

    rows: torch.Tensor
    prepare_ms: float
    batch_ms: float
    batch_size: int


class Batcher:
    """Run a batch function on several requests' items (photos) at once.

    One worker task takes the first queued request, adds whatever else is already queued
    (and whatever arrives within ``max_wait_ms``) until ``max_batch_size`` items are in, and in
    a dedicated thread prepares each request's items and runs ``fn`` once on all of them, then
    hands each request its rows of the output. While that runs, new requests queue up and form
    the next batch.

    Args:
        fn: ``N`` items -> ``(N, ...)`` tensor, called in one thread at a time (so all of the
            network's work stays on one thread and one OpenMP team).
        max_batch_size: Items per call; one request larger than this runs alone.
        max_wait_ms: How long to wait for more requests once one is queued (0: take only
            what is already waiting, so a lone request is not delayed).
    """

    def __init__(self, fn: Callable[[list], torch.Tensor], *, max_batch_size: int = 16,
                 max_wait_ms: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[Sequence, Callable | None, asyncio.Future]] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bincount-forward")
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0}

    async def submit(self, items: Sequence, prepare: Callable[[Any], Any] | None = None) -> Batched:
        """Queue ``items`` and wait for ``fn``'s output rows for them.

        Args:
            items: This request's items.
            prepare: Applied to each item in the batch thread before ``fn`` (e.g. decoding a
                photo); what it raises fails this request only.

        Raises:
            Exception: What ``prepare`` raised on one of these items, or what ``fn`` raised on
                the batch they were in.
        """
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, prepare, future))
        return await future

    async def _collect(self) -> list[tuple[Sequence, Callable | None, asyncio.Future]]:
        requests = [await self.queue.get()]
        size = len(requests[0][0])
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while size < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                request = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(),
                                                                                                 remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            requests.append(request)
            size += len(request[0])
        return [r for r in requests if not r[2].cancelled()]  # a client that hung up needs no answer

    def _step(self, requests: list[tuple[Sequence, Callable | None]]) -> list[Batched | Exception]:
        """In the batch thread: each request's share of the batch, or the error that failed it."""
        results: list[Batched | Exception | None] = [None] * len(requests)
        batch, sizes, prepared = [], [], []
        for i, (items, prepare) in enumerate(requests):
            t0 = time.perf_counter()
            try:
                items = [prepare(x) for x in items] if prepare is not None else list(items)
            except Exception as err:  # noqa: BLE001 - this request's own error, answered to it alone
                results[i] = err
                continue
            batch += items
            sizes.append(len(items))
            prepared.append((i, 1000 * (time.perf_counter() - t0)))
        if not batch:
            return results
        t0 = time.perf_counter()
        try:
            out = self.fn(batch)
            parts = out.split(sizes)
        except Exception as err:  # noqa: BLE001 - handed to every request of the batch
            for i, _ in prepared:
                results[i] = err
            return results
        batch_ms = 1000 * (time.perf_counter() - t0)
        self.stats["batches"] += 1
        self.stats["rows"] += len(out)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(out))
        for (i, prepare_ms), rows in zip(prepared, parts):
            results[i] = Batched(rows, prepare_ms, batch_ms, len(out))
        return results

    async def run(self) -> None:
        """The worker loop; runs until cancelled. An error fails only the request or batch it occurred in."""
        loop = asyncio.get_running_loop()
        while True:
            requests = await self._collect()
            if not requests:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._step, [r[:2] for r in requests])
            except Exception as err:  # noqa: BLE001 - e.g. the executor shut down: no request is left waiting
                results = [err] * len(requests)
            for result, (_, _, future) in zip(results, requests):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def read_body(request: Request, limit: int, *, status: int) -> bytes:
    """The request body, refused with ``status`` as soon as it is known to exceed ``limit`` bytes."""
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


def create_app(model_dir: str | Path, *, review_threshold: float | None = None, limits: Limits | None = None,
               max_body_bytes: int = 32 * 2**20, max_batch_size: int = 16, max_wait_ms: float = 0.0,
               inline_decode_pixels: int = 4_000_000, device: str | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background once the server starts.

    Args:
        model_dir: Exported ``model/`` folder.
        review_threshold: Overrides the calibrated review threshold.
        limits: Per-photo and per-request limits (default :class:`Limits`).
        max_body_bytes: Largest JSON body (larger: 413). An image body's limit is
            ``limits.max_image_bytes`` (larger: 400).
        max_batch_size: Photos per forward pass (1: one request at a time).
        max_wait_ms: See :class:`Batcher`.
        inline_decode_pixels: A single photo of at most this many pixels (by its header) is
            decoded in the forward thread, which saves two thread hand-offs; a larger one
            (milliseconds to decode) in a thread pool, so that it does not delay other
            requests' batches.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.

    Returns:
        The app; ``app.state.model`` is ``None`` until loaded, ``app.state.load_error`` says why
        loading failed, ``app.state.batcher.stats`` counts batches.
    """
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            try:
                model = await asyncio.to_thread(CountingModel.load, model_dir, review_threshold=review_threshold,
                                                limits=limits, device=device)
            except Exception as err:  # noqa: BLE001 - reported by /ping; the process stays up to say so
                log.exception("cannot load the model from %s", model_dir)
                app.state.load_error = f"{type(err).__name__}: {err}"
                return
            app.state.batcher = Batcher(partial(probabilities, model), max_batch_size=max_batch_size,
                                        max_wait_ms=max_wait_ms)
            worker = asyncio.create_task(app.state.batcher.run())
            worker.add_done_callback(lambda t: t.cancelled() or log.error("batch worker stopped: %r", t.exception()))
            app.state.tasks.append(worker)
            app.state.model = model
            log.info("model %s loaded from %s (review threshold %.4f, temperature %.3f)", model.card.arch,
                     model_dir, model.review_threshold, model.temperature)

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

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status_code)

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
        model: CountingModel | None = app.state.model
        if model is None:
            return JSONResponse({"error": "the model is not loaded (see GET /ping)"}, status_code=503)
        content_type = request.headers.get("content-type")
        kind = media_type(content_type)
        if kind not in CONTENT_TYPES:
            raise UnsupportedContentType(content_type)
        accept = check_accept(request.headers.get("accept"))
        if kind in IMAGE_CONTENT_TYPES:
            body = await read_body(request, limits.max_image_bytes, status=400)
            expected = [parse_custom_attributes(request.headers.get(CUSTOM_ATTRIBUTES))]
            fmt, width, height = read_image_header(body, limits=model.limits, expected_format=IMAGE_CONTENT_TYPES[kind])
            decode = partial(decode_image_pixels, fmt=fmt)
            if width * height <= inline_decode_pixels:
                batched = await app.state.batcher.submit([body], prepare=decode)
                decode_ms = batched.prepare_ms
            else:  # a big photo would hold up everyone's forward pass: decode it beside them
                t0 = time.perf_counter()
                image = await run_in_threadpool(decode, body)
                decode_ms = 1000 * (time.perf_counter() - t0)
                batched = await app.state.batcher.submit([image])
        else:
            body = await read_body(request, max_body_bytes, status=413)
            t0 = time.perf_counter()
            count_request = await run_in_threadpool(decode_request, body, content_type, limits=model.limits)
            decode_ms = 1000 * (time.perf_counter() - t0)
            batched = await app.state.batcher.submit(count_request.images)
            expected = count_request.expected
        payload, answer_type = output_fn(make_predictions(batched.rows, expected, model), accept)
        timing = (f"decode;dur={decode_ms:.3f}, batch;dur={batched.batch_ms:.3f};desc=\"size {batched.batch_size}\", "
                  f"total;dur={1000 * (time.perf_counter() - start):.3f}")
        return Response(payload, media_type=answer_type, headers={"Server-Timing": timing})

    return app


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
          threads: int | None = None, **app_kwargs) -> None:
    """Run :func:`create_app` under uvicorn (one process: batching needs one model per process).

    A model folder that is missing, or lacks ``model.pt`` or a well-formed ``model_config.json``,
    fails here, before the server starts (on SageMaker the container then exits with the error
    in its log instead of answering ``/ping`` with 503 until the endpoint times out). The
    weights load in the background once the server is up; if they cannot, ``/ping`` says why.

    Args:
        model_dir: Exported ``model/`` folder.
        host: Interface to bind (``0.0.0.0`` in a container).
        port: TCP port (SageMaker: 8080).
        log_level: uvicorn log level.
        threads: torch intra-op threads of the forward pass (default: torch's, one per core). On
            a small machine fewer threads leave cores for decoding and HTTP.
        **app_kwargs: See :func:`create_app`.

    Raises:
        FileNotFoundError: If ``model_dir`` lacks ``model.pt`` or ``model_config.json``.
        ValueError: If ``model_config.json`` is malformed.
    """
    import uvicorn

    from bincount.models.export import read_model_card

    read_model_card(model_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(model_dir, **app_kwargs), host=host, port=port, log_level=log_level)
