"""Sources: task prompts with gold answers, in FLAN-v2's schema.

The Orca 1 pool (the procedural suite and/or FLAN-v2 sampled with Orca 1's
rules), Orca 2's additions (few-shot FLAN prompts, math), and the mixture
the orca2 stage draws from them (`mixture.py`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from orca_core.recipe.models import Recipe, SourcesConfig
from orca_core.sources import fewshot, flan, mixture, procedural
from orca_core.sources import math as math_source
from orca_core.sources.schema import SOURCE_SCHEMA, normalize_question, to_table, write_table

TRAIN_FILE, HELDOUT_FILE = "train.parquet", "heldout.parquet"


def build_sources(cfg: SourcesConfig, out_dir: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """Write train.parquet and heldout.parquet; return (row counts, stats for the manifest)."""
    train: list[pa.Table] = []
    heldout: list[pa.Table] = []
    stats: dict[str, Any] = {}
    if cfg.procedural:
        p = cfg.procedural
        rows, held, stats["procedural"] = procedural.generate_suite(
            p.families, p.train_per_family, p.heldout_per_family, cfg.seed, p.generator_options
        )
        train.append(to_table(rows))
        heldout.append(to_table(held))
    held_out = {normalize_question(q) for table in heldout for q in table["inputs"].to_pylist()}
    if cfg.flan:
        collection = flan.read_collection(cfg.flan)
        sampled, stats["flan"] = flan.sample_orca1(collection, cfg.flan, cfg.seed)
        train.append(sampled)
        if cfg.few_shot:
            prompts, stats["few_shot"] = fewshot.build_few_shot(collection, cfg.few_shot, cfg.flan, cfg.seed, held_out)
            train.append(prompts)
    if cfg.math:
        rows, stats["math"] = math_source.build_math(cfg.math, cfg.seed, held_out)
        train.append(to_table(rows))
    train_table = pa.concat_tables(train) if train else SOURCE_SCHEMA.empty_table()
    heldout_table = pa.concat_tables(heldout) if heldout else SOURCE_SCHEMA.empty_table()
    write_table(train_table, out_dir / TRAIN_FILE)
    write_table(heldout_table, out_dir / HELDOUT_FILE)
    for split, table in (("train", train_table), ("heldout", heldout_table)):
        stats[f"{split}_by_sub_collection"] = dict(sorted(Counter(table["sub_collection"].to_pylist()).items()))
        stats[f"{split}_by_task"] = dict(sorted(Counter(table["task_name"].to_pylist()).items()))
        stats[f"{split}_by_source"] = dict(sorted(Counter(table["source"].to_pylist()).items()))  # per origin
    if cfg.mixture:
        drawn, stats["mixture"] = mixture.draw(train_table, cfg.mixture, cfg.seed)
        mixture.write(drawn, out_dir)
    return {"train": train_table.num_rows, "heldout": heldout_table.num_rows}, stats


def build_sources_step(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: Any):
    """The `sources` step: the recipe's sources section, built into `out`."""
    return build_sources(recipe.sources, out)
