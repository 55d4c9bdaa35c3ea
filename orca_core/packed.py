"""Packed training rows on disk: an uncompressed Arrow IPC file, read memory-mapped.

The dataset step writes its rows in record batches (`orca_core/data.py`);
training opens the file memory-mapped and takes rows by index, so a rank reads
only the pages of the rows it trains on, and nothing is copied until the
collator builds its tensors. (Arrow's own `take` on a table of many record
batches first concatenates each column: the whole file in memory. Rows are
taken here batch by batch, as zero-copy slices.)

A Parquet table (rows made by hand in tests and benches) is read whole, into
the same record batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32())),
    ("n_examples", pa.int32()), ("n_tokens", pa.int32()), ("n_label_tokens", pa.int32()),
])
ARROW_MAGIC, PARQUET_MAGIC = b"ARROW1", b"PAR1"


class PackedRows:
    """The rows of a packed dataset file (`columns` of them), taken by index without reading the rest."""

    def __init__(self, path: str | Path, columns: Sequence[str] | None = None):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            magic = handle.read(len(ARROW_MAGIC))
        if magic == ARROW_MAGIC:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
            schema, batches = reader.schema, [reader.get_batch(i) for i in range(reader.num_record_batches)]
        elif magic.startswith(PARQUET_MAGIC):
            table = pq.read_table(self.path)
            schema, batches = table.schema, table.to_batches()
        else:
            raise ValueError(f"{self.path}: not a packed dataset (neither an Arrow IPC file nor Parquet)")
        columns = list(columns or schema.names)
        if missing := [name for name in columns if name not in schema.names]:
            raise ValueError(f"{self.path}: no column {', '.join(map(repr, missing))}")
        self.schema = pa.schema([schema.field(name) for name in columns])
        self.batches = [batch.select(columns) for batch in batches if batch.num_rows]
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, indices: Sequence[int] | np.ndarray) -> pa.Table:
        """The rows at `indices`, in that order (zero-copy slices of the file)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range 0..{len(self) - 1}")
        where = np.searchsorted(self.starts, indices, side="right") - 1
        return pa.Table.from_batches([self.batches[b].slice(i - self.starts[b], 1)
                                      for b, i in zip(where.tolist(), indices.tolist())], self.schema)

    def table(self) -> pa.Table:
        """Every row (zero-copy: still backed by the file's pages)."""
        return pa.Table.from_batches(self.batches, self.schema)


def row_count(path: str | Path) -> int:
    return len(PackedRows(path))
