"""The fan-out driver: survey the cache, send only what it lacks, write the traces in job order.

1. `survey`: one pass over the jobs, resolved against the request cache chunk
   by chunk: how many jobs there are and how many the cache cannot answer, and
   the traces of the leading chunks it answers whole go straight into the
   trace table. A fully cached rerun ends here: one pass, no teacher started.
2. `fan_out`: the rest of the jobs stream to an executor (in-process
   `LocalExecutor` here, Ray actors in `tasks/fanout.py`; both run the loop of
   `dispatch.py`), whose workers write every call to the cache.
3. `assemble`: the rest of the trace table, a pure function of the jobs and
   the cache. A job still pending (budget spent, worker killed) makes the step
   incomplete: nothing is published, nothing is lost.

Memory stays flat in the number of prompts: jobs are generated lazily, only
one chunk is resolved at a time, and the table is written in row groups of
`ROW_GROUP_ROWS` (so its footer stays small) or of `ROW_GROUP_BYTES` of long answers.
"""

from __future__ import annotations

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
from orca_core.teacher.dispatch import LoopExecutor, Recheck, dispatch, merge_stats, window  # noqa: F401 (merge_stats: re-exported)
from orca_core.teacher.jobs import Progress, RecentIds, TraceJob, call_id, resolve, trace_row
from orca_core.teacher.gate import Gate, gate_limits
from orca_core.teacher.limiter import LeasedLimiter, gate_caller, price_per_token
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
    endpoints: dict[str, TeacherEndpoint]
    total: int | None = None  # jobs in the plan, when known (`survey` counts them)

    def count(self) -> int:
        return self.total if self.total is not None else sum(1 for _ in self.jobs())

    def after(self, done: int) -> FanoutPlan:
        """The plan without its first `done` jobs."""
        rest = None if self.total is None else self.total - done
        return FanoutPlan(lambda: itertools.islice(self.jobs(), done, None), self.endpoints, rest)


@dataclass
class FanoutReport:
    total: int
    found_in_cache: int = 0
    sent_jobs: int = 0
    shared_jobs: int = 0  # pending jobs whose request another job of this run sends: answered from the cache
    worker: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def budget_exhausted(self) -> bool:
        return bool(self.worker.get("budget_exhausted"))


class Executor(Protocol):
    def run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None],
            recheck: Recheck | None = None) -> dict[str, Any]: ...


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


CHUNK_JOBS = 2000  # jobs resolved against the cache at once: one index lookup per call depth
ROW_GROUP_ROWS = 16_384  # traces per row group: a footer of ~60 groups per 1M traces, ~16K rows buffered ...
ROW_GROUP_BYTES = 8 << 20  # ... or fewer, when long answers fill this much first (GPT-4's run to 16 KB each)


class TraceTable:
    """The trace table, one row per finished job in the order they are added, with its counts."""

    def __init__(self, out: Path):
        self.writer = pq.ParquetWriter(out, TRACE_SCHEMA, compression="zstd")
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.counts: Counter = Counter()
        self.failures: Counter = Counter()
        self.cost = 0.0

    def add(self, finished: list[Progress], endpoints: dict[str, TeacherEndpoint]) -> None:
        rows = [trace_row(p, endpoints[p.job.teacher_role]) for p in finished]
        for row in rows:
            self.counts[f"{row['stage']}/{row['teacher_role']}/{'ok' if row['status'] == 'ok' else 'failed'}"] += 1
            if row["status"] != "ok":
                self.failures[row["status"].removeprefix("failed:")] += 1
            self.cost += row["cost_usd"]
        # By columns: ~3x faster than from_pylist on rows of this many fields
        self.buffer.append(pa.Table.from_pydict({name: [r[name] for r in rows] for name in TRACE_SCHEMA.names},
                                                schema=TRACE_SCHEMA))
        self.buffered += len(rows)
        if self.buffered >= ROW_GROUP_ROWS:
            self._flush(whole_groups_only=True)
        elif sum(table.nbytes for table in self.buffer) >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self, whole_groups_only: bool = False) -> None:
        """Write the buffer in row groups of ROW_GROUP_ROWS (all of it at the end or when it holds ROW_GROUP_BYTES;
        else only whole groups)."""
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        cut = len(table) // ROW_GROUP_ROWS * ROW_GROUP_ROWS if whole_groups_only else len(table)
        if cut:
            self.writer.write_table(table.slice(0, cut), row_group_size=ROW_GROUP_ROWS)
        rest = table.slice(cut)
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict[str, Any]:
        self._flush()
        self.writer.close()
        return {"traces": sum(self.counts.values()), "by_stage_role_status": dict(sorted(self.counts.items())),
                "failures": dict(sorted(self.failures.items())), "cost_usd": round(self.cost, 6)}


@dataclass
class Survey:
    total: int = 0  # jobs in the plan
    pending: int = 0  # jobs with a call the cache cannot answer
    written: int = 0  # the plan's first jobs, whose traces are in the table already (whole chunks)


