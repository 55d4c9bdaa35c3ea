"""The whole DAG as one flow:

    sources -> strategies -> traces (Orca 1, Orca 2) -> filters -> tokenizer -> base model
            -> for each curriculum stage: dataset -> train (from the previous stage's weights)
            -> eval-base, eval-<stage> (zero-shot, each system message) -> report

    orca run --recipe tiny [--set sources.seed=1] [--retry-failed]
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from orca_core.recipe import load_recipe, recipe_hash
from orca_core.steps import steps_for
from tasks.report import publish_report
from tasks.step import StepOutcome, call_step, prefect_step


@flow(name="orca-pipeline")
def orca_pipeline(recipe: str = "tiny", overrides: list[str] | None = None, retry_failed: bool = False) -> list[dict]:
    """Run every step of the recipe; each is Cached when its key's artifact is in the store.

    retry_failed: re-send the teacher requests that ended as failure rows (and rebuild what depends on them).
    """
    logger = get_run_logger()
    resolved = load_recipe(recipe, overrides or [])  # a bad recipe fails here, before any work
    logger.info("recipe %s (hash %s), store %s", resolved.name, recipe_hash(resolved)[:12], resolved.store.root)
    outcomes: list[StepOutcome] = [call_step(prefect_step(step), step, resolved, retry_failed)
                                   for step in steps_for(resolved).values()]
    lines = ["| step | state | key | rows | seconds | artifact |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        logger.info("%-15s %-9s %s rows=%s %.1fs %s", o.step, o.state, o.key[:12], o.rows, o.seconds, o.ref.url)
        lines.append(f"| {o.step} | {o.state} | `{o.key[:12]}` | {o.rows} | {o.seconds:.1f} | `{o.ref.url}` |")
    create_markdown_artifact("\n".join(lines), key="orca-pipeline-summary", description="steps of this run")
    report = next((o for o in outcomes if o.step == "report"), None)
    if report is not None:
        publish_report(resolved.store.root, report.ref)
        logger.info("report: %s/report.md (+ report.html, accuracy.png, loss.png)", report.ref.url)
    return [
        {"step": o.step, "state": o.state, "key": o.key, "rows": o.rows, "seconds": round(o.seconds, 2), "artifact": o.ref.url}
        for o in outcomes
    ]
