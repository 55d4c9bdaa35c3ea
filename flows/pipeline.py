"""The DAG as Prefect flows: the whole pipeline, and its three parts on their own.

    sources -> strategies -> traces (Orca 1, Orca 2) -> filters          orca-generate
            -> tokenizer -> base model -> (dataset -> train) per stage    orca-train
            -> eval-base, eval-<stage> -> report                          orca-evaluate

A recipe with a `control:` (tiny) also trains its answers-only control at the
same budgets, as the nodes `control/<step>` (only the steps whose keys differ
from the recipe's own), and the report calls "explanations beat answers" on
the two final stages.

    orca run --recipe tiny [--set sources.seed=1] [--retry-failed]

Steps run along the DAG: each starts once the steps it reads are done, at most
`prefect.max_concurrent_steps` at a time (`flows/steps.py`).

Parameters are JSON (a recipe name or path plus `--set` overrides), so the
dashboard can rerun any of them with changed values. The parts run the same
tasks with the same cache keys as the whole; a part whose upstream is not in
the store yet says which flow to run first.

`dry_run=True` runs no step: the flow publishes the plan (`orca plan`: hits,
misses, teacher requests and dollars, training steps, eval prompts) as a
markdown artifact and returns it, so a rerun from the dashboard can be checked
first. A run whose plan costs more than `teachers.max_cost_usd` ends Cancelled
before its first step, its message naming the budget (Cancelled, not Failed: a
Failed flow run is retried, and the plan would only refuse again). An error no
retry can fix (a refused key, an unknown model: `tasks.step.NOT_RETRIED`) fails
the run at once, without step or flow retries.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Cancelled, State

from flows.steps import run_steps
from orca_core.plan import make_plan, markdown
from orca_core.recipe import load_recipe, recipe_hash
from orca_core.recipe.models import Recipe
from orca_core.steps import DATA_STEPS, artifact_name, steps_for
from tasks.step import NOT_RETRIED


def _load(recipe: str, overrides: list[str] | None) -> Recipe:
    resolved = load_recipe(recipe, overrides or [])  # a bad recipe fails here, before any work
    get_run_logger().info("recipe %s (hash %s), store %s", resolved.name, recipe_hash(resolved)[:12], resolved.store.root)
    return resolved


def parts(recipe: Recipe) -> dict[str, list[str]]:
    """The step names of each part of the DAG, in run order."""
    names = list(steps_for(recipe))
    generate = [step.name for step in DATA_STEPS]
    evaluate = [n for n in names if artifact_name(n).startswith("eval-") or n == "report"]  # control/eval-* too
    return {"generate": generate, "train": [n for n in names if n not in generate and n not in evaluate],
            "evaluate": evaluate}


def budget_refusal(recipe: Recipe, names: list[str]) -> str | None:
    """Why a run of these steps must not start: its plan costs more than teachers.max_cost_usd (None: go ahead).

    No budget, no plan: the check costs nothing then. The fan-out's own budget check stays (it stops
    sending when the money is spent, whatever the plan estimated).
    """
    if recipe.teachers.max_cost_usd is None:
        return None
    plan = make_plan(recipe, names)
    return plan.budget_message() if plan.over_budget else None


def _run(recipe: Recipe, names: list[str], dry_run: bool, summary_key: str, retry_failed: bool = False
         ) -> list[dict] | dict[str, Any] | State:
    if dry_run:
        plan = make_plan(recipe, names)
        create_markdown_artifact(markdown(plan), key=f"{summary_key.removesuffix('-summary')}-plan",
                                 description="dry run: what this run would build, send and spend")
        get_run_logger().info("dry run: %d of %d steps would run, %d teacher requests, $%.2f",
                              sum(s.status == "miss" for s in plan.steps), len(plan.steps), plan.requests, plan.usd)
        return plan.to_json()
    refusal = budget_refusal(recipe, names)
    if refusal is not None:
        return Cancelled(message=refusal)
    try:
        return run_steps(recipe, names, retry_failed, summary_key=summary_key)
    except NOT_RETRIED:
        _no_flow_retries()  # its steps were not retried either (tasks.step.retry_unless_fatal)
        raise


def _no_flow_retries() -> None:
    """Make this flow run's failure final: Prefect's server retries a Failed run while it has retries left."""
    run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, empirical_policy=run.empirical_policy.model_copy(update={"retries": 0}))


@flow(name="orca-pipeline", retries=1, retry_delay_seconds=30)
def orca_pipeline(recipe: str = "tiny", overrides: list[str] | None = None, retry_failed: bool = False,
                  dry_run: bool = False) -> list[dict] | dict[str, Any]:
    """Run every step of the recipe; each is Cached when its key's artifact is in the store.

    retry_failed: re-send the teacher requests that ended as failure rows (and rebuild what depends on them).
    A flow retry (after a step's own retries) reruns only what did not finish: the rest is Cached.
    dry_run: run nothing; publish and return the plan.
    """
    resolved = _load(recipe, overrides)
    return _run(resolved, list(steps_for(resolved)), dry_run, "orca-pipeline-summary", retry_failed)


@flow(name="orca-generate", retries=1, retry_delay_seconds=30)
def orca_generate(recipe: str = "tiny", overrides: list[str] | None = None, retry_failed: bool = False,
                  dry_run: bool = False) -> list[dict] | dict[str, Any]:
    """Sources, teacher fan-out (Orca 1 + Orca 2 traces) and filters."""
    resolved = _load(recipe, overrides)
    return _run(resolved, parts(resolved)["generate"], dry_run, "orca-generate-summary", retry_failed)


@flow(name="orca-train", retries=1, retry_delay_seconds=30)
def orca_train(recipe: str = "tiny", overrides: list[str] | None = None, dry_run: bool = False) -> list[dict] | dict[str, Any]:
    """Tokenizer, base model and the curriculum stages (needs orca-generate's artifacts in the store)."""
    resolved = _load(recipe, overrides)
    return _run(resolved, parts(resolved)["train"], dry_run, "orca-train-summary")


@flow(name="orca-evaluate", retries=1, retry_delay_seconds=30)
def orca_evaluate(recipe: str = "tiny", overrides: list[str] | None = None, dry_run: bool = False) -> list[dict] | dict[str, Any]:
    """Score the base model and every stage, then the report (needs orca-train's checkpoints in the store)."""
    resolved = _load(recipe, overrides)
    return _run(resolved, parts(resolved)["evaluate"], dry_run, "orca-evaluate-summary")
