"""The filter steps (`filtered-orca1`, `filtered-orca2`): a traces artifact in, the same rows with verdicts out.

Apart from the fan-out code on purpose: a step's key digests the modules its builder reaches,
so an edit to the filters invalidates the filtered sets and what is trained on them, never the traces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orca_core.context import StepContext
from orca_core.filters import EvalText, filter_traces
from orca_core.recipe.models import Recipe
from orca_core.sources import HELDOUT_FILE, TRAIN_FILE
from orca_core.traces import TRACES_FILE


def build_filtered(traces_step: str, benchmark_texts: Callable[[Recipe], list[EvalText]] = lambda recipe: []) -> Callable:
    """The filter step over `traces_step`; `benchmark_texts(recipe)`: eval items to decontaminate against."""

    def build(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
        sources = upstream["sources"]
        source_table = pa.concat_tables([pq.read_table(sources / TRAIN_FILE), pq.read_table(sources / HELDOUT_FILE)])
        heldout = pq.read_table(sources / HELDOUT_FILE)["inputs"].to_pylist()
        traces = pq.read_table(upstream[traces_step] / TRACES_FILE)
        # Held-out prompts by equality (n-grams would flag the shared family templates); the real
        # evaluation benchmarks' items by n-gram overlap and equality.
        filtered, stats = filter_traces(traces, recipe.filters, source_table,
                                        contamination_texts=benchmark_texts(recipe), exact_texts=heldout)
        pq.write_table(filtered, out / TRACES_FILE, compression="zstd")
        return {"traces": filtered.num_rows, "kept": stats["kept"]}, stats

    return build
