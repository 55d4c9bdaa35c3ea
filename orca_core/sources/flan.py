"""The FLAN-v2 collection, sampled with Orca 1's rules.

Reads the real schema (`inputs`, `targets`, `task_source`, `task_name`,
`template_type`; the underscore-prefixed names of some dumps are accepted)
from local Parquet / JSONL / JSONL.gz files or a `datasets` name (loaded at the
commit its `revision` pins or resolves to: orca_core/hub.py), keeps the
zero-shot templates, and samples per sub-collection:

- CoT: all of it (or a random subset if the recipe caps it),
- NIv2: at most `niv2_max_per_task` queries per task, then down to the target,
- Flan2021 and T0: pick a task uniformly, then a query without replacement,
  until the target is met or every task is exhausted; T0 drops BIG-bench tasks,
- Dialog: skipped (count 0 by default: its queries lack context).
"""

from __future__ import annotations

import glob
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from orca_core.keys import file_sha256
from orca_core.recipe.models import FlanSources
from orca_core.sources.schema import FLAN_COLUMNS, SOURCE_SCHEMA, parse_options, row_id

log = logging.getLogger(__name__)

SUB_COLLECTION = {"cot": "cot", "niv2": "niv2", "flan2021": "flan2021", "flan": "flan2021",
                  "t0": "t0", "p3": "t0", "dialog": "dialog"}


def expand_paths(patterns: list[str], field: str = "sources.flan.paths") -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise FileNotFoundError(f"{field}: no file matches {pattern!r}")
        paths += [Path(m) for m in matches]
    return paths


def input_hashes(cfg: FlanSources) -> list[str]:
    """Content hashes of the input files (sorted: file names and order do not matter)."""
    if cfg.paths:
        return sorted(file_sha256(p) for p in expand_paths(cfg.paths))
    folder = Path(cfg.dataset or "").expanduser()
    if folder.is_dir():  # a local dataset folder: hash what is in it
        return sorted(file_sha256(p) for p in folder.rglob("*") if p.is_file())
    return []  # a hub dataset: its name and commit are in the step config (FlanSources.hub_commit)


def _read_file(path: Path) -> pa.Table:
    name = path.name.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(path)
    elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        with pa.input_stream(str(path), compression="detect") as stream:
            table = pajson.read_json(stream)
    else:
        raise ValueError(f"sources.flan.paths: {path}: unsupported file type (use .parquet, .jsonl or .jsonl.gz)")
    table = table.rename_columns([c[1:] if c.startswith("_") and c[1:] in FLAN_COLUMNS else c for c in table.column_names])
    missing = [c for c in FLAN_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"sources.flan.paths: {path}: missing FLAN-v2 columns {missing} (has {table.column_names})")
    return table.select(list(FLAN_COLUMNS)).cast(pa.schema([(c, pa.string()) for c in FLAN_COLUMNS]))


def read_collection(cfg: FlanSources) -> pa.Table:
    if cfg.paths:
        # Files in content-hash order, so the sample depends on the data, not on file names.
        tables = sorted(((file_sha256(p), _read_file(p)) for p in expand_paths(cfg.paths)), key=lambda x: x[0])
        return pa.concat_tables([t for _, t in tables])
    import datasets

    folder = Path(cfg.dataset or "").expanduser()
    if folder.is_dir():
        ds = datasets.load_from_disk(str(folder))
    else:
        ds = datasets.load_dataset(cfg.dataset, revision=cfg.hub_commit())  # the commit keyed on
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[cfg.dataset_split]
    table = ds.data.table
    table = table.rename_columns([c[1:] if c.startswith("_") and c[1:] in FLAN_COLUMNS else c for c in table.column_names])
    return table.select(list(FLAN_COLUMNS)).cast(pa.schema([(c, pa.string()) for c in FLAN_COLUMNS]))


