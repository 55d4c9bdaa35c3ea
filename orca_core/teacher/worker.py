"""A fan-out worker: makes the remaining calls of pending jobs and writes each call to the request cache.

The same class runs in-process (`LocalExecutor`) and inside each Ray actor
(`tasks/fanout.py`): one aiohttp session, its own concurrency, its own shard
writer (flushed every N rows or T seconds, also when idle).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from orca_core.recipe.models import TeacherEndpoint
from orca_core.teacher.client import BudgetExhausted, CallResult, Limiter, TeacherClient
from orca_core.teacher.jobs import Progress, call_id
from orca_core.traces import RequestCache, ShardWriter, now_iso


class TraceWorker:
    def __init__(self, name: str, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str],
                 limiters: dict[str, Limiter], cache_folder: str, concurrency: int = 32,
                 flush_rows: int = 64, flush_seconds: float = 2.0):
        self.name, self.endpoints, self.base_urls, self.limiters = name, endpoints, base_urls, limiters
        self.cache_folder, self.concurrency = cache_folder, concurrency
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.counters: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.budget_exhausted = False
        self._started = False

    async def _start(self) -> None:
        if self._started:
            return
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency))
        self.clients = {role: TeacherClient(e, self.base_urls[role], self.limiters[role], self.session)
                        for role, e in self.endpoints.items()}
        self.writer: ShardWriter = RequestCache(Path(self.cache_folder)).writer(self.name, self.flush_rows, self.flush_seconds)
        self.semaphore = asyncio.Semaphore(self.concurrency)
        self._flusher = asyncio.create_task(self._flush_periodically())
        self._started = True

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            self.writer.flush()

    async def run(self, pending: list[Progress]) -> dict[str, Any]:
        """Work through a batch; returns this worker's totals so far."""
        await self._start()
        await asyncio.gather(*(self._job(p) for p in pending))
        return self.stats()

    async def _job(self, progress: Progress) -> None:
        job = progress.job
        endpoint, client = self.endpoints[job.teacher_role], self.clients[job.teacher_role]
        previous = progress.previous
        async with self.semaphore:
            for _ in range(len(previous), job.calls):
                if self.budget_exhausted:
                    return
                messages = job.messages(previous)
                try:
                    result = await client.call(messages)
                except BudgetExhausted:
                    self.budget_exhausted = True
                    return
                self._record(call_id(job, endpoint, previous), endpoint, result)
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

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "failures": dict(self.failures), "budget_exhausted": self.budget_exhausted}

    async def close(self) -> dict[str, Any]:
        """Flush what is buffered and close the HTTP session."""
        if self._started:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self.writer.flush()
            await self.session.close()
            self._started = False
        return self.stats()
