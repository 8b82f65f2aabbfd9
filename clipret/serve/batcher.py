"""Micro-batching: concurrent requests share one forward pass.

Each request puts its queries on an asyncio queue and awaits their answers. One gathering task
takes the first waiting query, then keeps taking more until ``max_batch`` are gathered or
``max_wait_ms`` have passed since the first, and hands the batch to ``run`` in a single worker
thread (the model is used by one thread only, and the event loop never blocks on it). While a
batch runs, new queries queue up; the next batch takes them at once. ``max_batch=1`` turns
micro-batching off (each query alone, in arrival order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MicroBatcher"]

_STOP = object()


class MicroBatcher:
    """Gather queries into batches for ``run(list of queries) -> list of answers`` (one answer per query, in
    order; an answer that is an exception is raised to that query's caller).

    ``on_batch(n)`` is called with each batch's size (for the metrics). Use :meth:`start` and
    :meth:`stop` inside the running event loop (the app's lifespan).
    """

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 64, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self._run, self.max_batch, self.max_wait = run, int(max_batch), float(max_wait_ms) / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the gathering task and the worker thread."""
        self._queue = asyncio.Queue()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipret-batch")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Answer every query already queued, then stop (a graceful shutdown's drain)."""
        if self._task is None or self._queue is None:
            return
        await self._queue.put(_STOP)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._task = None

    async def submit(self, queries: Sequence[Any]) -> list[Any]:
        """Queue ``queries`` and wait for their answers (in order); raises the first answer that is an exception."""
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the micro-batcher is not running")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in queries]
        for query, fut in zip(queries, futures):
            self._queue.put_nowait((query, fut))
        answers = await asyncio.gather(*futures, return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return list(answers)

    async def _gather(self, first: Any) -> tuple[list[Any], bool]:
        """(the batch, whether a stop was seen) starting from ``first``."""
        assert self._queue is not None
        batch, loop = [first], asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - loop.time()
            try:
                item = self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _loop(self) -> None:
        assert self._queue is not None
        loop, stopping = asyncio.get_running_loop(), False
        while True:
            first = self._queue.get_nowait() if stopping and not self._queue.empty() else None
            if first is None:
                if stopping:
                    return
                first = await self._queue.get()
            if first is _STOP:
                stopping = True
                continue
            batch, seen_stop = await self._gather(first)
            stopping = stopping or seen_stop
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                answers = await loop.run_in_executor(self._pool, self._run, [query for query, _ in batch])
            except Exception as exc:  # a failed forward pass fails its batch; the next batch runs as usual
                answers = [exc] * len(batch)
            for (_, fut), answer in zip(batch, answers):
                if fut.done():  # the caller went away (a dropped connection)
                    continue
                if isinstance(answer, BaseException):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)
