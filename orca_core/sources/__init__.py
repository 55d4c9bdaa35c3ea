"""Sources: task prompts with gold answers, in FLAN-v2's schema."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from orca_core.recipe.models import Recipe, SourcesConfig
from orca_core.sources import flan, procedural
from orca_core.sources.schema import SOURCE_SCHEMA, to_table, write_table

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
    if cfg.flan:
        sampled, stats["flan"] = flan.sample_orca1(flan.read_collection(cfg.flan), cfg.flan, cfg.seed)
        train.append(sampled)
    train_table = pa.concat_tables(train) if train else SOURCE_SCHEMA.empty_table()
    heldout_table = pa.concat_tables(heldout) if heldout else SOURCE_SCHEMA.empty_table()
    write_table(train_table, out_dir / TRAIN_FILE)
    write_table(heldout_table, out_dir / HELDOUT_FILE)
    for split, table in (("train", train_table), ("heldout", heldout_table)):
        stats[f"{split}_by_sub_collection"] = dict(sorted(Counter(table["sub_collection"].to_pylist()).items()))
        stats[f"{split}_by_task"] = dict(sorted(Counter(table["task_name"].to_pylist()).items()))
    return {"train": train_table.num_rows, "heldout": heldout_table.num_rows}, stats


def build_sources_step(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: Any):
    """The `sources` step: the recipe's sources section, built into `out`."""
    return build_sources(recipe.sources, out)
