"""Score one checkpoint on a suite: content-keyed results, resumed per benchmark.

Every (checkpoint, benchmark, system message) result is its own artifact in
the store, under `eval-results/<key>/` (per-example Parquet + a summary). Its
key holds the checkpoint's CONTENT digest (weights, config, tokenizer, chat
template: never its path, so two checkpoints at one path never share results,
and one checkpoint reached by two paths does), the digest of the examples
scored, the system message text, the backend with its version, and the
sampling settings. A rerun finds finished benchmarks in the store and
generates only the rest; generations in flight are kept in a work folder, so
a killed evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orca_core.eval.backends import GenerationSettings, OpenEngine, backend_version, chat_prompts, generate_jobs
from orca_core.eval.benchmarks import BenchmarkSpec, Example, examples_digest, load_benchmark
from orca_core.eval.metrics import summarize
from orca_core.eval.score import score
from orca_core.code_digest import code_components
from orca_core.keys import canonical_json, file_sha256, key_components, sha256_text, step_key
from orca_core.prompts import student_chat
from orca_core.recipe.models import ORCA2_CAUTIOUS_SYSTEM_MESSAGE
from orca_core.store import ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)

RESULTS_STEP = "eval-results"
RESULTS_VERSION = 1  # bump for what the code digest cannot see (a library's behaviour)
# Generation (this module's backends and the vLLM child) and scoring: their code is in every result's key.
RESULTS_CODE = ("orca_core.eval.evaluate", "orca_core.eval.vllm_generate")
EXAMPLES_FILE = "examples.parquet"
SUMMARY_FILE = "summary.parquet"
SYSTEM_MESSAGES = {"empty": "", "cautious": ORCA2_CAUTIOUS_SYSTEM_MESSAGE}
# Files of a checkpoint folder that do not change what it generates.
NOT_MODEL = ("training_state/", "metrics.parquet", "loss_curve.png", "recipe.json", "key.json", "manifest.json",
             "README.md", ".")
WEIGHTS = (".safetensors", ".bin")

EXAMPLE_SCHEMA = pa.schema([
    ("benchmark", pa.string()), ("task", pa.string()), ("id", pa.string()), ("system_message", pa.string()),
    ("prompt", pa.string()), ("output", pa.string()), ("strict", pa.string()), ("flexible", pa.string()),
    ("gold", pa.string()), ("correct_strict", pa.bool_()), ("correct_flexible", pa.bool_()),
    ("format_ok", pa.bool_()), ("finish_reason", pa.string()), ("output_tokens", pa.int64()),
])


def _is_model_file(name: str) -> bool:
    return not name.startswith(NOT_MODEL)


def checkpoint_digest(folder: Path, manifest: dict[str, Any] | None = None) -> str:
    """sha256 of the files that decide what a checkpoint generates.

    A store artifact's manifest already lists its files' sha256, so they are not read again.
    """
    if manifest is not None:
        files = {name: info["sha256"] for name, info in manifest["files"].items() if _is_model_file(name)}
    else:
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint {folder}: no such folder")
        files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
                 if p.is_file() and _is_model_file(p.relative_to(folder).as_posix())}
    if not any(name.endswith(WEIGHTS) for name in files):
        raise FileNotFoundError(f"checkpoint {folder}: no model weights (*.safetensors / *.bin) in it")
    return sha256_text(canonical_json(files))


@dataclass(frozen=True)
class Job:
    """One benchmark under one system message: one result artifact."""

    benchmark: str
    system_message: str  # "empty" | "cautious" | "native"
    examples: tuple[Example, ...]
    systems: tuple[str, ...] = ()  # "native": each example's system message text

    @property
    def name(self) -> str:
        return f"{self.benchmark}.{self.system_message}"

    def system_texts(self) -> list[str]:
        return list(self.systems) if self.systems else [SYSTEM_MESSAGES[self.system_message]] * len(self.examples)


def job_prompts(checkpoint: Path, job: Job) -> list[list[int]]:
    """The token ids each example prompts the checkpoint with: its training examples' prompt, system turn and all."""
    conversations = [student_chat(system, example.prompt) for system, example in zip(job.system_texts(), job.examples)]
    return chat_prompts(checkpoint, conversations)


def plan_jobs(specs: list[BenchmarkSpec], system_messages: list[str], sources_dir: Path | None = None,
              limit: int | None = None, native: Callable[[Example], str] | None = None) -> list[Job]:
    """Load each benchmark once and pair it with each system message.

    "native" prompts each example the way the checkpoint's last stage was trained (`native(example)`,
    see orca_core/eval/native.py); it needs `native`.
    """
    if "native" in system_messages and native is None:
        raise ValueError("system message 'native' needs to know how the checkpoint was trained (native=...)")
    jobs = []
    for spec in specs:
        if limit is not None and spec.limit is None:
            spec = spec.model_copy(update={"limit": limit})
        examples = tuple(load_benchmark(spec, sources_dir))
        if not examples:
            raise ValueError(f"benchmark {spec.name}: no examples were loaded (check its path, split and tasks)")
        jobs += [Job(spec.name, message, examples, tuple(map(native, examples)) if message == "native" else ())
                 for message in system_messages]
    return jobs


