"""Dynamic batching: photos of concurrent requests share one call of a batch function."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch


@dataclass(frozen=True)
class Batched:
    """One request's share of a batch.

    Attributes:
        rows: ``fn``'s ``len(items)`` output rows for the request's items (a slice of its tensor or list).
        prepare_ms: Time spent preparing this request's items, milliseconds.
        batch_ms: Time of the ``fn`` call the rows came from (``batch_size`` items), milliseconds.
    """

    rows: torch.Tensor | list
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
        fn: ``N`` items -> ``N`` rows (a tensor ``(N, ...)`` or a list), called in one thread at
            a time (so all of the network's work stays on one thread and one OpenMP team).
        max_batch_size: Items per call; one request larger than this runs alone.
        max_wait_ms: How long to wait for more requests once one is queued (0: take only
            what is already waiting, so a lone request is not delayed).
    """

    def __init__(self, fn: Callable[[list], torch.Tensor | list], *, max_batch_size: int = 16,
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
            ends = list(accumulate(sizes))
            parts = [out[end - size:end] for size, end in zip(sizes, ends)]
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
