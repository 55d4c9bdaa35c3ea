"""The fan-out driver: stream jobs, send only what the request cache lacks, assemble traces.

1. `fan_out`: jobs are resolved against the request cache chunk by chunk; the
   pending ones go to an executor (in-process `LocalExecutor` here, Ray actors
   in `tasks/fanout.py`), whose workers write every call to the cache.
2. `assemble`: the trace table is then a pure function of the jobs and the
   cache, written chunk by chunk. A job still pending (budget spent, worker
   killed) makes the step incomplete: nothing is published, nothing is lost.

Memory stays flat in the number of prompts: jobs are generated lazily and
only one chunk is resolved at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from orca_core.recipe.models import TeacherEndpoint
from orca_core.teacher.jobs import Progress, TraceJob, resolve, trace_row
from orca_core.teacher.limiter import Gate, RoleLimiter, gate_limits
from orca_core.teacher.worker import TraceWorker
from orca_core.traces import TRACE_SCHEMA, RequestCache


class FanoutIncomplete(RuntimeError):
    """Some jobs have no answer yet (budget spent or interrupted); a rerun continues them."""


def chunked(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class FanoutPlan:
    jobs: Callable[[], Iterable[TraceJob]]  # called once per pass: a generator factory
    total: int
    endpoints: dict[str, TeacherEndpoint]


@dataclass
class FanoutReport:
    total: int
    found_in_cache: int = 0
    sent_jobs: int = 0
    worker: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def budget_exhausted(self) -> bool:
        return bool(self.worker.get("budget_exhausted"))


class Executor(Protocol):
    def run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]: ...


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum worker counters; merge failure counts; any worker out of budget -> out of budget."""
    total: Counter = Counter()
    failures: Counter = Counter()
    for s in stats:
        total.update({k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        failures.update(s.get("failures", {}))
    return {**total, "failures": dict(failures), "budget_exhausted": any(s.get("budget_exhausted") for s in stats)}


class ProgressLine:
    """done/total, req/s, tokens/s, $ spent, failures by reason, ETA — for a bar or a log line."""

    def __init__(self, total: int, sink: Callable[[int, int, str], None]):
        self.total, self.sink, self.started = total, sink, time.monotonic()
        self.found = 0

    def __call__(self, worker: dict[str, Any]) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        sent_done = worker.get("jobs_done", 0) + worker.get("jobs_failed", 0)
        done = self.found + sent_done
        rate = sent_done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        tokens = worker.get("prompt_tokens", 0) + worker.get("completion_tokens", 0)
        failures = ", ".join(f"{k}={v}" for k, v in sorted(worker.get("failures", {}).items())) or "none"
        eta_text = f"ETA {eta:.0f}s" if eta != float("inf") else "ETA -"
        line = (f"{done}/{self.total} traces ({self.found} cached) | {worker.get('requests', 0) / elapsed:.1f} req/s | "
                f"{tokens / elapsed:.0f} tok/s | ${worker.get('cost_micro_usd', 0) / 1e6:.4f} | failures: {failures} | "
                f"{eta_text}")
        self.sink(done, self.total, line)


def fan_out(plan: FanoutPlan, cache: RequestCache, executor: Executor, sink: Callable[[int, int, str], None],
            retry_failed: bool = False, chunk_size: int = 2000, batch_size: int = 64) -> FanoutReport:
    """Send every job the cache cannot answer; returns what happened."""
    report = FanoutReport(plan.total)
    progress = ProgressLine(plan.total, sink)
    started = time.monotonic()

    def batches() -> Iterator[list[Progress]]:
        for chunk in chunked(plan.jobs(), chunk_size):
            resolved = resolve(chunk, plan.endpoints, cache, retry_failed)
            pending = [p for p in resolved if p.state == "pending"]
            report.found_in_cache += len(resolved) - len(pending)
            progress.found = report.found_in_cache
            report.sent_jobs += len(pending)
            yield from chunked(pending, batch_size)

    report.worker = executor.run(batches(), progress)
    progress(report.worker)
    report.seconds = time.monotonic() - started
    return report


def assemble(plan: FanoutPlan, cache: RequestCache, out: Path, chunk_size: int = 2000) -> dict[str, Any]:
    """Write the trace table (one row per job) from the cache; raise FanoutIncomplete if any job is pending."""
    counts: Counter = Counter()
    failures: Counter = Counter()
    cost = 0.0
    pending = 0
    with pq.ParquetWriter(out, TRACE_SCHEMA, compression="zstd") as writer:
        for chunk in chunked(plan.jobs(), chunk_size):
            rows = []
            for p in resolve(chunk, plan.endpoints, cache):
                if p.state == "pending":
                    pending += 1
                    continue
                row = trace_row(p, plan.endpoints[p.job.teacher_role])
                rows.append(row)
                counts[f"{row['stage']}/{row['teacher_role']}/{'ok' if row['status'] == 'ok' else 'failed'}"] += 1
                if row["status"] != "ok":
                    failures[row["status"].removeprefix("failed:")] += 1
                cost += row["cost_usd"]
            writer.write_table(pa.Table.from_pylist(rows, schema=TRACE_SCHEMA))
    if pending:
        raise FanoutIncomplete(f"{pending} of {plan.total} traces have no answer yet; rerun to continue "
                               "(answers already collected are kept in the request cache)")
    return {"traces": sum(counts.values()), "by_stage_role_status": dict(sorted(counts.items())),
            "failures": dict(sorted(failures.items())), "cost_usd": round(cost, 6)}


class LocalExecutor:
    """In-process asyncio workers (tests, the baseline of bench/fanout.py); Ray's executor mirrors it."""

    def __init__(self, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str], cache_folder: str,
                 max_cost_usd: float | None = None, workers: int = 1, concurrency: int = 64,
                 flush_rows: int = 64, flush_seconds: float = 2.0, report_every_s: float = 2.0):
        self.endpoints, self.base_urls, self.cache_folder = endpoints, base_urls, cache_folder
        self.max_cost_usd, self.workers, self.concurrency = max_cost_usd, workers, concurrency
        self.flush_rows, self.flush_seconds, self.report_every_s = flush_rows, flush_seconds, report_every_s

    def run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        return asyncio.run(self._run(batches, on_progress))

    async def _run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        gate = Gate(gate_limits(self.endpoints), self.max_cost_usd)
        workers = [TraceWorker(f"local{i}", self.endpoints, self.base_urls,
                               {role: RoleLimiter(gate, role) for role in self.endpoints}, self.cache_folder,
                               self.concurrency, self.flush_rows, self.flush_seconds) for i in range(self.workers)]
        running: set[asyncio.Task] = set()
        last_report = time.monotonic()
        try:
            for index, batch in enumerate(batches):
                while len(running) >= 2 * len(workers):
                    done, running = await asyncio.wait(running, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # a fatal teacher error stops the run here
                    if time.monotonic() - last_report >= self.report_every_s:
                        on_progress(merge_stats([w.stats() for w in workers]))
                        last_report = time.monotonic()
                if any(w.budget_exhausted for w in workers):
                    break
                running.add(asyncio.create_task(workers[index % len(workers)].run(batch)))
            if running:
                await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            stats = [await w.close() for w in workers]
        return merge_stats(stats)
