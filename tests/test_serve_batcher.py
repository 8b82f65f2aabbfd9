"""clipret.serve.batcher.MicroBatcher on its own: the batch cap, the wait bound, answers in order,
exceptions to their callers only, and the drain on stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from clipret.serve.batcher import MicroBatcher


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))  # bounded: a hung batcher fails the test


def test_batches_never_exceed_max_batch_and_answers_keep_their_order():
    sizes: list[int] = []
    gate = threading.Event()

    def run(queries):
        gate.wait(5)  # the first batch holds the worker while the rest queue up
        return [q * 10 for q in queries]

    async def main():
        b = MicroBatcher(run, max_batch=3, max_wait_ms=50, on_batch=sizes.append)
        await b.start()
        first = asyncio.create_task(b.submit([0]))
        await asyncio.sleep(0.1)  # the lone first query has gone out alone (its wait ran out)
        rest = [asyncio.create_task(b.submit([i])) for i in range(1, 10)]
        await asyncio.sleep(0.05)
        gate.set()
        answers = await asyncio.gather(first, *rest)
        await b.stop()
        return answers

    answers = _run(main())
    assert answers == [[i * 10] for i in range(10)]
    assert sizes[0] == 1 and max(sizes) == 3 and sum(sizes) == 10  # capped at 3, every query once
    assert sizes[1:4] == [3, 3, 3]  # queued queries leave in full batches


def test_a_lone_query_waits_at_most_about_max_wait_ms():
    def run(queries):
        return list(queries)

    async def main(wait_ms):
        b = MicroBatcher(run, max_batch=64, max_wait_ms=wait_ms)
        await b.start()
        t = time.perf_counter()
        await b.submit(["x"])
        took = time.perf_counter() - t
        await b.stop()
        return took

    assert _run(main(200)) >= 0.19  # it waited for company, up to the bound
    assert _run(main(0)) < 0.15  # no wait asked: it goes at once (loose bound for a busy 2-core machine)


def test_an_exception_reaches_its_own_batch_only_and_stop_drains_the_queue():
    def run(queries):
        if "bad" in queries:
            raise RuntimeError("forward failed")
        return [q.upper() for q in queries]

    async def main():
        b = MicroBatcher(run, max_batch=1, max_wait_ms=0)  # each query alone
        await b.start()
        bad = asyncio.create_task(b.submit(["bad"]))
        good = [asyncio.create_task(b.submit([w])) for w in ("a", "b", "c")]
        await asyncio.sleep(0)  # all four are queued before the stop
        await b.stop()  # answers everything queued first
        with pytest.raises(RuntimeError, match="forward failed"):
            await bad
        return [await g for g in good]

    assert _run(main()) == [["A"], ["B"], ["C"]]
    with pytest.raises(ValueError):
        MicroBatcher(lambda q: q, max_batch=0)
