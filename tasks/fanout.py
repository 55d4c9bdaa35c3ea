"""The teacher fan-out on Ray: async worker actors spread over the nodes, one gate actor, the shared loop.

- `GateActor`: every endpoint's limits and the run's budget (`orca_core/teacher/
  gate.py`), on the driver's node, without a CPU. Workers lease permits from
  it in blocks, so it sees O(requests / block) calls, and limits hold across
  all actors and nodes.
- `WorkerActor`: one `TraceWorker` each (own aiohttp session, own concurrency,
  own request-cache shards), spread over the nodes (`SPREAD`, plus the custom
  resources that pin teacher callers: `fanout_actor_options`).
- The driver runs `dispatch` (the same loop as the in-process executor): each
  actor holds at most `actor_concurrency + 2 x flush_rows` jobs not yet durable,
  of which at most `actor_concurrency + flush_rows` answered (`dispatch.window`).
  An actor that dies (or its node) is replaced; its jobs are checked against
  the cache and sent again only where no answer was saved.
- Actors are owned by the driver (not detached): when the driver dies, Ray
  kills them and the gate, and a worker whose gate is gone stops sending.

`ray.address`: "local" starts a private runtime (never joins another cluster
on the machine), "auto" or ray://... a cluster.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orca_core.recipe.models import Recipe, TeacherEndpoint
from orca_core.teacher.dispatch import LoopExecutor, Recheck, WorkerLost, dispatch, window
from orca_core.teacher.fanout import FanoutPlan, FanoutReport, fan_out
from orca_core.teacher.jobs import Progress
from orca_core.teacher.gate import Gate, gate_limits
from orca_core.teacher.limiter import LeasedLimiter, gate_caller, price_per_token
from orca_core.teacher.runner import oracle_server
from orca_core.teacher.worker import TraceWorker
from orca_core.traces import RequestCache
from tasks.ray_runtime import ensure_ray, fanout_actor_options

log = logging.getLogger(__name__)
ORPHAN_AFTER_S = 30.0  # a worker that hears nothing from its driver this long stops sending


@ray.remote
class GateActor(Gate):
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote
class WorkerActor:
    def __init__(self, name: str, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str], gate,
                 cache_folder: str, concurrency: int, flush_rows: int, flush_seconds: float):
        call = gate_caller(gate, remote=True)
        limiters = {role: LeasedLimiter(call, role, name, price_per_token(e)) for role, e in endpoints.items()}
        self.worker = TraceWorker(name, endpoints, base_urls, limiters, cache_folder, concurrency, flush_rows,
                                  flush_seconds, orphan_after_s=ORPHAN_AFTER_S)

    async def start(self) -> str:
        await self.worker.start()
        return ray.get_runtime_context().get_node_id()

    async def submit(self, jobs: list[tuple[int, Progress]]) -> None:
        await self.worker.submit(jobs)

    async def durable(self, timeout: float) -> dict[str, Any]:
        return await self.worker.durable(timeout)

    async def close(self) -> dict[str, Any]:
        return await self.worker.close()


class ActorWorker:
    """The loop's handle on a WorkerActor: a dead actor raises WorkerLost, a worker's own error raises as itself."""

    def __init__(self, name: str, actor, nodes: dict[str, str]):
        self.name, self.actor, self.nodes = name, actor, nodes

    async def _call(self, ref):
        try:
            return await ref
        except ray.exceptions.RayTaskError as err:  # raised inside the actor: a fatal teacher error, say
            raise err.cause if isinstance(err.cause, Exception) else err from None
        except ray.exceptions.RayActorError as err:
            raise WorkerLost(f"{self.name}: {type(err).__name__}") from err

    async def start(self) -> None:
        self.nodes[self.name] = await self._call(self.actor.start.remote())

    async def submit(self, jobs: list[tuple[int, Progress]]) -> None:
        await self._call(self.actor.submit.remote(jobs))

    async def durable(self, timeout: float) -> dict[str, Any]:
        return await self._call(self.actor.durable.remote(timeout))

    async def close(self) -> dict[str, Any]:
        return await self._call(self.actor.close.remote())


class RayExecutor(LoopExecutor):
    def __init__(self, recipe: Recipe, endpoints: dict[str, TeacherEndpoint], base_urls: dict[str, str],
                 cache_folder: str, report_every_s: float = 2.0):
        self.recipe, self.endpoints, self.base_urls, self.cache_folder = recipe, endpoints, base_urls, cache_folder
        self.report_every_s = report_every_s
        self.window = window(recipe.ray.actor_concurrency, recipe.ray.flush_rows)  # jobs per actor not yet durable
        self.nodes: dict[str, str] = {}  # actor name -> the node it runs on (every actor started in the run)
        self.gate_stats: dict[str, Any] = {}

    async def _run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None],
                   recheck: Recheck | None) -> dict[str, Any]:
        cfg = self.recipe.ray
        # The gate lives (and dies) with the driver: on its node, without a CPU. Not `soft`: Ray would then
        # prefer a node with CPUs, and a lost worker node would take every lease with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        gate = GateActor.options(num_cpus=0, scheduling_strategy=here).remote(
            gate_limits(self.endpoints), self.recipe.teachers.max_cost_usd)
        gate_node = gate.node_id.remote()  # not awaited here: the workers start meanwhile
        actors: list[ActorWorker] = []

        def spawn(name: str) -> ActorWorker:
            options = {**fanout_actor_options(self.recipe), "scheduling_strategy": "SPREAD"}
            actor = WorkerActor.options(**options).remote(name, self.endpoints, self.base_urls, gate, self.cache_folder,
                                                          cfg.actor_concurrency, cfg.flush_rows, cfg.flush_seconds)
            actors.append(ActorWorker(name, actor, self.nodes))
            return actors[-1]

        async def replace(lost: ActorWorker) -> ActorWorker | None:
            ray.kill(lost.actor)  # merely unreachable? then it must not send its (re-queued) jobs too
            with contextlib.suppress(ray.exceptions.RayError):
                await gate.leave.remote(lost.name)  # its concurrency shares go to the others
            if len(actors) >= 2 * cfg.fanout_actors:
                return None  # actors keep dying: carry on with those left
            return spawn(f"actor{len(actors)}")

        workers = [spawn(f"actor{i}") for i in range(cfg.fanout_actors)]
        try:
            return await dispatch(batches, workers, self.window, on_progress, self.report_every_s, recheck, replace)
        finally:
            with contextlib.suppress(ray.exceptions.RayError):
                self.nodes["gate"] = await gate_node
                self.gate_stats = await gate.stats.remote()
            for a in actors:
                ray.kill(a.actor)
            ray.kill(gate)


class RayFanoutRunner:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.executor: RayExecutor | None = None  # the last run's (its nodes and gate counters) ...
        self.report: FanoutReport | None = None  # ... and what it did

    def run(self, plan: FanoutPlan, cache: RequestCache, oracle_sources: list[Path],
            sink: Callable[[int, int, str], None], retry_failed: bool) -> FanoutReport:
        ensure_ray(self.recipe)
        with oracle_server(plan.endpoints, oracle_sources) as urls:
            self.executor = RayExecutor(self.recipe, plan.endpoints, urls, str(cache.folder))
            self.report = fan_out(plan, cache, self.executor, sink, retry_failed)
            return self.report
