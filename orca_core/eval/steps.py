"""The evaluation half of the DAG: `eval-<model>` per checkpoint, then `report`.

`eval-base` scores the stage-0 model and `eval-<stage>` each curriculum
stage's export, zero-shot and greedy, on the recipe's suite under each system
message. The step is cached like every other step (its key holds the
checkpoint step's key and the eval settings); underneath, each benchmark's
result is keyed by the checkpoint's content (`evaluate.py`), so a re-export
with new bytes is re-scored and a nightly eval of the same weights is not.
`report` gathers every eval step and the loss curves into the paper-style table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from orca_core.context import StepContext
from orca_core.eval import findings as F
from orca_core.eval.backends import GenerationSettings
from orca_core.eval.evaluate import (EXAMPLES_FILE, SUMMARY_FILE, SYSTEM_MESSAGES, checkpoint_digest,
                                     evaluate_checkpoint, plan_jobs, write_results)
from orca_core.eval.metrics import EXAMPLE_COLUMNS, suite_macro
from orca_core.eval.native import native_prompter, stage_data_of
from orca_core.eval.report import Section, table_rows, write_report
from orca_core.eval.specs import benchmark_specs, file_hashes, spec_fields
from orca_core.eval.strategy_usage import usage
from orca_core.recipe.load import recipe_hash
from orca_core.recipe.models import Recipe
from orca_core.store import ArtifactStore
from orca_core.traces import TRACES_FILE

EVAL_WORK = ".eval-work"
FINDINGS_FILE = "findings.json"


def models(recipe: Recipe) -> dict[str, str]:
    """Model name -> the step whose artifact is its checkpoint: base, then each stage."""
    every = {"base": "base-model", **{s.name: f"train-{s.name}" for s in recipe.curriculum.stages}}
    chosen = recipe.eval.models or list(every)
    return {name: every[name] for name in chosen}


def settings(recipe: Recipe) -> GenerationSettings:
    cfg = recipe.eval
    return GenerationSettings(backend=cfg.backend, max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype,
                              tensor_parallel_size=cfg.tensor_parallel_size, batch_size=cfg.batch_size)


def eval_upstream(model_step: str | None):
    """The checkpoint's step (None: a folder from outside the DAG), and `sources` for the held-out split."""
    def upstream(recipe: Recipe) -> tuple[str, ...]:
        procedural = any(s.name == "procedural-heldout" for s in benchmark_specs(recipe))
        return tuple(name for name in (model_step, "sources" if procedural else None) if name)
    return upstream


# Where and on how much the engines run (tasks/eval_ray.py): the same tokens anywhere, so in no key.
WHERE_IT_RUNS = {"engines", "use_gpu", "cpus_per_engine", "placement_timeout_s"}


def eval_reads(recipe: Recipe) -> dict[str, Any]:
    cfg = recipe.eval.model_dump(mode="json", exclude={"data_dir", "models", "batch_size", *WHERE_IT_RUNS})
    cfg["benchmarks"] = [spec_fields(spec) for spec in benchmark_specs(recipe)]
    return {"eval": cfg, "seed": recipe.seed}


def eval_inputs(recipe: Recipe) -> dict[str, Any]:
    return file_hashes(benchmark_specs(recipe), recipe)


