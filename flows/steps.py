"""Run a list of the recipe's steps as Prefect tasks and say, per step, what happened and why.

Every flow (the whole pipeline, or one part of it) goes through `run_steps`,
so a step is the same task with the same cache key whichever flow runs it.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from orca_core.plan import reason
from orca_core.recipe.models import Recipe
from orca_core.steps import explain, steps_for
from tasks.report import publish_report
from tasks.step import call_step, prefect_step, store_for


def why(recipe: Recipe, step_name: str) -> str:
    """Why the step will hit or miss, in a few words (what `orca explain` says in full)."""
    return reason(explain(store_for(recipe), steps_for(recipe)[step_name], recipe))


def run_steps(recipe: Recipe, names: list[str], retry_failed: bool = False, summary_key: str = "orca-pipeline-summary") -> list[dict[str, Any]]:
    """Run the named steps in order; returns one JSON-able row per step (state, key, rows, seconds, why, artifact)."""
    logger = get_run_logger()
    known = steps_for(recipe)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; this recipe's steps: {list(known)}")
    rows = []
    for name in names:
        reason = why(recipe, name)
        outcome = call_step(prefect_step(known[name]), known[name], recipe, retry_failed)
        rows.append({"step": name, "state": outcome.state, "key": outcome.key, "rows": outcome.rows,
                     "seconds": round(outcome.seconds, 2), "why": reason, "artifact": outcome.ref.url})
        logger.info("%-15s %-9s %s %.1fs (%s)", name, outcome.state, outcome.key[:12], outcome.seconds, reason)
    lines = ["| step | state | why | key | rows | seconds | artifact |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['state']} | {r['why']} | `{r['key'][:12]}` | {r['rows']} | {r['seconds']:.1f} | "
              f"`{r['artifact']}` |" for r in rows]
    create_markdown_artifact("\n".join(lines), key=summary_key, description="steps of this run: state and why")
    report = next((r for r in rows if r["step"] == "report"), None)
    if report is not None:
        ref = store_for(recipe).ref("report", report["key"])
        publish_report(recipe.store.root, ref)
        logger.info("report: %s/report.md (+ report.html, accuracy.png, loss.png)", ref.url)
    return rows
