"""The DAG as Prefect flows: the whole pipeline, and its three parts on their own.

    sources -> strategies -> traces (Orca 1, Orca 2) -> filters          orca-generate
            -> tokenizer -> base model -> (dataset -> train) per stage    orca-train
            -> eval-base, eval-<stage> -> report                          orca-evaluate

    orca run --recipe tiny [--set sources.seed=1] [--retry-failed]

Parameters are JSON (a recipe name or path plus `--set` overrides), so the
dashboard can rerun any of them with changed values. The parts run the same
tasks with the same cache keys as the whole; a part whose upstream is not in
the store yet says which flow to run first.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.steps import run_steps
from orca_core.recipe import load_recipe, recipe_hash
from orca_core.recipe.models import Recipe
from orca_core.steps import DATA_STEPS, steps_for


def _load(recipe: str, overrides: list[str] | None) -> Recipe:
    resolved = load_recipe(recipe, overrides or [])  # a bad recipe fails here, before any work
    get_run_logger().info("recipe %s (hash %s), store %s", resolved.name, recipe_hash(resolved)[:12], resolved.store.root)
    return resolved


def parts(recipe: Recipe) -> dict[str, list[str]]:
    """The step names of each part of the DAG, in run order."""
    names = list(steps_for(recipe))
    generate = [step.name for step in DATA_STEPS]
    evaluate = [n for n in names if n.startswith("eval-") or n == "report"]
    return {"generate": generate, "train": [n for n in names if n not in generate and n not in evaluate],
            "evaluate": evaluate}


@flow(name="orca-pipeline", retries=1, retry_delay_seconds=30)
def orca_pipeline(recipe: str = "tiny", overrides: list[str] | None = None, retry_failed: bool = False) -> list[dict]:
    """Run every step of the recipe; each is Cached when its key's artifact is in the store.

    retry_failed: re-send the teacher requests that ended as failure rows (and rebuild what depends on them).
    A flow retry (after a step's own retries) reruns only what did not finish: the rest is Cached.
    """
    resolved = _load(recipe, overrides)
    return run_steps(resolved, list(steps_for(resolved)), retry_failed)


@flow(name="orca-generate", retries=1, retry_delay_seconds=30)
def orca_generate(recipe: str = "tiny", overrides: list[str] | None = None, retry_failed: bool = False) -> list[dict]:
    """Sources, teacher fan-out (Orca 1 + Orca 2 traces) and filters."""
    resolved = _load(recipe, overrides)
    return run_steps(resolved, parts(resolved)["generate"], retry_failed, summary_key="orca-generate-summary")


@flow(name="orca-train", retries=1, retry_delay_seconds=30)
def orca_train(recipe: str = "tiny", overrides: list[str] | None = None) -> list[dict]:
    """Tokenizer, base model and the curriculum stages (needs orca-generate's artifacts in the store)."""
    resolved = _load(recipe, overrides)
    return run_steps(resolved, parts(resolved)["train"], summary_key="orca-train-summary")


@flow(name="orca-evaluate", retries=1, retry_delay_seconds=30)
def orca_evaluate(recipe: str = "tiny", overrides: list[str] | None = None) -> list[dict]:
    """Score the base model and every stage, then the report (needs orca-train's checkpoints in the store)."""
    resolved = _load(recipe, overrides)
    return run_steps(resolved, parts(resolved)["evaluate"], summary_key="orca-evaluate-summary")