def uniform_task_sample(task_ids: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices drawn as Orca 1 did: a task uniformly, then one of its queries without replacement.

    Vectorised by rounds: each round spreads the remaining draws uniformly over the
    live tasks; a task asked for more than it has gives all it has and leaves (the
    surplus is redrawn among the others: rejection sampling of exhausted tasks).
    """
    queues: dict[int, list[int]] = {}  # each task's rows, in a random order
    for index in rng.permutation(len(task_ids)).tolist():
        queues.setdefault(int(task_ids[index]), []).append(index)
    taken = dict.fromkeys(queues, 0)
    live = sorted(queues)
    remaining = min(target, len(task_ids))
    while remaining > 0:
        draws = np.bincount(rng.integers(0, len(live), size=remaining), minlength=len(live))
        for task, want in zip(live, draws.tolist()):
            got = min(want, len(queues[task]) - taken[task])
            taken[task] += got
            remaining -= got
        live = [task for task in live if taken[task] < len(queues[task])]
    return np.sort(np.array([i for task, rows in queues.items() for i in rows[: taken[task]]], dtype=np.int64))


def cap_per_task(rows: np.ndarray, task_ids: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """A random `cap` rows of each task (all of a task that has fewer), in one sort."""
    shuffled = rng.permutation(len(rows))
    order = shuffled[np.argsort(task_ids[shuffled], kind="stable")]  # grouped by task, random inside
    grouped = task_ids[order]
    rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
    return np.sort(rows[order[rank < cap]])


def zero_shot(table: pa.Table) -> pa.Table:
    return table.filter(pc.starts_with(table["template_type"], "zs"))


def sub_collections(table: pa.Table) -> np.ndarray:
    """Each row's sub-collection (cot, niv2, flan2021, t0, dialog) from its `task_source`, however spelled."""
    source_codes = pc.dictionary_encode(table["task_source"]).combine_chunks()
    spelled = source_codes.dictionary.to_pylist()
    normalized = [SUB_COLLECTION.get(s.lower().replace("/", "").replace(" ", "")) for s in spelled]
    unknown = sorted(s for s, n in zip(spelled, normalized) if n is None)
    if unknown:
        raise ValueError(f"sources.flan: unknown task_source values {unknown}; expected CoT, NIv2, Flan2021, T0/P3, Dialog")
    return np.array(normalized, dtype=object)[source_codes.indices.to_numpy(zero_copy_only=False)]


def task_codes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(task names, an index into them per row): tasks as ints, so millions of rows group fast."""
    codes = pc.dictionary_encode(table["task_name"]).combine_chunks()
    return np.array(codes.dictionary.to_pylist(), dtype=object), codes.indices.to_numpy(zero_copy_only=False)


def sample_orca1(table: pa.Table, cfg: FlanSources, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """Apply Orca 1's sampling rules; returns the sampled rows (source schema) and stats."""
    rng = np.random.default_rng(seed)
    pool_size = table.num_rows
    if cfg.zero_shot_only:
        table = zero_shot(table)
    sub = sub_collections(table)
    task_names, tasks = task_codes(table)
    t0_excluded = re.compile(cfg.t0_exclude_task_pattern)
    picked: list[np.ndarray] = []
    stats: dict[str, Any] = {"pool_rows": pool_size, "zero_shot_rows": table.num_rows, "by_sub_collection": {}}
    for name in ("cot", "niv2", "flan2021", "t0", "dialog"):
        rows = np.flatnonzero(sub == name)
        dropped_tasks: list[str] = []
        if name == "t0":
            present = np.unique(tasks[rows])
            dropped = present[[bool(t0_excluded.search(task_names[t])) for t in present]]
            dropped_tasks = sorted(task_names[dropped].tolist())
            rows = rows[~np.isin(tasks[rows], dropped)]
        if name == "niv2":
            rows = cap_per_task(rows, tasks[rows], cfg.niv2_max_per_task, rng)
        target = cfg.counts.get(name, 0)
        if target is None or target >= len(rows):
            chosen = rows
        elif name in ("cot", "niv2"):
            chosen = np.sort(rng.choice(rows, size=target, replace=False))
        else:
            chosen = rows[uniform_task_sample(tasks[rows], target, rng)]
        picked.append(chosen)
        stats["by_sub_collection"][name] = {
            "pool": int(len(rows)), "target": target, "sampled": int(len(chosen)),
            "tasks": int(len(np.unique(tasks[chosen]))),
            **({"excluded_tasks": dropped_tasks} if dropped_tasks else {}),
        }
    indices = np.sort(np.concatenate(picked))
    sampled = table.take(pa.array(indices))
    stats["by_task"] = dict(sorted(Counter(sampled["task_name"].to_pylist()).items()))
    return _to_source_rows(sampled, sub[indices]), stats


def _to_source_rows(table: pa.Table, sub_collections: np.ndarray) -> pa.Table:
    inputs, names = table["inputs"].to_pylist(), table["task_name"].to_pylist()
    options = [parse_options(text) for text in inputs]
    n = table.num_rows
    columns = {
        "id": [row_id(t, q) for t, q in zip(names, inputs)],
        "inputs": inputs,
        "targets": table["targets"].to_pylist(),
        "task_source": table["task_source"].to_pylist(),
        "task_name": names,
        "template_type": table["template_type"].to_pylist(),
        "sub_collection": sub_collections.tolist(),
        "split": ["train"] * n,
        "answer": table["targets"].to_pylist(),
        "options": options,
        "multiple_choice": [bool(o) for o in options],
        "source": ["flan"] * n,
        "generator": [""] * n,
        "metadata": ["{}"] * n,
    }
    return pa.Table.from_pydict(columns, schema=SOURCE_SCHEMA)
