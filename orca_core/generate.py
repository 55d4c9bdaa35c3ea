"""The data-generation steps that ask teachers: strategy selection, Orca 1 / Orca 2 traces (filters: `filter_step`).

Each `build_*` has the step signature (recipe, upstream folders, out folder,
context) and writes Parquet into `out`. Teacher calls go through
`context.fanout` (Ray in production, asyncio in-process in tests) and the
request cache, so a rebuild re-sends nothing already answered.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orca_core.answers import extract, is_correct
from orca_core.context import StepContext
from orca_core.keys import canonical_json, sha256_text
from orca_core.prompts import PROMPTS_VERSION, STRATEGIES, orca1_data
from orca_core.recipe.models import Recipe, TeacherEndpoint
from orca_core.sources import HELDOUT_FILE, TRAIN_FILE, mixture
from orca_core.sources.schema import ORCA1_SOURCES
from orca_core.teacher.fanout import FanoutIncomplete, FanoutPlan, FanoutReport, TraceTable, assemble, survey
from orca_core.teacher.identity import endpoint_identity
from orca_core.teacher.jobs import JOB_COLUMNS, orca1_jobs, orca2_jobs, selection_jobs
from orca_core.teacher.runner import run_fanout
from orca_core.traces import SELECTION_FILE, STRATEGIES_FILE, TRACES_FILE, RequestCache

log = logging.getLogger(__name__)

# -- what the trace keys read -------------------------------------------------------
def prompts_digest() -> str:
    """Every prompt text the teachers see: editing one invalidates the traces that used it."""
    texts = {"version": PROMPTS_VERSION, "orca1": orca1_data(),
             "strategies": {s.name: [s.instruction, *s.followups] for s in STRATEGIES.values()}}
    return sha256_text(canonical_json(texts))


def teacher_identity(endpoint: TeacherEndpoint) -> dict[str, Any]:
    """What decides a teacher's traces: who answers (the identity request ids carry), how it samples, how many
    answers per prompt, and which prompts are never sent (context_window). Not its key, limits or prices."""
    return {**endpoint_identity(endpoint),
            **endpoint.model_dump(mode="json", include={"temperature", "top_p", "max_tokens", "context_window",
                                                        "samples"})}


# -- helpers -----------------------------------------------------------------------------
def _train_rows(sources: Path) -> list[dict[str, Any]]:
    return pq.read_table(sources / TRAIN_FILE).to_pylist()


def _stream_rows(sources: Path, keep: Callable[[pa.RecordBatch, int], Any] | None = None,
                 batch_rows: int = 4096) -> Iterator[dict[str, Any]]:
    """Train rows (the columns jobs read; those `keep(batch, place of its first row)` marks) batch by batch: a
    fan-out over millions of prompts never holds them all."""
    start = 0
    for batch in pq.ParquetFile(sources / TRAIN_FILE).iter_batches(batch_size=batch_rows, columns=JOB_COLUMNS):
        if keep is not None:
            marked = keep(batch, start)
            start += batch.num_rows
            batch = batch.filter(marked)
        columns = [column.to_pylist() for column in batch.columns]
        yield from (dict(zip(JOB_COLUMNS, values)) for values in zip(*columns))


def _run_fanout(recipe: Recipe, plan: FanoutPlan, ctx: StepContext, sources: Path, out_file: Path) -> dict[str, Any]:
    """Survey the cache, send what it lacks (batch-mode roles through the Batch API), write the traces."""
    if ctx.request_cache is None:
        raise RuntimeError("this step sends teacher requests: it needs a request cache")
    # The system allocator for Arrow's Python-level calls too, also where pyarrow loaded before orca_core could
    # choose its C++ default pool (orca_core/__init__.py says why: mimalloc kept the shard reads' memory).
    pa.set_memory_pool(pa.system_memory_pool())
    cache = RequestCache(ctx.request_cache)
    table = TraceTable(out_file)
    try:
        found = survey(plan, cache, table, ctx.sink, ctx.retry_failed)
        report = FanoutReport(found.total, found_in_cache=found.total - found.pending)
        if found.pending:  # else every trace is written already: no teacher is started
            rest = plan.after(found.written)
            report = run_fanout(rest, ctx.fanout, cache, [sources / TRAIN_FILE, sources / HELDOUT_FILE], ctx.sink,
                                ctx.retry_failed, recipe.teachers.max_cost_usd)
            report.found_in_cache += found.written
            assemble(rest, cache, table)
    except FanoutIncomplete as err:
        reason = "the budget (teachers.max_cost_usd) is spent" if report.budget_exhausted else "the fan-out stopped early"
        raise FanoutIncomplete(f"{err} (of {found.total}); {reason}") from None
    finally:
        stats = table.close()
    stats["this_run"] = {"found_in_cache": report.found_in_cache, "written_while_surveying": found.written,
                         "sent_jobs": report.sent_jobs,
                         "shared_jobs": report.shared_jobs,
                         "requests": report.worker.get("requests", 0), "seconds": round(report.seconds, 2),
                         "cost_usd": report.worker.get("cost_micro_usd", 0) / 1e6,
                         "failures": report.worker.get("failures", {})}
    return stats


def _plan(jobs: Callable, endpoints: dict[str, TeacherEndpoint]) -> FanoutPlan:
    return FanoutPlan(jobs, endpoints)


# -- strategies ----------------------------------------------------------------------------
def strategy_candidates() -> list[str]:
    return list(STRATEGIES)


def build_strategies(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
    """Task -> strategy: from the recipe, or (`auto`) the best of all strategies on k gold-labelled samples."""
    rows = _train_rows(upstream["sources"])
    tasks = sorted({r["task_name"] for r in rows})
    wanted = wanted_strategies(recipe, tasks)
    auto = [t for t, s in wanted.items() if s == "auto"]
    table_rows = [{"task_name": t, "strategy": s, "chosen": True, "accuracy": None, "n": 0, "how": "recipe"}
                  for t, s in wanted.items() if s != "auto"]
    stats: dict[str, Any] = {"tasks": len(tasks), "auto": len(auto)}
    if auto:
        samples, plan = selection_fanout(recipe, rows, auto)
        stats["fanout"] = _run_fanout(recipe, plan, ctx, upstream["sources"], out / SELECTION_FILE)
        table_rows += score_selection(pq.read_table(out / SELECTION_FILE), samples)
    pq.write_table(pa.Table.from_pylist(table_rows), out / STRATEGIES_FILE)
    stats["chosen"] = {r["task_name"]: r["strategy"] for r in table_rows if r["chosen"]}
    return {"tasks": len(tasks), "candidates": len(table_rows)}, stats


def wanted_strategies(recipe: Recipe, tasks: list[str]) -> dict[str, str]:
    """Task -> the recipe's strategy for it ("auto": the best on gold-labelled samples)."""
    p = recipe.prompts
    return {t: p.strategies.get(t, p.default_strategy) for t in tasks}


