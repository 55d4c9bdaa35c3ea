"""Running a fan-out: the oracle server when a role uses it, then an executor.

`FanoutRunner` is what the trace steps need from the outside world for
online calls. The in-process `LocalFanoutRunner` lives here; `tasks/fanout.py`
has the Ray one. `run_fanout` sends the roles whose endpoint is `mode: batch`
through the Batch API (`batch.py`, no runner needed) and the others through
the runner. Each starts the built-in oracle (`python -m orca_oracle`, a
subprocess on a free 127.0.0.1 port) only when a role's endpoint is
`kind: oracle`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from orca_core.recipe.models import Recipe, TeacherEndpoint
from orca_core.teacher.batch import run_batch_fanout
from orca_core.teacher.fanout import FanoutPlan, FanoutReport, LocalExecutor, fan_out, merge_stats
from orca_core.traces import RequestCache

ORACLE_START_TIMEOUT_S = 60.0


class FanoutRunner(Protocol):
    def run(self, plan: FanoutPlan, cache: RequestCache, oracle_sources: list[Path],
            sink: Callable[[int, int, str], None], retry_failed: bool) -> FanoutReport: ...


@contextlib.contextmanager
def oracle_server(endpoints: dict[str, TeacherEndpoint], sources: list[Path]) -> Iterator[dict[str, str]]:
    """Base URL per role: the configured one, or a fresh oracle subprocess for `kind: oracle` roles."""
    urls = {role: e.base_url for role, e in endpoints.items() if e.kind != "oracle"}
    oracles = {role: e for role, e in endpoints.items() if e.kind == "oracle"}
    if not oracles:
        yield urls
        return
    with tempfile.TemporaryDirectory(prefix="orca-oracle-") as tmp:
        config = Path(tmp) / "oracle.json"
        ready = Path(tmp) / "ready.txt"
        config.write_text(json.dumps({
            "models": {e.model: (e.oracle.model_dump() if e.oracle else {}) for e in oracles.values()},
            "sources": [str(p) for p in sources],
            "api_key_env": next((e.api_key_env for e in oracles.values() if e.api_key_env), None),
        }))
        process = subprocess.Popen([sys.executable, "-m", "orca_oracle", str(config), str(ready)],
                                   stdout=subprocess.DEVNULL, env=os.environ.copy())
        try:
            deadline = time.monotonic() + ORACLE_START_TIMEOUT_S
            while not ready.exists() or not ready.read_text().strip():
                if process.poll() is not None:
                    raise RuntimeError(f"the oracle teacher exited with code {process.returncode} before it was ready")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the oracle teacher was not ready within {ORACLE_START_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
            base_url = ready.read_text().strip()
            yield {**urls, **{role: base_url for role in oracles}}
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


class LocalFanoutRunner:
    """In-process asyncio workers: tests, and a run with no Ray at hand."""

    def __init__(self, recipe: Recipe, workers: int = 1):
        self.recipe, self.workers = recipe, workers

    def run(self, plan: FanoutPlan, cache: RequestCache, oracle_sources: list[Path],
            sink: Callable[[int, int, str], None], retry_failed: bool) -> FanoutReport:
        with oracle_server(plan.endpoints, oracle_sources) as urls:
            executor = LocalExecutor(plan.endpoints, urls, str(cache.folder), self.recipe.teachers.max_cost_usd,
                                     workers=self.workers, concurrency=self.recipe.ray.actor_concurrency,
                                     flush_rows=self.recipe.ray.flush_rows, flush_seconds=self.recipe.ray.flush_seconds)
            return fan_out(plan, cache, executor, sink, retry_failed)


def split_by_mode(plan: FanoutPlan) -> dict[str, FanoutPlan]:
    """The plan's jobs by their role's `mode` ("online", "batch"): the plan itself when all roles share one."""
    roles: dict[str, list[str]] = {}
    for role, endpoint in plan.endpoints.items():
        roles.setdefault(endpoint.mode, []).append(role)
    if len(roles) == 1:
        return {next(iter(roles)): plan}
    parts = {}
    for mode, names in roles.items():
        jobs = lambda names=names: (j for j in plan.jobs() if j.teacher_role in names)  # noqa: E731
        parts[mode] = FanoutPlan(jobs, {r: plan.endpoints[r] for r in names})
    return parts


def run_fanout(plan: FanoutPlan, online: FanoutRunner | None, cache: RequestCache, oracle_sources: list[Path],
               sink: Callable[[int, int, str], None], retry_failed: bool,
               max_cost_usd: float | None = None) -> FanoutReport:
    """Batch-mode roles through the Batch API, the others through `online`; one report for both."""
    reports = []
    for mode, part in split_by_mode(plan).items():
        if mode == "batch":
            with oracle_server(part.endpoints, oracle_sources) as urls:
                reports.append(run_batch_fanout(part, cache, urls, sink, retry_failed, max_cost_usd))
        elif online is None:
            raise RuntimeError("this step sends online teacher requests: it needs a fan-out runner")
        else:
            reports.append(online.run(part, cache, oracle_sources, sink, retry_failed))
    if len(reports) == 1:
        return reports[0]
    return FanoutReport(plan.count(), found_in_cache=sum(r.found_in_cache for r in reports),
                        sent_jobs=sum(r.sent_jobs for r in reports), shared_jobs=sum(r.shared_jobs for r in reports),
                        worker=merge_stats([r.worker for r in reports]), seconds=sum(r.seconds for r in reports))
