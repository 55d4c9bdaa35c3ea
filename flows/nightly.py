"""`nightly-eval`: score the newest checkpoints and fail loudly on a regression.

    orca nightly --recipe tiny [--checkpoint orca2=/exports/orca2 ...]

Served by `make serve` on a cron (02:00 UTC). Each checkpoint goes through the
same content-keyed evaluation as `orca eval` (weights already scored with the
same settings cost nothing), one history record per run lands in
`<store>/nightly/` (with the key of each result's per-example artifact), and a
(model, benchmark, system message) whose paired difference with its previous
nightly result, on the items both answered, has a 95 % CI below 0 ends the run
Failed, with a markdown artifact naming the checkpoint, the benchmark, the old
and the new score and the difference.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Failed

from orca_core.eval.findings import difference_cell
from orca_core.nightly import (history, newest_checkpoints, record, regression_markdown, regressions,
                               results_examples, write_history)
from orca_core.recipe import load_recipe
from orca_core.steps import checkpoint_eval_step
from tasks.step import call_step, prefect_step, store_for


def named_checkpoints(entries: list[str]) -> dict[str, Path]:
    """`name=path` (or a bare path, named by its folder) -> folder."""
    named = {}
    for entry in entries:
        name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        folder = Path(path).expanduser().resolve()
        named[name or folder.name] = folder
    return named


@flow(name="nightly-eval")
def nightly_eval(recipe: str = "tiny", overrides: list[str] | None = None, checkpoints: list[str] | None = None):
    """Evaluate the newest checkpoint of each stage in the store (or `checkpoints`), compare with the last night."""
    logger = get_run_logger()
    resolved = load_recipe(recipe, overrides or [])
    store = store_for(resolved)
    chosen = named_checkpoints(checkpoints) if checkpoints else newest_checkpoints(store)
    if not chosen:
        return Failed(message=f"no checkpoints to evaluate: none named and no train-* artifacts in {store.url()}")
    rows = []
    for model, folder in chosen.items():
        step = checkpoint_eval_step(folder, model)
        outcome = call_step(prefect_step(step), step, resolved)
        scored = store.local_dir(outcome.ref)
        summary = pq.read_table(scored / "summary.parquet").to_pandas()
        results = json.loads((scored / "results.json").read_text())["results"]
        rows += record(summary, model, str(folder), store.manifest(outcome.ref)["stats"]["checkpoint"], results)
        logger.info("%s (%s): %s", model, folder, outcome.state)
    earlier = history(store)
    path = write_history(store, rows, str(flow_run.id or "local"))
    create_table_artifact([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                          key="nightly-eval-results", description=f"nightly results (history: {path})")
    found, notes = regressions(rows, earlier, partial(results_examples, store),
                               samples=resolved.eval.bootstrap_samples, seed=resolved.seed)
    for note in notes:
        logger.warning(note)
    if found:
        create_markdown_artifact(regression_markdown(found), key="nightly-eval-regressions",
                                 description="paired differences with the previous night whose 95 % CI is below 0")
        named = "; ".join(f"{r.model}/{r.benchmark}/{r.system_message}: {100 * r.previous:.1f}% -> {100 * r.now:.1f}% "
                          f"(paired difference {difference_cell(r.difference, r.low, r.high)} pts)" for r in found)
        return Failed(message=f"{len(found)} regression(s): {named}")
    logger.info("no regressions against %d earlier nightly record(s); history %s", len(earlier), path)
    return rows
