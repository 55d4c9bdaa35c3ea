"""A folder of immutable Parquet shards on any fsspec filesystem, and its compaction.

The request cache's durable form (see `traces.RequestCache`). A shard is
written whole or not at all: on a local (or NFS-mounted) folder under a
hidden temp name and renamed; on an object store (no rename) staged in a
local temp file and uploaded in one put, which the store publishes on
completion. So a listed shard is always complete and never changes, and
readers and the compactor ignore hidden names (`.*`): a shard a writer is
still writing is invisible to them.

Compaction is size-tiered: shards whose row counts fall in the same power of
`fanin` are concatenated `fanin` at a time into one shard, so a cache of N
rows keeps O(fanin * log N + N / final_rows) files and each row is rewritten
O(log N) times. It streams (memory O(one batch)) and keeps every row: the
output is published before its inputs are removed, so a kill at any point
leaves each row in at least one listed shard (at worst twice, identical,
which readers dedupe).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem

from orca_core.store import filesystem

FANIN = 8  # shards merged at once; also the size ratio between tiers
FINAL_ROWS = 1 << 18  # shards this big are never merged again
BATCH_ROWS = 8192  # rows per read batch and per written row group
STALE_TEMP_S = 3600.0  # a hidden temp file this old is a killed writer's leftover (a flush takes < 1 s)


class ShardFolder:
    """`<url>/*.parquet`: list, stream, publish whole, remove; `url` is a local path or an fsspec URL."""

    def __init__(self, url: str | Path):
        self.fs, path = filesystem(str(url))  # no listing cache on object stores
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.path = str(Path(path).resolve()) if self.is_local else path.rstrip("/")
        self.url = self.path if self.is_local else str(url).rstrip("/")  # what another process reopens

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def names(self) -> list[str]:
        """The published shards (hidden temp files excluded), sorted."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if n.endswith(".parquet") and not n.startswith("."))

    def batches(self, name: str, schema: pa.Schema, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """A shard's rows batch by batch, as `schema` (a column the shard predates comes back null)."""
        with self.fs.open(self.file(name), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in schema.names if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
                yield pa.RecordBatch.from_arrays(
                    [batch.column(f.name).cast(f.type) if f.name in present else pa.nulls(batch.num_rows, f.type)
                     for f in schema], schema=schema)

    def publish(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """Write `name` whole or not at all (`write` fills a binary file)."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
            temp = self.file(f".{name}.tmp")
            try:
                with open(temp, "wb") as handle:
                    write(handle)
                os.replace(temp, self.file(name))  # atomic: readers see the whole shard or none
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temp)
            return
        with tempfile.NamedTemporaryFile(prefix="orca-shard-", suffix=".parquet") as staged:
            write(staged)
            staged.flush()
            self.fs.put_file(staged.name, self.file(name))  # one upload, published by the store on completion

    def write_tables(self, name: str, schema: pa.Schema, tables: Iterable[pa.Table]) -> int:
        """Publish the tables as one shard; returns its rows."""
        rows = 0

        def write(handle: BinaryIO) -> None:
            nonlocal rows
            with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
                for table in tables:
                    writer.write_table(table, row_group_size=BATCH_ROWS)
                    rows += table.num_rows

        self.publish(name, write)
        return rows

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.file(name))

    def read_text(self, name: str) -> str | None:
        try:
            return self.fs.cat_file(self.file(name)).decode().strip() or None
        except FileNotFoundError:
            return None

    def create_text(self, name: str, text: str) -> str:
        """Write `name` unless it exists; returns what it holds (first writer wins where the fs allows)."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
            staged = self.file(f".{name}.{uuid.uuid4().hex}.tmp")
            Path(staged).write_text(text)
            with contextlib.suppress(FileExistsError):
                os.link(staged, self.file(name))  # exclusive and whole: never seen half-written
            os.remove(staged)
        elif self.read_text(name) is None:
            self.fs.pipe_file(self.file(name), text.encode())
        return self.read_text(name) or text

    @contextlib.contextmanager
    def compaction_turn(self) -> Iterator[bool]:
        """True while this process may compact: one compactor per local folder; object stores have no
        lock, so two drivers may both merge the same shards (rows then exist twice, identical)."""
        if not self.is_local:
            yield True
            return
        os.makedirs(self.path, exist_ok=True)
        lock = FileLock(self.file(".compact.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def remove_stale_temps(self, older_than_s: float = STALE_TEMP_S) -> None:
        if not self.is_local:
            return  # uploads are staged outside the store
        cutoff = time.time() - older_than_s
        with contextlib.suppress(FileNotFoundError), os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.stat().st_mtime < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(entry.path)


class ShardWriter:
    """Buffers rows; publishes a shard every `flush_rows` rows or `flush_seconds` seconds."""

    def __init__(self, folder: ShardFolder | str | Path, prefix: str, schema: pa.Schema,
                 flush_rows: int = 256, flush_seconds: float = 5.0):
        self.folder = folder if isinstance(folder, ShardFolder) else ShardFolder(folder)
        self.schema, self.prefix = schema, f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.rows: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.shards = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.folder.write_tables(f"{self.prefix}-{self.shards:06d}.parquet", self.schema, [table])
        self.shards += 1
        self.rows = []


def tier(rows: int, fanin: int = FANIN) -> int:
    """floor(log_fanin(rows)), in integers."""
    level = 0
    while rows >= fanin:
        rows //= fanin
        level += 1
    return level


def compaction_groups(rows_by_shard: dict[str, int], fanin: int = FANIN,
                      final_rows: int = FINAL_ROWS) -> list[list[str]]:
    """Groups of `fanin` shards of one tier to merge (oldest names first; final shards stay)."""
    tiers: dict[int, list[str]] = {}
    for name in sorted(rows_by_shard):
        if rows_by_shard[name] < final_rows:
            tiers.setdefault(tier(rows_by_shard[name], fanin), []).append(name)
    return [names[i:i + fanin] for names in tiers.values() for i in range(0, len(names) - fanin + 1, fanin)]


def merge(folder: ShardFolder, names: list[str], schema: pa.Schema) -> tuple[str, int]:
    """Publish the rows of `names` as one new shard (the inputs stay); returns its name and rows."""

    def tables() -> Iterator[pa.Table]:
        pending: list[pa.RecordBatch] = []
        buffered = 0
        for name in names:
            for batch in folder.batches(name, schema):
                pending.append(batch)
                buffered += batch.num_rows
                if buffered >= BATCH_ROWS:
                    yield pa.Table.from_batches(pending, schema)
                    pending, buffered = [], 0
        if pending:
            yield pa.Table.from_batches(pending, schema)

    name = f"compacted-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    return name, folder.write_tables(name, schema, tables())
