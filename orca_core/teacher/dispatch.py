"""The scheduling loop both executors share (in-process workers, Ray actors): jobs flow as a stream.

- Each worker holds at most `window` jobs not yet durable; the loop refills it
  as tickets come back (a job's rows are in a shard), so a slow request holds
  one slot, never a batch, and a crash anywhere makes at most `concurrency +
  flush_rows` answers per worker paid twice (`window`).
- The job stream (`batches`: resolved against the request cache chunk by
  chunk) is pulled lazily on one helper thread, so the loop keeps serving the
  workers while a chunk is resolved.
- A worker that is lost (its actor or node died) has its jobs checked against
  the cache again (`recheck`: only calls with no row are sent again) and handed
  to the others; `replace` may start a new worker in its place.
- The first fatal error (bad key, unknown model) ends the loop; every worker
  is closed (its buffered rows flushed) before it propagates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from orca_core.teacher.jobs import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerLost(RuntimeError):
    """The worker is gone (its process or node died): its jobs go to the others."""


class WorkerHandle(Protocol):
    name: str

    async def start(self) -> None: ...
    async def submit(self, jobs: list[tuple[int, Progress]]) -> None: ...
    async def durable(self, timeout: float) -> dict[str, Any]: ...  # {"tickets": [...], "stats": {...}}
    async def close(self) -> dict[str, Any]: ...


def window(concurrency: int, flush_rows: int) -> int:
    """Jobs a worker may hold not yet durable: `concurrency` sending, `flush_rows` answered but not yet in a
    shard, and `flush_rows` queued, so that it never runs dry while a shard is written and the loop refills it.
    What a crash can make paid twice is the first two: a worker flushes at `flush_rows` answers."""
    return concurrency + 2 * flush_rows


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum worker counters; merge failure counts; any worker out of budget -> out of budget."""
    total: Counter = Counter()
    failures: Counter = Counter()
    for s in stats:
        total.update({k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        failures.update(s.get("failures", {}))
    return {**total, "failures": dict(failures), "budget_exhausted": any(s.get("budget_exhausted") for s in stats)}


async def dispatch(batches: Iterator[list[Progress]], workers: list[WorkerHandle], window: int,
                   on_progress: Callable[[dict[str, Any]], None], report_every_s: float = 2.0,
                   recheck: Callable[[list[Progress]], list[Progress]] | None = None,
                   replace: Callable[[WorkerHandle], Awaitable[WorkerHandle | None]] | None = None) -> dict[str, Any]:
    """Run every job of `batches` on `workers`; returns the merged worker counters (and `start_s`: how long
    the workers took to start, e.g. Ray actors importing the library)."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fanout-feed") as feed_thread:
        loop = Loop(batches, window, recheck, replace, feed_thread)
        try:
            await asyncio.gather(*(w.start() for w in workers))
            start_s = time.monotonic() - started
            loop.live = list(workers)
            await loop.run(on_progress, report_every_s)
        finally:
            await loop.close()
    return {**merge_stats(list(loop.stats.values())), "start_s": round(start_s, 3)}


class Loop:
    def __init__(self, batches: Iterator[list[Progress]], window: int, recheck, replace, feed_thread: ThreadPoolExecutor):
        self.batches, self.window, self.recheck, self.replace = batches, window, recheck, replace
        self.feed_thread = feed_thread
        self.live: list[WorkerHandle] = []
        self.queue: deque[Progress] = deque()
        self.fed_all = False
        self.stopping = False  # the budget is spent: no new work
        self.outstanding: dict[str, dict[int, Progress]] = {}  # worker -> ticket -> job not yet durable
        self.stats: dict[str, dict[str, Any]] = {}  # worker -> its latest counters
        self.polls: dict[asyncio.Task, WorkerHandle] = {}
        self.tickets = itertools.count()

    async def _in_feed_thread(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.feed_thread, fn, *args)

    async def run(self, on_progress: Callable[[dict[str, Any]], None], report_every_s: float) -> None:
        last_report = time.monotonic()
        await self._refill()
        while True:
            for worker in self.live:
                if worker not in self.polls.values():
                    self.polls[asyncio.ensure_future(worker.durable(report_every_s))] = worker
            if not any(self.outstanding.values()) and (self.stopping or (self.fed_all and not self.queue)):
                return
            done, _ = await asyncio.wait(self.polls, timeout=report_every_s, return_when=asyncio.FIRST_COMPLETED)
            for poll in done:
                worker = self.polls.pop(poll)
                try:
                    result = poll.result()  # a fatal teacher error ends the run here
                except WorkerLost as err:
                    await self._lost(worker, err)
                    continue
                for ticket in result["tickets"]:
                    self.outstanding[worker.name].pop(ticket, None)
                self.stats[worker.name] = result["stats"]
                self.stopping |= bool(result["stats"].get("budget_exhausted"))
            if time.monotonic() - last_report >= report_every_s:
                on_progress(merge_stats(list(self.stats.values())))
                last_report = time.monotonic()
            await self._refill()

    async def _refill(self) -> None:
        """Top every worker up to its window, pulling the job stream as needed."""
        for worker in sorted(self.live, key=lambda w: len(self.outstanding.get(w.name, {}))):
            held = self.outstanding.setdefault(worker.name, {})
            jobs: list[tuple[int, Progress]] = []
            while not self.stopping and len(held) + len(jobs) < self.window:
                if not self.queue:
                    if self.fed_all:
                        break
                    batch = await self._in_feed_thread(next, self.batches, None)
                    if batch is None:
                        self.fed_all = True
                    else:
                        self.queue.extend(batch)
                    continue
                jobs.append((next(self.tickets), self.queue.popleft()))
            if jobs:
                held.update(jobs)
                try:
                    await worker.submit(jobs)
                except WorkerLost as err:
                    await self._lost(worker, err)

    async def _lost(self, worker: WorkerHandle, err: Exception) -> None:
        if worker not in self.live:
            return
        self.live.remove(worker)
        jobs = list(self.outstanding.pop(worker.name, {}).values())
        for poll, polled in list(self.polls.items()):
            if polled is worker:
                poll.cancel()
                del self.polls[poll]
        if jobs and self.recheck is not None:
            jobs = await self._in_feed_thread(self.recheck, jobs)  # answers it saved are not paid again
        self.queue.extendleft(reversed(jobs))
        log.warning("fan-out worker %s lost (%s): %d unfinished jobs go to the others", worker.name, err, len(jobs))
        self.stats[f"{worker.name} (lost)"] = {**self.stats.pop(worker.name, {}), "workers_lost": 1}
        replacement = await self.replace(worker) if self.replace is not None else None
        while replacement is not None:
            try:
                await replacement.start()
                self.live.append(replacement)
                break
            except WorkerLost as failed:  # placed on a dying node, say: try another
                log.warning("fan-out worker %s did not start (%s)", replacement.name, failed)
                replacement = await self.replace(replacement)
        if not self.live:
            raise RuntimeError(f"every fan-out worker was lost (the last: {worker.name}: {err})")

    async def close(self) -> None:
        """Stop polling; close every live worker (each flushes its rows); keep their final counters."""
        for poll in self.polls:
            poll.cancel()
        await asyncio.gather(*self.polls, return_exceptions=True)
        finals = await asyncio.gather(*(w.close() for w in self.live), return_exceptions=True)
        for worker, final in zip(self.live, finals):
            if isinstance(final, dict):
                self.stats[worker.name] = final


def run_coroutine(coroutine: Awaitable[T]) -> T:
    """`asyncio.run`, also from a thread whose event loop is running (then on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


Recheck = Callable[[list[Progress]], list[Progress]]  # jobs of a lost worker -> those still pending


class LoopExecutor:
    """What the in-process and the Ray executor share: a synchronous `run` around their async `_run`, which
    sets up workers (and the gate) and runs `dispatch` with them."""

    window: int  # jobs per worker not yet durable (`window`)
    gate_stats: dict[str, Any]  # the gate's counters after the run

    def run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None],
            recheck: Recheck | None = None) -> dict[str, Any]:
        return run_coroutine(self._run(batches, on_progress, recheck))

    async def _run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None],
                   recheck: Recheck | None) -> dict[str, Any]:
        raise NotImplementedError