def selection_fanout(recipe: Recipe, rows: list[dict], auto: list[str]) -> tuple[list[dict], FanoutPlan]:
    """The samples of the `auto` tasks and the fan-out that tries every candidate strategy on them."""
    samples = _selection_samples(rows, auto, recipe.prompts.selection_samples, recipe.seed)
    return samples, _plan(lambda: selection_jobs(samples, recipe, strategy_candidates()), {"strong": recipe.teachers.strong})


def _selection_samples(rows: list[dict], tasks: list[str], k: int, seed: int) -> list[dict]:
    """k rows per task, chosen by a seeded hash order (stable under added rows)."""
    by_task = defaultdict(list)
    for r in rows:
        if r["task_name"] in tasks:
            by_task[r["task_name"]].append(r)
    picked = []
    for task in tasks:
        picked += sorted(by_task[task], key=lambda r: sha256_text(f"{seed}:select:{r['id']}"))[:k]
    return picked


def score_selection(traces: pa.Table, samples: list[dict]) -> list[dict]:
    """Accuracy per (task, strategy) with the evaluation's answer extraction; best per task is chosen.

    Ties go to the strategy with fewer completion tokens (cheaper to teach and to run).
    """
    by_id = {r["id"]: r for r in samples}
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    for t in traces.to_pylist():
        row = by_id[t["source_id"]]
        answer = extract(t["response"], row["options"]).flexible if t["status"] == "ok" else None
        correct = is_correct(answer, row["answer"], options=row["options"], generator=row["generator"],
                             metadata=row["metadata"], question=row["inputs"])
        scores[(t["task_name"], t["strategy"])].append(float(correct))
        tokens[(t["task_name"], t["strategy"])] += t["completion_tokens"]
    table = []
    for task, group in itertools.groupby(sorted(scores), key=lambda k: k[0]):
        keys = list(group)
        best = max(keys, key=lambda k: (sum(scores[k]) / len(scores[k]), -tokens[k]))
        table += [{"task_name": task, "strategy": k[1], "chosen": k == best, "accuracy": sum(scores[k]) / len(scores[k]),
                   "n": len(scores[k]), "how": "auto"} for k in keys]
    return table


# -- traces ----------------------------------------------------------------------------------
# The fan-outs are functions of (recipe, upstream folders): the steps run them, `orca plan` prices them.
def orca1_fanout(recipe: Recipe, sources: Path) -> FanoutPlan:
    endpoints = {"assistant": recipe.teachers.assistant, "strong": recipe.teachers.strong}
    orca1_pool = pa.array(ORCA1_SOURCES)  # Orca 1's prompts: not Orca 2's few-shot and math additions
    return _plan(lambda: orca1_jobs(_stream_rows(sources, lambda b, _: pc.is_in(b["source"], value_set=orca1_pool)),
                                    recipe), endpoints)


def chosen_strategies(strategies: Path) -> dict[str, str]:
    """Task -> strategy, as the strategies artifact chose."""
    chosen = pq.read_table(strategies / STRATEGIES_FILE).filter(pc.field("chosen"))
    return dict(zip(chosen["task_name"].to_pylist(), chosen["strategy"].to_pylist()))


def orca2_fanout(recipe: Recipe, sources: Path, strategy_of: dict[str, str]) -> FanoutPlan:
    """The orca2 stage's prompts: the rows of the sources' mixture (sources.mixture), or every row without one."""
    drawn = mixture.drawn_rows(sources)
    keep = None if drawn is None else (lambda b, start: pa.array(mixture.drawn_mask(drawn, start, b.num_rows)))
    return _plan(lambda: orca2_jobs(_stream_rows(sources, keep), recipe, strategy_of), {"strong": recipe.teachers.strong})


def build_orca1_traces(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
    sources = upstream["sources"]
    stats = _run_fanout(recipe, orca1_fanout(recipe, sources), ctx, sources, out / TRACES_FILE)
    return {"traces": stats["traces"]}, stats


def build_orca2_traces(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
    sources = upstream["sources"]
    plan = orca2_fanout(recipe, sources, chosen_strategies(upstream["strategies"]))
    stats = _run_fanout(recipe, plan, ctx, sources, out / TRACES_FILE)
    return {"traces": stats["traces"]}, stats
