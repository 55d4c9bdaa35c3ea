"""The teacher fan-out on Ray: a pool of async actors sharing one limiter actor.

- `GateActor`: every endpoint's RateLimiter and the run's budget, in one async
  actor, so requests/min, tokens/min, concurrency and Retry-After pauses hold
  across all actors (and machines).
- `WorkerActor`: one `TraceWorker` each (own aiohttp session, own concurrency,
  own request-cache shards, flushed every N rows / T seconds).
- The driver keeps at most two batches in flight per actor, polls the actors'
  counters for progress, and on any error flushes the actors before raising.

`ray.init(address=recipe.ray.address)`: "local" starts a private runtime
(never joins another cluster on the machine), "auto" or ray://... a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray

from orca_core.recipe.models import Recipe, TeacherEndpoint
from orca_core.teacher.client import FatalTeacherError
from orca_core.teacher.fanout import FanoutPlan, FanoutReport, fan_out, merge_stats
from orca_core.teacher.jobs import Progress
from orca_core.teacher.limiter import Gate, RoleLimiter, gate_limits
from orca_core.teacher.runner import oracle_server
from orca_core.teacher.worker import TraceWorker
from orca_core.traces import RequestCache
from tasks.ray_runtime import ensure_ray


@ray.remote
class GateActor(Gate):
    pass


@ray.remote
class WorkerActor:
    def __init__(self, name: str, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str], gate,
                 cache_folder: str, concurrency: int, flush_rows: int, flush_seconds: float):
        limiters = {role: RoleLimiter(gate, role, remote=True) for role in endpoints}
        self.worker = TraceWorker(name, endpoints, base_urls, limiters, cache_folder, concurrency, flush_rows, flush_seconds)

    async def run(self, batch: list[Progress]) -> dict[str, Any]:
        return await self.worker.run(batch)

    async def stats(self) -> dict[str, Any]:
        return self.worker.stats()

    async def close(self) -> dict[str, Any]:
        return await self.worker.close()


class RayExecutor:
    def __init__(self, recipe: Recipe, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str],
                 cache_folder: str, report_every_s: float = 2.0):
        self.recipe, self.endpoints, self.base_urls, self.cache_folder = recipe, endpoints, base_urls, cache_folder
        self.report_every_s = report_every_s

    def run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        cfg = self.recipe.ray
        gate = GateActor.options(num_cpus=cfg.actor_cpus).remote(gate_limits(self.endpoints), self.recipe.teachers.max_cost_usd)
        actors = [WorkerActor.options(num_cpus=cfg.actor_cpus).remote(
            f"actor{i}", self.endpoints, self.base_urls, gate, self.cache_folder, cfg.actor_concurrency,
            cfg.flush_rows, cfg.flush_seconds) for i in range(cfg.fanout_actors)]
        in_flight: dict[ray.ObjectRef, int] = {}
        load = [0] * len(actors)
        latest: list[dict[str, Any]] = [{} for _ in actors]
        last_report = time.monotonic()

        def settle(timeout: float) -> None:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
            for ref in done:
                index = in_flight.pop(ref)
                load[index] -= 1
                latest[index] = ray.get(ref)  # raises the actor's error (e.g. FatalTeacherError)

        try:
            for batch in batches:
                while sum(load) >= 2 * len(actors):
                    settle(timeout=1.0)
                    if time.monotonic() - last_report >= self.report_every_s:
                        latest = ray.get([a.stats.remote() for a in actors])
                        on_progress(merge_stats(latest))
                        last_report = time.monotonic()
                if any(s.get("budget_exhausted") for s in latest):
                    break
                index = load.index(min(load))
                in_flight[actors[index].run.remote(batch)] = index
                load[index] += 1
            while in_flight:
                settle(timeout=1.0)
        except ray.exceptions.RayTaskError as err:
            cause = err.as_instanceof_cause()
            raise (cause if isinstance(cause, FatalTeacherError) else err) from None
        finally:
            final = ray.get([a.close.remote() for a in actors])  # flush every buffered row
            for actor in [*actors, gate]:
                ray.kill(actor)
        return merge_stats(final)


class RayFanoutRunner:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def run(self, plan: FanoutPlan, cache: RequestCache, oracle_sources: list[Path],
            sink: Callable[[int, int, str], None], retry_failed: bool) -> FanoutReport:
        ensure_ray(self.recipe)
        with oracle_server(plan.endpoints, oracle_sources) as urls:
            return fan_out(plan, cache, RayExecutor(self.recipe, plan.endpoints, urls, str(cache.folder)), sink, retry_failed)
