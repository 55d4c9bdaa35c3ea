"""Orca 2's mixture: which train rows the orca2 stage draws (`sources.mixture`).

Per origin (the rows' `source`: procedural, flan, flan_few_shot, math), the
asked-for number of rows, drawn as Orca 1's sampler does (a task uniformly,
then a row without replacement); null takes every row of the origin. The
draw is part of the sources artifact (MIXTURE_FILE: the ids, in train order),
so the orca2 traces, their plan and the manifest all see the same rows. It holds each
drawn row's place in train.parquet: a pass over millions of rows keeps them by position, with no
hash set of ids.
Without a mixture there is no such file and the orca2 stage draws every row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orca_core.recipe.models import Orca2Mixture
from orca_core.sources.flan import task_codes, uniform_task_sample

log = logging.getLogger(__name__)

MIXTURE_FILE = "orca2_mixture.parquet"
ORIGINS = tuple(Orca2Mixture.model_fields)  # procedural, flan, flan_few_shot, math
_STREAM = 2  # the mixture's random stream, apart from the samplers'


def draw(train: pa.Table, mixture: Orca2Mixture, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """(the drawn rows: place in `train`, id, source, task_name, in train order; stats per origin)."""
    rng = np.random.default_rng([seed, _STREAM])
    sources = train["source"].to_numpy(zero_copy_only=False)
    _, tasks = task_codes(train)
    picked, stats = [], {}
    for origin in ORIGINS:
        rows = np.flatnonzero(sources == origin)
        target = getattr(mixture, origin)
        if target is None or target >= len(rows):
            chosen = rows
            if target is not None and target > len(rows):
                log.warning("sources.mixture.%s: %d rows asked, %d exist: drawing all", origin, target, len(rows))
        else:
            chosen = rows[uniform_task_sample(tasks[rows], target, rng)]
        picked.append(chosen)
        stats[origin] = {"pool": int(len(rows)), "target": target, "drawn": int(len(chosen)),
                         "tasks": int(len(np.unique(tasks[chosen])))}
    indices = np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)
    drawn = train.select(["id", "source", "task_name"]).take(pa.array(indices, pa.int64()))
    return drawn.add_column(0, "row", pa.array(indices, pa.int64())), stats


def write(drawn: pa.Table, out_dir: Path) -> None:
    pq.write_table(drawn, out_dir / MIXTURE_FILE, compression="zstd")


def drawn_rows(sources: Path) -> np.ndarray | None:
    """The places (sorted) of the train rows the orca2 stage draws; None without a mixture (every row is drawn)."""
    path = sources / MIXTURE_FILE
    return pq.read_table(path, columns=["row"])["row"].to_numpy() if path.exists() else None


def drawn_mask(drawn: np.ndarray, start: int, n: int) -> np.ndarray:
    """Which of the n train rows from place `start` on are drawn."""
    mask = np.zeros(n, dtype=bool)
    low, high = np.searchsorted(drawn, [start, start + n])
    mask[drawn[low:high] - start] = True
    return mask