def result_components(digest: str, job: Job, settings: GenerationSettings) -> dict[str, Any]:
    generation = {k: v for k, v in asdict(settings).items() if k != "batch_size"}  # batching does not change greedy tokens
    config = {
        "checkpoint": digest,
        "benchmark": job.benchmark,
        "examples": examples_digest(list(job.examples)),
        "n": len(job.examples),
        "system_message": {"name": job.system_message, "sha256": (
            sha256_text(canonical_json(list(job.systems))) if job.systems else sha256_text(SYSTEM_MESSAGES[job.system_message]))},
        "generation": {**generation, "backend_version": backend_version(settings), "decoding": "greedy"},
    }
    return key_components(RESULTS_STEP, RESULTS_VERSION, config, code=code_components(RESULTS_CODE))


def score_job(job: Job, generations: list[Any]) -> pa.Table:
    rows = []
    for example, generation in zip(job.examples, generations, strict=True):
        scored = score(example, generation.text)
        rows.append({
            "benchmark": example.benchmark, "task": example.task, "id": example.id,
            "system_message": job.system_message, "prompt": example.prompt, "output": generation.text,
            "strict": scored.strict, "flexible": scored.flexible, "gold": example.gold,
            "correct_strict": scored.correct_strict, "correct_flexible": scored.correct_flexible,
            "format_ok": scored.format_ok, "finish_reason": generation.finish_reason,
            "output_tokens": len(generation.token_ids),
        })
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


@dataclass(frozen=True)
class JobResult:
    job: str
    key: str
    ref: ArtifactRef
    cached: bool


def evaluate_checkpoint(
    store: ArtifactStore,
    checkpoint: Path,
    jobs: list[Job],
    settings: GenerationSettings,
    work_dir: Path,
    *,
    digest: str | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    open_engine: OpenEngine | None = None,
) -> list[JobResult]:
    """Every job's result artifact: found in the store, else generated (one engine load) and published.

    `open_engine`: where the engines run (the Ray pool of tasks/eval_ray.py); None: `generate_jobs`' default.
    """
    digest = digest or checkpoint_digest(checkpoint)
    keyed = [(job, result_components(digest, job, settings)) for job in jobs]
    results: dict[str, JobResult] = {}
    missing = []
    for job, comps in keyed:
        key = step_key(comps)
        ref = store.lookup(RESULTS_STEP, key)
        if ref is not None:
            results[job.name] = JobResult(job.name, key, ref, True)
        else:
            missing.append((job, comps))
    if missing:
        log.info("checkpoint %s: generating %d of %d benchmark results (%s)", digest[:12], len(missing), len(jobs),
                 ", ".join(job.name for job, _ in missing))
        # Jobs with the same prompts (native == empty for a FLAN or an Orca 2 stage erased to the empty
        # message) are generated once: greedy decoding gives them the same outputs.
        prompts, same_as = {}, {}
        for job, _ in missing:
            ids = job_prompts(checkpoint, job)
            same_as[job.name] = next((name for name, other in prompts.items() if other == ids), job.name)
            if same_as[job.name] == job.name:
                prompts[job.name] = ids
        # The work folder is per checkpoint + settings: generations of a killed run are picked up again.
        work = work_dir / sha256_text(canonical_json({"checkpoint": digest, "settings": asdict(settings)}))[:16]
        generated = generate_jobs(checkpoint, prompts, work, settings, progress=progress, open_engine=open_engine)
        generated = {name: generated[first] for name, first in same_as.items()}
        for job, comps in missing:
            key = step_key(comps)
            table = score_job(job, generated[job.name])
            with store.staging(RESULTS_STEP, key) as staged:
                pq.write_table(table, staged / EXAMPLES_FILE, compression="zstd")
                summary = summarize(table.to_pandas(), samples=bootstrap_samples, seed=seed)
                summary.to_parquet(staged / SUMMARY_FILE, index=False)
                ref = store.publish(RESULTS_STEP, key, comps, staged, rows={"examples": table.num_rows},
                                    stats={"checkpoint": digest, "job": job.name, **headline(summary)})
            results[job.name] = JobResult(job.name, key, ref, False)
    return [results[job.name] for job in jobs]


def headline(summary: pd.DataFrame) -> dict[str, float]:
    """The macro row's accuracies, for manifests and logs."""
    macro = summary[summary["task"] == "(all)"]
    if macro.empty:
        return {}
    row = macro.iloc[0]
    return {k: round(float(row[k]), 4) for k in ("accuracy_strict", "accuracy_flexible", "format_ok_rate")}


def read_results(store: ArtifactStore, results: list[JobResult]) -> pd.DataFrame:
    """Every job's per-example rows, concatenated."""
    tables = [pq.read_table(store.local_dir(r.ref) / EXAMPLES_FILE) for r in results]
    return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=EXAMPLE_SCHEMA.names)


def write_results(store: ArtifactStore, results: list[JobResult], out: Path, digest: str,
                  bootstrap_samples: int, seed: int) -> tuple[dict[str, int], dict[str, Any]]:
    """One checkpoint's evaluation as a folder: examples.parquet, summary.parquet, results.json."""
    examples = read_results(store, results)
    examples.to_parquet(out / EXAMPLES_FILE, index=False)
    summary = summarize(examples, samples=bootstrap_samples, seed=seed)
    summary.to_parquet(out / SUMMARY_FILE, index=False)
    index = {"checkpoint": digest, "results": {r.job: r.key for r in results}}
    (out / "results.json").write_text(json.dumps(index, indent=2) + "\n")
    macro = summary[summary["task"] == "(all)"]
    accuracies = {f"{row.benchmark}.{row.system_message}": round(float(row.accuracy_flexible), 4) for row in macro.itertuples()}
    stats = {"checkpoint": digest, "generated": sum(not r.cached for r in results),
             "reused": sum(r.cached for r in results), "accuracy_flexible": accuracies}
    return {"examples": len(examples)}, stats
