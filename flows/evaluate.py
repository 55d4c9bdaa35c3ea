"""Score one checkpoint folder (any path: a nightly export, a copied hub model) on a recipe's eval suite.

    orca eval CHECKPOINT --recipe tiny --set eval.suite=real-offline [--name nightly]

Results are keyed by the checkpoint's content, so the same weights are never
scored twice with the same settings, whatever path they sit at, and a killed
evaluation resumes per benchmark. The report lands in the store under
`eval-checkpoint/<key>/` and as Prefect artifacts.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from orca_core.eval.steps import ordered_table
from orca_core.recipe import load_recipe
from orca_core.steps import checkpoint_eval_step
from orca_core.store import ArtifactStore
from tasks.report import publish_report
from tasks.step import call_step, prefect_step


@flow(name="orca-evaluate-checkpoint")
def orca_evaluate_checkpoint(checkpoint: str, recipe: str = "tiny", overrides: list[str] | None = None,
                  name: str | None = None) -> dict:
    """Evaluate CHECKPOINT zero-shot on the recipe's suite; returns the headline table and the report's folder."""
    logger = get_run_logger()
    resolved = load_recipe(recipe, overrides or [])
    folder = Path(checkpoint).expanduser().resolve()
    step = checkpoint_eval_step(folder, name or folder.name)
    outcome = call_step(prefect_step(step), step, resolved)
    publish_report(resolved.store.root, outcome.ref, key_prefix="orca-checkpoint-eval")
    logger.info("%s %s: report %s/report.md", step.name, outcome.state, outcome.ref.url)
    stats = ArtifactStore(resolved.store.root).manifest(outcome.ref)["stats"]
    return {"state": outcome.state, "key": outcome.key, "artifact": outcome.ref.url, "table": ordered_table(stats),
            "generated": stats["generated"], "reused": stats["reused"]}