def survey(plan: FanoutPlan, cache: RequestCache, table: TraceTable, sink: Callable[[int, int, str], None],
           retry_failed: bool = False, report_every_s: float = 5.0) -> Survey:
    """Count the jobs and those the cache cannot answer; write the traces of the leading chunks it answers whole."""
    s = Survey()
    started = last = time.monotonic()
    for chunk in chunked(plan.jobs(), CHUNK_JOBS):
        resolved = resolve(chunk, plan.endpoints, cache, retry_failed)
        pending = sum(p.state == "pending" for p in resolved)
        if s.written == s.total and not pending:
            table.add(resolved, plan.endpoints)
            s.written += len(chunk)
        s.total += len(chunk)
        s.pending += pending
        if time.monotonic() - last >= report_every_s:
            last = time.monotonic()
            sink(s.total, 0, f"checking the request cache: {s.total} jobs, {s.total - s.pending} answered "
                             f"({s.total / (last - started):.0f} jobs/s)")
    return s


def fan_out(plan: FanoutPlan, cache: RequestCache, executor: Executor, sink: Callable[[int, int, str], None],
            retry_failed: bool = False, batch_size: int = 64) -> FanoutReport:
    """Send every job the cache cannot answer; returns what happened."""
    total = plan.count()
    report = FanoutReport(total)
    progress = ProgressLine(total, sink)
    started = time.monotonic()

    def batches() -> Iterator[list[Progress]]:
        sent = RecentIds()
        for chunk in chunked(plan.jobs(), CHUNK_JOBS):
            resolved = resolve(chunk, plan.endpoints, cache, retry_failed)
            pending = [p for p in resolved if p.state == "pending"]
            # Identical requests (one model in both roles, a prompt twice) are sent once: the same next call
            # means the same remaining calls, so the job that waits finds every answer in the cache.
            new = sent.fresh([call_id(p.job, plan.endpoints[p.job.teacher_role], p.previous) for p in pending])
            unique = [p for p, first in zip(pending, new) if first]
            report.found_in_cache += len(resolved) - len(pending)
            report.shared_jobs += len(pending) - len(unique)
            progress.found = report.found_in_cache + report.shared_jobs
            report.sent_jobs += len(unique)
            yield from chunked(unique, batch_size)

    def recheck(lost: list[Progress]) -> list[Progress]:
        again = resolve([p.job for p in lost], plan.endpoints, cache, retry_failed)
        return [p for p in again if p.state == "pending"]

    report.worker = executor.run(batches(), progress, recheck)
    progress(report.worker)
    report.seconds = time.monotonic() - started
    return report


def assemble(plan: FanoutPlan, cache: RequestCache, table: TraceTable) -> None:
    """Add every job's trace to the table from the cache; raise FanoutIncomplete if any job is pending."""
    pending = 0
    for chunk in chunked(plan.jobs(), CHUNK_JOBS):
        finished = [p for p in resolve(chunk, plan.endpoints, cache) if p.state != "pending"]
        pending += len(chunk) - len(finished)
        table.add(finished, plan.endpoints)
    if pending:
        raise FanoutIncomplete(f"{pending} traces have no answer yet; rerun to continue "
                               "(answers already collected are kept in the request cache)")


class LocalExecutor(LoopExecutor):
    """In-process asyncio workers (tests, a run without Ray, the baseline of the benches).

    The same workers, gate and loop as the Ray executor (`dispatch.window`: jobs per worker not yet durable).
    """

    def __init__(self, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str], cache_folder: str,
                 max_cost_usd: float | None = None, workers: int = 1, concurrency: int = 64,
                 flush_rows: int = 64, flush_seconds: float = 2.0, report_every_s: float = 2.0):
        self.endpoints, self.base_urls, self.cache_folder = endpoints, base_urls, cache_folder
        self.max_cost_usd, self.workers, self.concurrency = max_cost_usd, workers, concurrency
        self.flush_rows, self.flush_seconds, self.report_every_s = flush_rows, flush_seconds, report_every_s
        self.window = window(concurrency, flush_rows)
        self.gate_stats: dict[str, Any] = {}

    async def _run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None],
                   recheck: Recheck | None) -> dict[str, Any]:
        gate = Gate(gate_limits(self.endpoints), self.max_cost_usd)
        call = gate_caller(gate)
        workers = [TraceWorker(name, self.endpoints, self.base_urls,
                               {role: LeasedLimiter(call, role, name, price_per_token(e)) for role, e in self.endpoints.items()},
                               self.cache_folder, self.concurrency, self.flush_rows, self.flush_seconds)
                   for name in (f"local{i}" for i in range(self.workers))]
        try:
            return await dispatch(batches, workers, self.window, on_progress, self.report_every_s, recheck)
        finally:
            self.gate_stats = gate.stats()
