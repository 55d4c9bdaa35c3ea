"""The request cache's lookup index: one SQLite file on the driver's disk, rebuildable from the shards.

Why SQLite (the standard library's `sqlite3`): a lookup of a chunk of ids is
a B-tree probe per id, O(chunk log N) with no dependence on how many shards
or rows the cache holds; the index lives on disk, so the driver's memory stays
O(chunk); transactions make "this shard is ingested" and its rows one atomic
fact (a driver killed mid-ingest re-reads that shard, nothing else); WAL mode
lets several processes of one machine share it. It adds no dependency, and
it is maintained with CPython. (DuckDB or partitioned Parquet answer an
anti-join over a whole plan well but not random probes of 2,000 ids; LMDB
would be a new binding with a fixed map size.)

The index is a cache of the shards, never the truth: it holds, per request
id, the row a reader must see (the rule below), plus the names of the shards
already ingested, so a refresh reads only the shards it has not seen.

The rule, applied as rows arrive in any order (so any ingest order gives the
same answer): an ok row beats a failure; among ok rows the oldest wins (what
was paid for first); among failures the newest wins (the latest reason);
equal timestamps fall to the smaller (response, status), so it is total.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

LOOKUP_BATCH = 900  # ids per SELECT (well under SQLite's bound on parameters)
# SQLite's page cache: a fixed cap, full by 100K requests, so the driver's RSS stays flat beyond (16 MB was still
# filling at 250K: +25 MB from 100K to 1M). Ingest and lookups at 1M were no slower than with 16 MB.
PAGE_CACHE_KIB = 4096

# True when the incoming row (`excluded`) must replace the stored one (`requests`).
BEATS = """
    (COALESCE(excluded.status, '') = 'ok') > (COALESCE(requests.status, '') = 'ok')
    OR ((COALESCE(excluded.status, '') = 'ok') = (COALESCE(requests.status, '') = 'ok') AND (
        (COALESCE(excluded.status, '') = 'ok' AND COALESCE(excluded.created_at, '') < COALESCE(requests.created_at, ''))
        OR (COALESCE(excluded.status, '') <> 'ok'
            AND COALESCE(excluded.created_at, '') > COALESCE(requests.created_at, ''))
        OR (COALESCE(excluded.created_at, '') = COALESCE(requests.created_at, '')
            AND (COALESCE(excluded.response, ''), COALESCE(excluded.status, ''))
                < (COALESCE(requests.response, ''), COALESCE(requests.status, '')))))
"""


def _sql_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_integer(arrow_type):
        return "INTEGER"
    return "REAL" if pa.types.is_floating(arrow_type) else "TEXT"


class RequestIndex:
    """request_id -> the row to serve, and the shards already ingested. Thread-safe."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.columns = Path(path), schema.names
        if self.columns[0] != "request_id":
            raise ValueError(f"request index: the first column must be request_id, not {self.columns[0]!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a lost last commit only means a shard is re-read
        self._db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
        columns = ", ".join(f"{f.name} {_sql_type(f.type)}" for f in schema)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS requests ({columns}, PRIMARY KEY (request_id))")
        self._db.execute("CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL)")
        names = ", ".join(self.columns)
        updates = ", ".join(f"{c} = excluded.{c}" for c in self.columns[1:])
        self._upsert = (f"INSERT INTO requests ({names}) VALUES ({', '.join('?' * len(self.columns))}) "
                        f"ON CONFLICT (request_id) DO UPDATE SET {updates} WHERE {BEATS}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def shards(self) -> dict[str, int]:
        """Ingested shard -> its rows."""
        with self._lock:
            return dict(self._db.execute("SELECT name, rows FROM shards"))

    def ingest(self, name: str, batches: Iterator[pa.RecordBatch]) -> int:
        """Merge a shard's rows and record it, in one transaction; returns its rows."""
        rows = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for batch in batches:
                    self._db.executemany(self._upsert, zip(*(batch.column(c).to_pylist() for c in self.columns)))
                    rows += batch.num_rows
                self._db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?)", (name, rows))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return rows

    def record(self, name: str, rows: int) -> None:
        """Note a shard whose rows are already here (a merge of ingested shards)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?)", (name, rows))

    def forget(self, names: Iterable[str]) -> None:
        """Shards gone from the folder (merged into another); their rows stay."""
        with self._lock:
            self._db.executemany("DELETE FROM shards WHERE name = ?", ((n,) for n in names))

    def lookup(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(dict.fromkeys(ids))
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(wanted), LOOKUP_BATCH):
                part = wanted[start:start + LOOKUP_BATCH]
                query = f"SELECT * FROM requests WHERE request_id IN ({', '.join('?' * len(part))})"
                for values in self._db.execute(query, part):
                    found[values[0]] = dict(zip(self.columns, values))
        return found

    def answers_of(self, model: str) -> tuple[int, float | None, float | None, float | None]:
        """(ok rows, mean prompt_tokens, completion_tokens, latency_ms) of a teacher model: one SQLite scan."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*), AVG(prompt_tokens), AVG(completion_tokens), AVG(latency_ms) "
                                    "FROM requests WHERE teacher_model = ? AND status = 'ok'", (model,)).fetchone()

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every request's row (O(cache): for tests and reports, not for the fan-out)."""
        with self._lock:
            values = self._db.execute("SELECT * FROM requests ORDER BY request_id").fetchall()
        for row in values:
            yield dict(zip(self.columns, row))
