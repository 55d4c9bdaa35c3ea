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

from orca_core.curriculum import folder_hashes
from orca_core.eval.backends import GenerationSettings
from orca_core.eval.benchmarks import BenchmarkSpec, load_benchmark, suite_specs
from orca_core.eval.evaluate import SUMMARY_FILE, checkpoint_digest, evaluate_checkpoint, plan_jobs, write_results
from orca_core.eval.report import table_rows, write_report
from orca_core.generate import StepContext
from orca_core.keys import file_sha256
from orca_core.recipe.models import Recipe
from orca_core.store import ArtifactStore

EVAL_WORK = ".eval-work"


def models(recipe: Recipe) -> dict[str, str]:
    """Model name -> the step whose artifact is its checkpoint: base, then each stage."""
    every = {"base": "base-model", **{s.name: f"train-{s.name}" for s in recipe.curriculum.stages}}
    chosen = recipe.eval.models or list(every)
    return {name: every[name] for name in chosen}


def benchmark_specs(recipe: Recipe) -> list[BenchmarkSpec]:
    if recipe.eval.suite == "custom":
        return list(recipe.eval.benchmarks)
    return suite_specs(recipe.eval.suite, Path(recipe.eval.data_dir).expanduser())


def settings(recipe: Recipe) -> GenerationSettings:
    cfg = recipe.eval
    return GenerationSettings(backend=cfg.backend, max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype,
                              tensor_parallel_size=cfg.tensor_parallel_size, batch_size=cfg.batch_size)


# -- decontamination: the filter steps read the eval benchmarks ---------------------------
def contamination_specs(recipe: Recipe) -> list[BenchmarkSpec]:
    """The recipe's real eval benchmarks, whole (the held-out split is checked by equality already)."""
    if recipe.filters.contamination_ngram is None:
        return []
    return [spec.model_copy(update={"limit": None, "tasks": None}) for spec in benchmark_specs(recipe)
            if spec.name != "procedural-heldout"]


def contamination_reads(recipe: Recipe) -> dict[str, Any]:
    specs = contamination_specs(recipe)
    return {"decontaminate_against": [_spec_fields(s) for s in specs]} if specs else {}


def contamination_inputs(recipe: Recipe) -> dict[str, Any]:
    return _file_hashes(contamination_specs(recipe), recipe)


def contamination_texts(recipe: Recipe) -> list[str]:
    """Every prompt of the real eval benchmarks: training traces that overlap them are dropped."""
    return [example.prompt for spec in contamination_specs(recipe) for example in load_benchmark(spec)]


def eval_upstream(model_step: str | None):
    """The checkpoint's step (None: a folder from outside the DAG), and `sources` for the held-out split."""
    def upstream(recipe: Recipe) -> tuple[str, ...]:
        procedural = any(s.name == "procedural-heldout" for s in benchmark_specs(recipe))
        return tuple(name for name in (model_step, "sources" if procedural else None) if name)
    return upstream


def _spec_fields(spec: BenchmarkSpec) -> dict[str, Any]:
    fields = spec.model_dump(mode="json")
    if fields.get("path"):
        fields["path"] = "<local data>"  # its files' hashes are the input
    return fields


def eval_reads(recipe: Recipe) -> dict[str, Any]:
    cfg = recipe.eval.model_dump(mode="json", exclude={"data_dir", "models", "batch_size"})
    cfg["benchmarks"] = [_spec_fields(spec) for spec in benchmark_specs(recipe)]
    return {"eval": cfg, "seed": recipe.seed}


def _file_hashes(specs: list[BenchmarkSpec], recipe: Recipe) -> dict[str, Any]:
    """Content hashes of local benchmark files (never their paths)."""
    hashes = {}
    for spec in specs:
        if spec.path:
            path = Path(spec.path).expanduser()
            if path.is_file():
                hashes[spec.name] = {path.name: file_sha256(path)}
            elif path.is_dir():
                hashes[spec.name] = folder_hashes(str(path))
            else:
                raise FileNotFoundError(f"eval benchmark {spec.name}: {path} does not exist"
                                        + (" (run `make bench-data`)" if recipe.eval.suite == "real-offline" else ""))
    return {"benchmark_files": hashes} if hashes else {}


def eval_inputs(recipe: Recipe) -> dict[str, Any]:
    return _file_hashes(benchmark_specs(recipe), recipe)


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
    jobs = plan_jobs(benchmark_specs(recipe), list(recipe.eval.system_messages), sources_dir=sources,
                     limit=recipe.eval.limit)
    work = ctx.work_dir or Path(store.url(EVAL_WORK)) / work_name
    results = evaluate_checkpoint(store, checkpoint, jobs, settings(recipe), work, digest=digest,
                                  bootstrap_samples=recipe.eval.bootstrap_samples, seed=recipe.seed,
                                  progress=progress_reporter(ctx, label))
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

def report_upstream(recipe: Recipe) -> tuple[str, ...]:
    names = models(recipe)
    return tuple(f"eval-{name}" for name in names) + tuple(s for s in names.values() if s.startswith("train-"))


def build_report(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
    names = list(models(recipe))
    summaries = []
    for name in names:
        summary = pq.read_table(upstream[f"eval-{name}"] / SUMMARY_FILE).to_pandas()
        summaries.append(summary.assign(model=name)[["model", *summary.columns]])
    summary = pd.concat(summaries, ignore_index=True)
    loss_curves = {name: upstream[step] / "metrics.parquet" for name, step in models(recipe).items()
                   if step.startswith("train-")}
    write_report(summary, out, models=names, loss_curves=loss_curves,
                 title=f"{recipe.name}: zero-shot evaluation of each curriculum stage",
                 notes={"suite": recipe.eval.suite, "backend": recipe.eval.backend,
                        "max_new_tokens": recipe.eval.max_new_tokens})
    summary.to_parquet(out / SUMMARY_FILE, index=False)
    return {"rows": len(summary)}, headline_table(summary, names)


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
