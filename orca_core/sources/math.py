"""Orca 2's math sources, in the source schema (`sources.math`).

- reasoning-gym's DeepMind-Mathematics-style datasets (arithmetic, fractions,
  equations, polynomials, number theory) and its GSM-style word problems: each
  from its own seed derived from the recipe seed, questions unique per task;
- GSM8K-style JSONL files (GSM8K, AddSub, ... converted to it):
  `{"question": ..., "answer": "<solution> #### 42"}`, the gold being the part
  after the last `####`; a bad line fails naming its file and line.

Rows are task `math/<name>`, source `math`, sub-collection `math`; a question
that is held out (`exclude`) never becomes a training row.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import reasoning_gym

from orca_core.keys import file_sha256
from orca_core.recipe.models import MathSources
from orca_core.sources.flan import expand_paths
from orca_core.sources.procedural import OVERSAMPLE, derived_seed
from orca_core.sources.schema import normalize_question, row_id

log = logging.getLogger(__name__)

SOURCE = SUB_COLLECTION = "math"
TASK_SOURCE = "Math"
_NUMBER = re.compile(r"-?[\d,]*\d(\.\d+)?")


def task_name(name: str) -> str:
    return f"math/{name}"


def file_paths(cfg: MathSources) -> dict[str, list[Path]]:
    """Task -> its files, in content-hash order (rows follow the data, not the file names)."""
    found = {}
    for task, patterns in sorted(cfg.files.items()):
        found[task] = sorted(expand_paths(patterns, f"sources.math.files.{task}"), key=file_sha256)
    return found


def input_hashes(cfg: MathSources) -> dict[str, list[str]]:
    return {task: [file_sha256(p) for p in paths] for task, paths in file_paths(cfg).items()}


def build_math(cfg: MathSources, seed: int, exclude: set[str] = frozenset()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(math rows, stats per task); `exclude`: normalized held-out questions."""
    rows, stats = [], {}
    for name in sorted(cfg.generators):  # sorted: the recipe's order is not part of its key
        made, skipped = _generate(name, cfg.generators[name], seed, cfg.generator_options.get(name, {}), exclude)
        rows += made
        stats[task_name(name)] = {"rows": len(made), "skipped_repeats": skipped}
    for task, paths in file_paths(cfg).items():
        made, skipped = _read_task(task, paths, exclude)
        rows += made
        stats[task_name(task)] = {"rows": len(made), "files": len(paths), "skipped_repeats": skipped}
    return rows, stats


def _row(task: str, question: str, target: str, answer: str, generator: str = "", metadata: Any = None) -> dict[str, Any]:
    return {
        "id": row_id(task, question), "inputs": question, "targets": target, "task_source": TASK_SOURCE,
        "task_name": task, "template_type": "zs_noopt", "sub_collection": SUB_COLLECTION, "split": "train",
        "answer": answer, "options": [], "multiple_choice": False, "source": SOURCE, "generator": generator,
        "metadata": json.dumps(metadata or {}, sort_keys=True, default=str),
    }


def _generate(name: str, n: int, seed: int, options: dict[str, Any], exclude: set[str]) -> tuple[list[dict], int]:
    gen_seed = derived_seed(seed, "math", name)
    dataset = reasoning_gym.create_dataset(name, size=n * OVERSAMPLE + 16, seed=gen_seed, **options)
    rows, seen, skipped = [], set(), 0
    for index in range(len(dataset)):
        entry = dataset[index]
        question, answer = entry["question"].strip(), str(entry["answer"]).strip()
        normalized = normalize_question(question)
        if normalized in seen or normalized in exclude:
            skipped += 1
            continue
        seen.add(normalized)
        rows.append(_row(task_name(name), question, answer, answer, name, entry.get("metadata")))
        if len(rows) == n:
            return rows, skipped
    raise ValueError(f"sources.math.generators.{name}: only {len(rows)} unique questions (asked for {n}); "
                     "lower the count or widen its generator_options")


def gsm8k_gold(answer: str) -> str | None:
    """The part after the last `####` (thousands separators dropped from a number), or None if there is none."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip()
    return (gold.replace(",", "") if _NUMBER.fullmatch(gold) else gold) or None


def _read_task(task: str, paths: list[Path], exclude: set[str]) -> tuple[list[dict], int]:
    rows, seen, skipped = [], set(), 0
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            question, answer = _parse_line(line, f"sources.math.files.{task}: {path}, line {number}")
            normalized = normalize_question(question)
            if normalized in seen or normalized in exclude:
                skipped += 1
                continue
            seen.add(normalized)
            rows.append(_row(task_name(task), question.strip(), answer, gsm8k_gold(answer)))
    return rows, skipped


def _parse_line(line: str, where: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
        raise ValueError(f"{where}: expected an object with string fields 'question' and 'answer'")
    if not record["question"].strip():
        raise ValueError(f"{where}: empty 'question'")
    if gsm8k_gold(record["answer"]) is None:
        raise ValueError(f"{where}: 'answer' has no final answer after '####'")
    return record["question"], record["answer"]
