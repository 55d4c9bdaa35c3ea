"""Teacher traces: the request cache (one row per call) and the trace table (one row per answer).

The request cache is append-only Parquet shards under `<store>/requests/`.
Writers (the fan-out actors) flush a shard every N rows or T seconds, each
shard written to a temp name and renamed, so a kill -9 loses at most the
unflushed in-flight rows and never leaves a torn shard. Readers dedupe by
request_id: an ok row beats a failure; among equals, the newest wins.

No secrets here: rows carry the endpoint's model name, never its URL or key.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from orca_core.keys import canonical_json, sha256_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TRACES_FILE, STRATEGIES_FILE, SELECTION_FILE = "traces.parquet", "strategies.parquet", "selection_traces.parquet"

# One teacher call.
REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("teacher_model", pa.string()),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("latency_ms", pa.float64()),
        ("attempts", pa.int32()),
        ("status", pa.string()),  # ok | failed:<reason>
        ("created_at", pa.string()),
    ]
)

# One training example candidate (a whole teacher answer, possibly several calls).
TRACE_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),  # of the last call; `call_ids` lists all
        ("call_ids", pa.list_(pa.string())),
        ("source_id", pa.string()),  # the source row (sources artifact `id`)
        ("source", pa.string()),
        ("task_name", pa.string()),
        ("template_type", pa.string()),
        ("sub_collection", pa.string()),
        ("stage", pa.string()),  # orca1 | orca2 | selection
        ("teacher_role", pa.string()),  # assistant | strong
        ("teacher_model", pa.string()),
        ("strategy", pa.string()),  # Orca 2 strategy ("" for Orca 1)
        ("system_message_id", pa.int32()),  # Orca 1 message number (0 for Orca 2)
        ("teacher_system", pa.string()),  # what the teacher saw
        ("student_system", pa.string()),  # what the student will see (after erasing)
        ("user", pa.string()),
        ("reference", pa.string()),  # gold answer, null when unknown
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("latency_ms", pa.float64()),
        ("attempts", pa.int32()),
        ("status", pa.string()),  # ok | failed:<reason>
        ("verdict", pa.string()),  # kept | dropped:<reason> (set by the filter step)
        ("created_at", pa.string()),
        ("schema_version", pa.int32()),
    ]
)


def request_id(model: str, messages: list[dict[str, str]], temperature: float, top_p: float, max_tokens: int) -> str:
    """sha256 of the canonical request: the same call is never paid for twice."""
    return sha256_text(canonical_json({
        "model": model, "messages": messages, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
    }))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ShardWriter:
    """Buffers rows; flushes a Parquet shard every `flush_rows` rows or `flush_seconds` seconds."""

    def __init__(self, folder: Path, prefix: str, flush_rows: int = 256, flush_seconds: float = 5.0,
                 schema: pa.Schema = REQUEST_SCHEMA):
        self.folder, self.schema = Path(folder), schema
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
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
        final = self.folder / f"{self.prefix}-{self.shards:06d}.parquet"
        temp = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, temp, compression="zstd")
        os.replace(temp, final)  # atomic: readers see a whole shard or none
        self.shards += 1
        self.rows = []


def read_shards(folder: Path, schema: pa.Schema = REQUEST_SCHEMA) -> pa.Table:
    """All shards of a folder (temp files ignored), as one table."""
    paths = sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))
    if not paths:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=schema) for p in paths])


def dedupe_requests(table: pa.Table) -> pa.Table:
    """One row per request_id: the oldest ok row (what was paid for first), else the newest failure."""
    ids, statuses, created = (table[c].to_pylist() for c in ("request_id", "status", "created_at"))
    ok_first = sorted(range(table.num_rows), key=lambda i: created[i])
    failures_newest_first = sorted(ok_first, key=lambda i: created[i], reverse=True)
    chosen: dict[str, int] = {}
    for i in ok_first:
        if statuses[i] == "ok":
            chosen.setdefault(ids[i], i)
    for i in failures_newest_first:
        chosen.setdefault(ids[i], i)
    return table.take(pa.array(sorted(chosen.values()), pa.int64()))


class RequestCache:
    """The request-level cache of one store: `<folder>/*.parquet` shards of REQUEST_SCHEMA rows."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """request_id -> deduped row (restricted to `ids` if given: only those rows are decoded)."""
        paths = sorted(str(p) for p in self.folder.glob("*.parquet") if not p.name.startswith("."))
        if not paths:
            return {}
        dataset = ds.dataset(paths, format="parquet", schema=REQUEST_SCHEMA)
        wanted = None if ids is None else pc.field("request_id").isin(pa.array(list(set(ids)), pa.string()))
        table = dataset.to_table(filter=wanted)
        return {row["request_id"]: row for row in dedupe_requests(table).to_pylist()}

    def writer(self, prefix: str, flush_rows: int = 256, flush_seconds: float = 5.0) -> ShardWriter:
        return ShardWriter(self.folder, prefix, flush_rows, flush_seconds)
