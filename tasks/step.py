"""One uniform way to run an `orca_core` step as a Prefect task.

- Cache key = the step key (content address), so Prefect shows a hit as
  "Cached", in any flow run, across runs and machines sharing the store.
- Prefect's result records live inside the artifact store, next to the
  artifacts they point at.
- Before calling the task the flow verifies the artifact itself: if it is
  gone or corrupt, the task runs with `refresh_cache=True`, so a Prefect
  record can never hand out an artifact that no longer exists.
- Retries: exponential backoff with jitter, from the recipe's `prefect` section;
  never for an error no retry can fix (`NOT_RETRIED`: a refused key, an unknown
  model), which ends the run at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.filesystems import RemoteFileSystem
from prefect.states import State
from prefect.tasks import exponential_backoff

from orca_core.eval.steps import EVAL_WORK
from orca_core.context import StepContext
from orca_core.keys import sha256_text, step_key
from orca_core.recipe.models import Recipe
from orca_core.steps import FANOUT_STEPS, Step, components, has_failures, run_step, verified
from orca_core.store import ArtifactRef, ArtifactStore
from orca_core.teacher.client import FatalTeacherError
from tasks.progress import progress_sink

RESULTS_FOLDER = ".prefect-results"
NOT_RETRIED = (FatalTeacherError,)  # every retry would fail the same way (and a bad key would wait minutes)


def retry_unless_fatal(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect's retry condition for a failed step: retry, unless its error is one of NOT_RETRIED."""
    return not isinstance(state.data, NOT_RETRIED)


def store_for(recipe: Recipe) -> ArtifactStore:
    return ArtifactStore(recipe.store.root, verify=recipe.store.verify)


def result_storage_for(store: ArtifactStore) -> Path | RemoteFileSystem:
    """Prefect result storage inside the store: a folder, or a saved block for object stores."""
    if store.is_local:
        return Path(store.url(RESULTS_FOLDER))
    block = RemoteFileSystem(basepath=store.url(RESULTS_FOLDER))
    block.save(f"orca-results-{sha256_text(store.url())[:12]}", overwrite=True)  # Prefect needs it saved
    return block


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["key"]  # the step key alone: retry_failed is how to run, not what to make


def prefect_step(step: Step) -> Task:
    """A Prefect task that returns the step's ArtifactRef (building it only when needed)."""

    def run(recipe: dict[str, Any], key: str, retry_failed: bool = False) -> ArtifactRef:
        logger = get_run_logger()
        parsed = Recipe.model_validate(recipe)
        comps = components(step, parsed)
        if step_key(comps) != key:
            raise RuntimeError(f"step {step.name}: the key planned by the flow ({key[:12]}) differs from the task's")
        store = store_for(parsed)
        ctx = StepContext(sink=progress_sink(logger, step.name), retry_failed=retry_failed)
        if step.name in FANOUT_STEPS:
            from tasks.fanout import RayFanoutRunner  # Ray starts only for steps that need it

            ctx.fanout, ctx.request_cache = RayFanoutRunner(parsed), store.url("requests")  # a path or an s3:// URL
        if step.name.startswith("train-"):  # work folders are local: in the store, or beside it for a remote one
            from tasks.train import RayTrainer

            ctx.trainer, ctx.work_root = RayTrainer(parsed, ctx.sink), store.work_folder(".train-work")
        if step.name.startswith("eval-"):  # generations in flight survive a retry; the engines run on Ray
            from tasks.eval_ray import RayEngines

            ctx.work_root, ctx.generator = store.work_folder(EVAL_WORK), RayEngines(parsed)
        result = run_step(store, step, parsed, comps, ctx, force=retry_failed)
        how = "found verified in the store" if result.cached else "built and published"
        logger.info("%s/%s %s in %.1f s: rows %s -> %s", step.name, key[:12], how, result.seconds, result.rows, result.ref.url)
        return result.ref

    return task(
        run,
        name=step.name,
        task_run_name=f"{step.name}-{{key:.12}}",
        cache_key_fn=_cache_key,
        persist_result=True,
    )


@dataclass(frozen=True)
class StepOutcome:
    step: str
    key: str
    state: str  # Prefect state name: "Cached" or "Completed"
    ref: ArtifactRef
    rows: dict[str, int]
    seconds: float

    @property
    def cached(self) -> bool:
        return self.state == "Cached"


@dataclass(frozen=True)
class PreparedStep:
    """A step's task with this run's options and parameters, decided once its upstream steps are done."""
    step: Step
    key: str
    task: Task
    parameters: dict[str, Any]
    started: float  # perf_counter: the step's time includes verifying its artifact


def prepare_step(step_task: Task, step: Step, recipe: Recipe, retry_failed: bool = False) -> PreparedStep:
    """Verify the step's artifact and configure its task: retries from the recipe, results in the store.

    Only once the upstream steps are done: an upstream republished under its key makes this artifact stale
    (`verified` moves it aside), and then the task must refresh Prefect's cache record.
    `retry_failed`: a fan-out step whose artifact kept failure rows is rebuilt, re-sending only those.
    """
    started = time.perf_counter()
    comps = components(step, recipe)
    key = step_key(comps)
    store = store_for(recipe)
    ref = verified(store, step, comps)  # moves a corrupt or stale artifact aside (logged)
    retry = retry_failed and step.name in FANOUT_STEPS and ref is not None and has_failures(store, ref)
    configured = step_task.with_options(
        refresh_cache=ref is None or retry,
        retries=recipe.prefect.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=recipe.prefect.retry_delay_s)(max(recipe.prefect.retries, 1)),
        retry_jitter_factor=recipe.prefect.retry_jitter,
        retry_condition_fn=retry_unless_fatal,
        result_storage=result_storage_for(store),
    )
    parameters = {"recipe": recipe.model_dump(mode="json"), "key": key, "retry_failed": retry}
    return PreparedStep(step, key, configured, parameters, started)


def step_outcome(prepared: PreparedStep, state: State, recipe: Recipe) -> StepOutcome:
    """What the step's final state says; raises the step's error when it failed."""
    ref = state.result()
    rows = store_for(recipe).manifest(ref)["rows"]
    return StepOutcome(prepared.step.name, prepared.key, state.name, ref, rows, time.perf_counter() - prepared.started)


def call_step(step_task: Task, step: Step, recipe: Recipe, retry_failed: bool = False) -> StepOutcome:
    """Run one step inside a flow, in the flow's thread, and report what happened."""
    prepared = prepare_step(step_task, step, recipe, retry_failed)
    state = prepared.task(**prepared.parameters, return_state=True)
    return step_outcome(prepared, state, recipe)
