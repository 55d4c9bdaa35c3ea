"""Orca 2's few-shot prompts: FLAN tasks as k-shot prompts of the same task (`sources.few_shot`).

From the collection `sources.flan` reads, zero-shot templates only, without
Dialog (its queries lack context) and the T0 tasks Orca 1 leaves out
(BIG-bench is an eval set): a task is drawn uniformly, then a target row of it
without replacement (Orca 1's sampler, `flan.uniform_task_sample`). Its k shots
(k uniform in [min_shots, max_shots]) are other rows of the same task: never
the target, never a copy of the target's question, never a held-out question.
The prompt is the shots as Q/A pairs (their original targets), then the
target's question; the gold is the target's. Deterministic by seed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orca_core.recipe.models import FewShotSources, FlanSources
from orca_core.sources import flan
from orca_core.sources.schema import SOURCE_SCHEMA, normalize_question, parse_options, row_id

SOURCE = "flan_few_shot"
FEW_SHOT_TEMPLATE = {"zs_opt": "fs_opt", "zs_noopt": "fs_noopt"}  # FLAN's names for the same template with shots
_STREAM = 1  # the few-shot draw's random stream, apart from the Orca 1 sampler's


def few_shot_prompt(shots: list[tuple[str, str]], question: str) -> str:
    """The shots as Q/A pairs, then the question (its answer left to the model)."""
    return "\n\n".join([*(f"Q: {q.strip()}\nA: {a.strip()}" for q, a in shots), f"Q: {question.strip()}\nA:"])


def _pool(table: pa.Table, cfg: FlanSources, exclude: set[str]) -> tuple[pa.Table, np.ndarray]:
    """The rows shots and targets come from, and each row's sub-collection."""
    table = flan.zero_shot(table)
    sub = flan.sub_collections(table)
    names, tasks = flan.task_codes(table)
    excluded_t0 = re.compile(cfg.t0_exclude_task_pattern)
    dropped = np.array([bool(excluded_t0.search(name)) for name in names], dtype=bool)
    keep = (sub != "dialog") & ~(dropped[tasks] & (sub == "t0"))
    if exclude:
        keep &= np.array([normalize_question(q) not in exclude for q in table["inputs"].to_pylist()], dtype=bool)
    return table.filter(pa.array(keep)), sub[keep]


def build_few_shot(collection: pa.Table, cfg: FewShotSources, flan_cfg: FlanSources, seed: int,
                   exclude: set[str] = frozenset()) -> tuple[pa.Table, dict[str, Any]]:
    """`cfg.count` few-shot prompts (source schema) and stats; `exclude`: normalized held-out questions."""
    table, sub = _pool(collection, flan_cfg, exclude)
    names, tasks = flan.task_codes(table)
    sizes = np.bincount(tasks, minlength=len(names))
    small = [(str(names[t]), int(n)) for t, n in enumerate(sizes) if 0 < n <= cfg.min_shots]
    if small and cfg.small_tasks == "error":
        listed = ", ".join(f"{name!r} ({n})" for name, n in small[:5]) + (" ..." if len(small) > 5 else "")
        raise ValueError(f"sources.few_shot: {len(small)} task(s) have too few rows for {cfg.min_shots} shots and "
                         f"a target ({cfg.min_shots + 1} needed): {listed}; lower min_shots or set small_tasks: skip")
    usable = np.flatnonzero(sizes[tasks] > cfg.min_shots)
    rng = np.random.default_rng([seed, _STREAM])
    targets = usable[flan.uniform_task_sample(tasks[usable], cfg.count, rng)]
    by_task = np.split(np.argsort(tasks, kind="stable"), np.cumsum(sizes)[:-1])  # each task's rows, in row order
    columns = {name: table[name].to_pylist() for name in ("inputs", "targets", "task_source", "template_type")}
    inputs = columns["inputs"]
    rows, shots_used = [], Counter()
    for target in targets.tolist():
        task = tasks[target]
        shots = _shots(target, by_task[task], inputs, cfg, rng)
        if shots is None:
            raise ValueError(f"sources.few_shot: task {names[task]!r} has fewer than {cfg.min_shots} rows whose "
                             f"question differs from its row {inputs[target][:60]!r}; lower min_shots")
        rows.append(_row(columns, target, shots, str(names[task]), sub[target]))
        shots_used[len(shots)] += 1
    built = pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
    unique = pc.index_in(pc.unique(built["id"]), built["id"])  # a twice-drawn question with the same shots
    built = built.take(pc.sort_indices(unique))
    stats = {"pool_rows": table.num_rows, "tasks": int((sizes > cfg.min_shots).sum()), "target": cfg.count,
             "built": built.num_rows, "by_shots": dict(sorted(shots_used.items())),
             **({"skipped_tasks": [name for name, _ in small]} if small else {})}
    return built, stats


def _shots(target: int, task_rows: np.ndarray, inputs: list[str], cfg: FewShotSources,
           rng: np.random.Generator) -> list[int] | None:
    """k other rows of the task (k uniform in [min_shots, max_shots], at most what the task has), or None."""
    k = int(rng.integers(cfg.min_shots, min(cfg.max_shots, len(task_rows) - 1) + 1))
    seen = {normalize_question(inputs[target])}
    shots = []
    # A few spares beyond k, so a duplicate question rarely leaves a prompt short; then the rest, if it must.
    spare = rng.choice(task_rows, size=min(len(task_rows), k + 4), replace=False).tolist()
    for candidate in chain(spare, _whole_task(task_rows, rng)):
        question = normalize_question(inputs[candidate])
        if question not in seen:
            seen.add(question)
            shots.append(candidate)
            if len(shots) == k:
                return shots
    return shots if len(shots) >= cfg.min_shots else None


def _whole_task(task_rows: np.ndarray, rng: np.random.Generator):
    yield from rng.permutation(task_rows).tolist()  # drawn only if the spares run out


def _row(columns: dict[str, list], target: int, shots: list[int], task: str, sub_collection: str) -> dict[str, Any]:
    inputs, answers = columns["inputs"], columns["targets"]
    prompt = few_shot_prompt([(inputs[i], answers[i]) for i in shots], inputs[target])
    options = parse_options(inputs[target])  # the target's own options (the shots have theirs)
    template = columns["template_type"][target]
    return {
        "id": row_id(task, prompt), "inputs": prompt, "targets": answers[target],
        "task_source": columns["task_source"][target], "task_name": task,
        "template_type": FEW_SHOT_TEMPLATE.get(template, template), "sub_collection": sub_collection,
        "split": "train", "answer": answers[target], "options": options, "multiple_choice": bool(options),
        "source": SOURCE, "generator": "",
        "metadata": json.dumps({"target_id": row_id(task, inputs[target]),
                                "shot_ids": [row_id(task, inputs[i]) for i in shots]}),
    }