def progress_reporter(ctx: StepContext, label: str):
    """(job, prompts done, prompts in job) -> a progress line with rate and ETA on the step's sink."""
    clock = {"since": time.monotonic()}  # a job's clock starts when the last one ended (or at the start)

    def progress(job: str, done: int, total: int) -> None:
        now = time.monotonic()
        rate = done / max(now - clock["since"], 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        ctx.sink(done, total, f"{label} {job}: {done}/{total} prompts, {rate:.1f} prompts/s, ETA {eta:.0f} s")
        if done >= total:
            clock["since"] = now

    return progress


def _checkpoint_digest(folder: Path) -> str:
    manifest = folder / "manifest.json"  # a store artifact: its files were verified against it on lookup
    return checkpoint_digest(folder, json.loads(manifest.read_text()) if manifest.exists() else None)


def _score(recipe: Recipe, checkpoint: Path, digest: str, sources: Path | None, ctx: StepContext, label: str,
           work_name: str, out: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """Every (benchmark, system message) of the recipe's suite on one checkpoint, written to `out`."""
    store = ArtifactStore(recipe.store.root, verify=recipe.store.verify)
    native = native_prompter(stage_data_of(checkpoint), recipe.prompts.generic_system_message)
    jobs = plan_jobs(benchmark_specs(recipe), list(recipe.eval.system_messages), sources_dir=sources,
                     limit=recipe.eval.limit, native=native)
    work = ctx.work_dir or store.work_folder(EVAL_WORK) / work_name
    results = evaluate_checkpoint(store, checkpoint, jobs, settings(recipe), work, digest=digest,
                                  bootstrap_samples=recipe.eval.bootstrap_samples, seed=recipe.seed,
                                  progress=progress_reporter(ctx, label), open_engine=ctx.generator)
    return write_results(store, results, out, digest, recipe.eval.bootstrap_samples, recipe.seed)


def build_eval_for(model_step: str):
    def build(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
        checkpoint = upstream[model_step]
        return _score(recipe, checkpoint, _checkpoint_digest(checkpoint), upstream.get("sources"), ctx,
                      label=model_step, work_name=model_step, out=out)
    return build


# -- report ---------------------------------------------------------------------------
def headline_table(summary: pd.DataFrame, names: list[str]) -> dict[str, Any]:
    """The paper-style table for manifests: rows, plus the column order (manifest JSON sorts keys)."""
    rows = table_rows(summary, names)
    return {"table": rows, "table_columns": list(rows[0]) if rows else []}


def ordered_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """A manifest's headline table with its columns back in report order."""
    columns = stats.get("table_columns") or []
    return [{c: row.get(c, "–") for c in columns} or row for row in stats.get("table", [])]

def _orca2_stage(recipe: Recipe) -> str | None:
    """The last stage trained on Orca 2 strategy traces: the student whose strategy choice is measured."""
    return next((s.name for s in reversed(recipe.curriculum.stages) if s.data == "orca2"), None)


def report_upstream(recipe: Recipe) -> tuple[str, ...]:
    names = models(recipe)
    traces = ("filtered-orca2",) if _orca2_stage(recipe) in names else ()
    return tuple(f"eval-{name}" for name in names) + tuple(s for s in names.values() if s.startswith("train-")) + traces


def generic_message_column(recipe: Recipe) -> str | None:
    """The eval column that gives the Orca 2 student only the generic system message of prompt erasing, if any.

    "native" does (an orca2 stage's native message is the generic one); so does the fixed message equal to it.
    """
    column = {text: name for name, text in SYSTEM_MESSAGES.items()}.get(recipe.prompts.generic_system_message)
    if column in recipe.eval.system_messages:
        return column
    return "native" if "native" in recipe.eval.system_messages else None


def findings(recipe: Recipe, summary: pd.DataFrame, examples: dict[str, pd.DataFrame], names: list[str],
             upstream: dict[str, Path], out: Path) -> tuple[list[Section], dict[str, Any]]:
    """The report's Findings sections (and findings.png), and their figures for the manifest.

    `examples`: each model's per-example results. Every model answered the same items, so each
    step is judged by the paired difference on them.
    """
    stages = [n for n in names if n != "base"]
    headline = recipe.eval.headline_system_message
    bootstrap = {"samples": recipe.eval.bootstrap_samples, "seed": recipe.seed}
    curricula = {m: F.curriculum(summary, examples, names, m, **bootstrap) for m in recipe.eval.system_messages}
    rows = F.curriculum(summary, examples, stages, headline, **bootstrap)  # without base: the ordering is the stages'
    n = rows[0]["n"] if rows else 0
    digest = recipe_hash(recipe)
    provenance = (f"Seed {recipe.seed}, recipe {recipe.name} (hash {digest[:12]}); "
                  f"{n} held-out examples per stage over {rows[0]['tasks'] if rows else 0} tasks, "
                  f"flexible extraction, {headline} system message; 95% CIs from "
                  f"{recipe.eval.bootstrap_samples} stratified bootstrap resamples, the differences paired "
                  "item by item (both models answered the same items).")
    sections = [Section(
        "Finding 1: each curriculum stage improves on the last",
        [F.verdict(rows), provenance],
        F.curriculum_table(curricula[headline]),
        "findings.png")]
    if len(curricula[headline]) > 1:
        sections.append(Section(
            "Finding 1 per task: difference with the previous model, pts [95% CI]",
            [f"Paired on the same items within each task, {headline} system message; "
             "a task's CI that excludes 0 is a step up (or down) on that task alone."],
            F.by_task_table(curricula[headline])))
    stats: dict[str, Any] = {"seed": recipe.seed, "recipe_hash": digest,
                             "headline_system_message": headline, "curriculum": rows,
                             "ordering_holds": F.ordering_holds(rows)}
    final, column = _orca2_stage(recipe), generic_message_column(recipe)
    control = _control_finding(recipe, examples, upstream, headline, bootstrap)
    stats["verdicts"] = [{"number": 1, "finding": "curriculum", "holds": F.ordering_holds(rows), "verdict": F.verdict(rows)}]
    if control is None:
        answers_only = all(s.data == "flan" for s in recipe.curriculum.stages)
        sections.append(Section(
            "Finding 2: explanations beat answers at the same token budget",
            [f"This recipe is an answers-only control: run the recipe it controls, then `orca compare <that recipe> "
             f"{recipe.name}`." if answers_only else
             "This recipe names no `control:` (an answers-only twin trained beside it, as tiny does): run one, "
             f"then `orca compare {recipe.name} <answers-only recipe>` gives the paired difference of their final "
             "stages with its 95% CI."]))
    else:
        stats["control"] = control
        stats["verdicts"].append({"number": 2, "finding": "explanations beat answers", "holds": control["holds"],
                                  "verdict": F.control_verdict(control)})
        sections.append(Section(
            "Finding 2: explanations beat answers at the same token budget",
            [F.control_verdict(control),
             f"{control['main']} against its control {control['control']}: the same recipe, seed, sources, "
             "tokenizer and step budgets, trained on the answers alone in every stage. Paired item by item on "
             f"the held-out set, each under the {headline} system message; per task family below, then the "
             "training each arm saw."],
            F.control_table(control)))
        sections.append(Section("Finding 2: the training each arm saw",
                                ["Non-pad tokens are the token budget; label tokens are the ones the loss is taken on."],
                                F.budget_table(control["budget"])))
    table = None
    if final in names and column is not None:
        examples = pq.read_table(upstream[f"eval-{final}"] / EXAMPLES_FILE,
                                 columns=["task", "system_message", "output"]).to_pandas()
        traces = pq.read_table(upstream["filtered-orca2"] / TRACES_FILE,
                               columns=["task_name", "strategy", "response", "verdict", "stage"]).to_pandas()
        traces = traces[(traces["verdict"] == "kept") & (traces["stage"] == "orca2")]
        table = usage(examples, traces)
        summary_row = F.strategy_summary(table, column)
        stats["strategy_usage"] = {"system_message": column, "model": final, **summary_row,
                                   "holds": F.strategy_holds(summary_row)}
        stats["verdicts"].append({"number": 3, "finding": "strategy per family", "holds": F.strategy_holds(summary_row),
                                  "verdict": F.strategy_verdict(summary_row, final, column)})
        sections.append(Section(
            "Finding 3: the student picks a strategy per task family",
            [F.strategy_verdict(summary_row, final, column),
             f"Stage {final}, given only the generic system message ({column}), answers "
             f"{100 * (summary_row['follows'] or 0):.1f}% of {summary_row['n']} held-out prompts in the shape of "
             f"the strategy its teacher was told to use for that family; its most used shape matches the "
             f"teacher's in {summary_row['families_following']} of {summary_row['families']} families, and it "
             f"uses {summary_row['student_strategies']} different strategies across them (the teacher: "
             f"{summary_row['teacher_strategies']}). Seed {recipe.seed}; the shape of an answer is read by "
             f"orca_core/eval/strategy_usage.py."],
            F.strategy_table(table, column)))
    F.plot(curricula, headline, None if table is None else table[table["system_message"] == column], column,
           out / "findings.png", control)
    return sections, stats


def _control_finding(recipe: Recipe, examples: dict[str, pd.DataFrame], upstream: dict[str, Path], headline: str,
                     bootstrap: dict[str, int]) -> dict[str, Any] | None:
    """Finding 2 from the control trained beside this recipe (`control:`), or None without one."""
    from orca_core.curriculum import CONTROL, control_of

    control = control_of(recipe)
    final = recipe.curriculum.stages[-1].name
    if control is None or f"{CONTROL}eval-{final}" not in upstream:
        return None
    def trained(prefix: str) -> dict[str, dict[str, int]]:
        return {s.name: F.tokens_trained(pd.read_parquet(upstream[f"{prefix}train-{s.name}"] / "metrics.parquet"))
                for s in recipe.curriculum.stages}
    theirs = pq.read_table(upstream[f"{CONTROL}eval-{final}"] / EXAMPLES_FILE, columns=F.PAIRED_COLUMNS).to_pandas()
    mine = examples[final] if final in examples else pq.read_table(
        upstream[f"eval-{final}"] / EXAMPLES_FILE, columns=F.PAIRED_COLUMNS).to_pandas()
    return F.explanations_vs_answers(mine, theirs, headline, F.token_budget(trained(""), trained(CONTROL)),
                                     names=(final, f"{control.name}/{final}"), **bootstrap)


def build_report(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
    names = list(models(recipe))
    summaries, examples = [], {}
    for name in names:
        summary = pq.read_table(upstream[f"eval-{name}"] / SUMMARY_FILE).to_pandas()
        examples[name] = pq.read_table(upstream[f"eval-{name}"] / EXAMPLES_FILE,
                                       columns=["id", *EXAMPLE_COLUMNS]).to_pandas()
        if examples[name]["benchmark"].nunique() > 1:  # the "average" column, and what findings judge
            summary = pd.concat([summary, suite_macro(examples[name], recipe.eval.bootstrap_samples, recipe.seed)],
                                ignore_index=True)
        summaries.append(summary.assign(model=name)[["model", *summary.columns]])
    summary = pd.concat(summaries, ignore_index=True)
    loss_curves = {name: upstream[step] / "metrics.parquet" for name, step in models(recipe).items()
                   if step.startswith("train-")}
    out.mkdir(parents=True, exist_ok=True)
    sections, found = findings(recipe, summary, examples, names, upstream, out)
    write_report(summary, out, models=names, loss_curves=loss_curves,
                 title=f"{recipe.name}: zero-shot evaluation of each curriculum stage",
                 notes={"recipe": f"{recipe.name} (hash {found['recipe_hash'][:12]})", "seed": recipe.seed,
                        "suite": recipe.eval.suite, "backend": recipe.eval.backend,
                        "max_new_tokens": recipe.eval.max_new_tokens},
                 sections=sections)
    summary.to_parquet(out / SUMMARY_FILE, index=False)
    (out / FINDINGS_FILE).write_text(json.dumps(found, indent=2, sort_keys=True))
    return {"rows": len(summary)}, {**headline_table(summary, names), "findings": found}


# -- one checkpoint folder from anywhere (nightly evals, `orca eval`) ---------------------
def build_checkpoint_eval(checkpoint: Path, name: str, digest: str):
    """Score a checkpoint folder outside the DAG (a nightly export, a hub model copied locally)."""

    def build(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
        rows, stats = _score(recipe, checkpoint, digest, upstream.get("sources"), ctx, label=name,
                             work_name=f"checkpoint-{digest[:16]}", out=out)
        summary = pq.read_table(out / SUMMARY_FILE).to_pandas()
        summary = summary.assign(model=name)[["model", *summary.columns]]
        curve = checkpoint / "metrics.parquet"
        write_report(summary, out, models=[name], loss_curves={name: curve} if curve.exists() else None,
                     title=f"{name}: zero-shot evaluation ({recipe.eval.suite})",
                     notes={"checkpoint": str(checkpoint), "content digest": digest[:16], "suite": recipe.eval.suite,
                            "backend": recipe.eval.backend, "max_new_tokens": recipe.eval.max_new_tokens})
        return rows, {**stats, "name": name, **headline_table(summary, [name])}
    return build
