"""Dynamic batching for a server: requests that arrive close together are scored in one call.

``Batcher.submit(item)`` waits for the item's result. One worker takes the oldest queued item, then more until
``max_batch`` are in hand or ``max_wait_ms`` have passed since the oldest one arrived (items that queued while the
previous batch ran are taken at once), and runs ``fn(items) -> results`` in one thread, so the event loop keeps
answering health checks, metrics and refusals meanwhile. The queue is bounded: a full queue raises ``Overloaded``
at once (the server answers 503) rather than letting latency grow without bound. If a batch fails, its items are
retried one by one, so a request that breaks the scorer fails alone.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class Overloaded(RuntimeError):
    """The queue is full; ``retry_after`` is the estimated seconds until it has drained."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Waiting:
    item: object
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Bounded queue + one worker that calls ``fn`` on batches of up to ``max_batch`` items.

    ``on_batch(n, seconds)`` is called after each batch (metrics). The worker starts with the first
    ``submit`` in the running event loop; ``drain()`` waits for everything queued, then stops it.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int = 8, max_wait_ms: float = 5.0,
                 queue_size: int = 64, on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch ({max_batch}) and queue_size ({queue_size}) must be at least 1 and "
                             f"max_wait_ms ({max_wait_ms}) at least 0")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1e3
        self.queue_size, self.on_batch = queue_size, on_batch
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self.busy = 0  # items in the batch being scored
        self.batch_seconds = 0.0  # moving average of a batch's time, for Retry-After

    def depth(self) -> int:
        """Items waiting (not yet in a batch)."""
        return self.queue.qsize() if self.queue is not None else 0

    def retry_after(self) -> int:
        """Whole seconds (at least 1) until the queue, at the recent batch time, has drained."""
        return max(1, math.ceil(self.batch_seconds * (self.depth() / self.max_batch + 1)))

    async def submit(self, item):
        """Queue ``item`` and wait for its result; ``Overloaded`` at once when the queue is full."""
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.get_loop() is not loop:  # first use, or a new event loop (tests)
            self.queue = asyncio.Queue(maxsize=self.queue_size)
            self.task = loop.create_task(self._work())
        waiting = _Waiting(item, loop.create_future())
        try:
            self.queue.put_nowait(waiting)
        except asyncio.QueueFull:
            raise Overloaded(self.retry_after()) from None
        return await waiting.future

    async def _collect(self) -> list[_Waiting]:
        batch = [await self.queue.get()]
        while len(batch) < self.max_batch:
            left = batch[0].arrived + self.max_wait - time.monotonic()
            if self.queue.empty() and left <= 0:
                break
            try:
                batch.append(self.queue.get_nowait() if not self.queue.empty()
                             else await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self.busy = len(batch)
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.pool, self._run, [w.item for w in batch])
            finally:
                self.busy = 0
            seconds = time.perf_counter() - t0
            self.batch_seconds = seconds if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * seconds
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)
            for w, r in zip(batch, results, strict=True):
                if not w.future.done():  # a client that went away cancelled its future
                    (w.future.set_exception if isinstance(r, BaseException) else w.future.set_result)(r)

    def _run(self, items: list) -> list:
        """``fn(items)``; if it raises, each item alone, so only the one that breaks it gets the error."""
        try:
            return self.fn(items)
        except Exception as err:  # noqa: BLE001 - re-raised per item below
            if len(items) == 1:
                return [err]
        out = []
        for it in items:
            try:
                out += self.fn([it])
            except Exception as err:  # noqa: BLE001 - handed to that request's future
                out.append(err)
        return out

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait (at most ``timeout`` s) until nothing is queued or being scored, then stop the worker."""
        end = time.monotonic() + timeout
        while self.task is not None and (self.depth() or self.busy) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        self.pool.shutdown(wait=False)
