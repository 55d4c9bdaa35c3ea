"""A fan-out worker: makes the remaining calls of the jobs it is given and writes each call to the request cache.

The same class runs in-process (`LocalExecutor`) and inside each Ray actor
(`tasks/fanout.py`), driven by one scheduling loop (`dispatch.py`):

- `submit` hands it jobs with tickets; each job runs on its own (at most
  `concurrency` at a time), so a slow request that retries holds one slot,
  never a batch.
- A job's ticket comes back from `durable` only once its rows are flushed to
  a shard: the driver never gives a worker more than its window of jobs not
  yet durable, so a crash (of the worker, the driver or a node) loses at most
  that window of paid answers.
- Shards are flushed every `flush_rows` rows, every `flush_seconds`, and
  whenever no job is left running.
- It stops sending when its driver is gone: the gate stops answering leases
  (Ray kills a dead driver's actors; the gate is one of them), or nobody has
  polled `durable` for `orphan_after_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from orca_core.recipe.models import TeacherEndpoint
from orca_core.teacher.client import BudgetExhausted, CallResult, Limiter, TeacherClient
from orca_core.teacher.jobs import Progress, call_id
from orca_core.traces import RequestCache, now_iso

log = logging.getLogger(__name__)


class TraceWorker:
    def __init__(self, name: str, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str],
                 limiters: dict[str, Limiter], cache_folder: str, concurrency: int = 32,
                 flush_rows: int = 64, flush_seconds: float = 2.0, orphan_after_s: float | None = None):
        self.name, self.endpoints, self.base_urls, self.limiters = name, endpoints, base_urls, limiters
        self.cache_folder, self.concurrency = cache_folder, concurrency
        self.flush_rows, self.flush_seconds, self.orphan_after_s = flush_rows, flush_seconds, orphan_after_s
        self.counters: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.budget_exhausted = False
        self.error: BaseException | None = None  # fatal: the driver gets it from `durable`
        self._jobs: dict[int, asyncio.Task] = {}
        self._finished: list[int] = []  # tickets whose rows are buffered, not yet flushed
        self._durable: list[int] = []  # tickets whose rows are in a shard, not yet reported
        self._started = False

    async def start(self) -> None:
        """Open the HTTP session and the shard writer (once)."""
        if self._started:
            return
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency))
        self.clients = {role: TeacherClient(e, self.base_urls[role], self.limiters[role], self.session, role)
                        for role, e in self.endpoints.items()}
        self.cache = RequestCache(self.cache_folder)
        self.writer = self._new_writer()
        self._writing = asyncio.Lock()  # shards are written one at a time, in order
        self._writes: set[asyncio.Task] = set()
        self.semaphore = asyncio.Semaphore(self.concurrency)
        self._ready = asyncio.Event()
        self._polled = time.monotonic()
        self._flusher = asyncio.create_task(self._flush_periodically())
        self._started = True

    async def submit(self, jobs: list[tuple[int, Progress]]) -> None:
        """Start `(ticket, job)` pairs; each ticket comes back from `durable` once the job's rows are saved."""
        await self.start()
        for ticket, progress in jobs:
            self._jobs[ticket] = asyncio.create_task(self._job(ticket, progress))

    async def durable(self, timeout: float) -> dict[str, Any]:
        """Tickets made durable since the last call (waits up to `timeout` for one) and the counters.

        Raises the fatal error that stopped the worker. Each call is also the driver's heartbeat.
        """
        await self.start()
        self._polled = time.monotonic()
        if not self._durable and self.error is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        self._polled = time.monotonic()
        if self.error is not None:
            raise self.error
        tickets, self._durable = self._durable, []
        self._ready.clear()
        return {"tickets": tickets, "stats": self.stats()}

    async def _job(self, ticket: int, progress: Progress) -> None:
        try:
            await self._calls(progress)
        except Exception as err:  # a fatal teacher error, a lost gate (GateLost), a bug: the others would fail alike
            if self.error is None:
                self.error = err
                self._stop(f"{type(err).__name__}: {err}")
        finally:
            self._jobs.pop(ticket, None)
            self._finished.append(ticket)
            if not self._jobs or len(self.writer.rows) >= self.flush_rows:
                self._flush()

    async def _calls(self, progress: Progress) -> None:
        job = progress.job
        endpoint, client = self.endpoints[job.teacher_role], self.clients[job.teacher_role]
        previous = progress.previous
        async with self.semaphore:
            for _ in range(len(previous), job.calls):
                if self.budget_exhausted:
                    return
                messages = job.messages(previous)
                rid = call_id(job, endpoint, previous)
                try:
                    result = await client.call(messages, rid)
                except BudgetExhausted:
                    self.budget_exhausted = True
                    return
                self._record(rid, endpoint, result)
                if result.status != "ok":
                    self.failures[result.status.removeprefix("failed:")] += 1
                    self.counters["jobs_failed"] += 1
                    return
                previous = [*previous, result.content]
        self.counters["jobs_done"] += 1

    def _record(self, rid: str, endpoint: TeacherEndpoint, result: CallResult) -> None:
        self.writer.add({
            "request_id": rid, "teacher_model": endpoint.model, "response": result.content,
            "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "cost_usd": result.cost_usd,
            "latency_ms": result.latency_ms, "attempts": result.attempts, "status": result.status,
            "created_at": now_iso(),
        })
        self.counters["requests"] += 1
        self.counters["attempts"] += result.attempts
        self.counters["prompt_tokens"] += result.prompt_tokens
        self.counters["completion_tokens"] += result.completion_tokens
        self.counters["cost_micro_usd"] += round(result.cost_usd * 1e6)

    def _new_writer(self):
        # The worker decides when to flush: it must know which jobs a shard makes durable.
        return self.cache.writer(self.name, sys.maxsize, float("inf"))

    def _flush(self) -> None:
        """Write the buffered rows as one shard, on a thread (requests keep flowing meanwhile, and an
        object store's latency never stalls them); the jobs that wrote them are durable once it is."""
        if not self._finished and not self.writer.rows:
            return
        finished, self._finished = self._finished, []
        writer, self.writer = self.writer, self._new_writer()
        task = asyncio.create_task(self._write(writer, finished))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, writer, finished: list[int]) -> None:
        async with self._writing:
            try:
                if writer.rows:
                    await asyncio.to_thread(writer.flush)
            except Exception as err:  # the store refuses: the driver hears of it at its next poll
                self.error = self.error or err
                self._ready.set()
                return
        self._durable.extend(finished)
        if self._durable:
            self._ready.set()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            self._flush()
            if self.orphan_after_s and self._jobs and time.monotonic() - self._polled > self.orphan_after_s:
                why = f"no word from the driver for {self.orphan_after_s:.0f} s"
                self.error = self.error or TimeoutError(f"fan-out worker {self.name} stopped sending: {why}")
                self._stop(why)

    def _stop(self, why: str) -> None:
        """Send nothing more: cancel every job (what is answered is flushed)."""
        log.warning("fan-out worker %s stops: %s", self.name, why)
        self.counters["stopped"] += 1
        for task in list(self._jobs.values()):
            task.cancel()

    def stats(self) -> dict[str, Any]:
        limiter_counts: Counter[str] = Counter()
        for limiter in self.limiters.values():
            limiter_counts.update(getattr(limiter, "counts", {}))
        return {**self.counters, **limiter_counts, "failures": dict(self.failures),
                "budget_exhausted": self.budget_exhausted}

    async def close(self) -> dict[str, Any]:
        """Stop what still runs, flush what is buffered, hand the gate back this worker's shares."""
        if self._started:
            self._started = False
            for task in list(self._jobs.values()):
                task.cancel()
            await asyncio.gather(*self._jobs.values(), return_exceptions=True)
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flush()
            await asyncio.gather(*self._writes, return_exceptions=True)
            for limiter in self.limiters.values():
                with contextlib.suppress(Exception):  # the gate may be gone already (the run is ending)
                    await limiter.leave()
            await self.session.close()
        return self.stats()
