"""Teacher traces: the request cache (one row per call) and the trace table (one row per answer).

The request cache is append-only Parquet shards under `<store>/requests/`
(any fsspec URL: `orca_core/request_shards.py`). Writers (the fan-out actors,
on any node) each publish their own shards every N rows or T seconds, whole
or not at all, so a kill -9 loses at most the unflushed in-flight rows and
never leaves a torn shard. The driver looks ids up in a local SQLite index of
those shards (`orca_core/request_index.py`) that ingests each shard once, so
resolving a chunk costs O(chunk), not O(cache), and compacts small shards
into bigger ones as it goes (crash-safe, never touching a shard being
written). Readers see one row per request_id: an ok row beats a failure, the
oldest ok row wins (what was paid for first), and with no ok row the newest
failure.

No secrets here: rows carry the endpoint's model name, never its URL or key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from orca_core.keys import canonical_json, sha256_text
from orca_core.request_index import RequestIndex
from orca_core.request_shards import ShardFolder, ShardWriter, compaction_groups, merge

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


def request_id(teacher: str, messages: list[dict[str, str]], temperature: float, top_p: float, max_tokens: int,
               sample: int = 0) -> str:
    """sha256 of the canonical request and of who answers it: the same call is never paid for twice.

    `teacher`: the endpoint's identity digest (`teacher.identity.identity_digest`: kind, model, host or
    revision, oracle settings and code). `sample` n > 0: the n-th extra answer to the same prompt
    (sample 0 keeps the plain id).
    """
    fast = _canonical_request(teacher, messages, temperature, top_p, max_tokens, sample)
    if fast is not None:
        return sha256_text(fast)
    request = {"teacher": teacher, "messages": messages, "temperature": temperature, "top_p": top_p,
               "max_tokens": max_tokens}
    if sample:
        request["sample"] = sample
    return sha256_text(canonical_json(request))


_string = json.encoder.encode_basestring  # the escaping json.dumps(ensure_ascii=False) uses (C-accelerated)


def _canonical_request(teacher: str, messages: list[dict[str, str]], temperature: float, top_p: float,
                       max_tokens: int, sample: int) -> str | None:
    """canonical_json of the request, written out for the usual shape (a fifth of a cached fan-out's time went to
    json.dumps); None for anything else, which takes the general path. The same text, byte for byte (tested)."""
    if not (type(teacher) is str and type(max_tokens) is int and type(sample) is int
            and all(type(x) is float and math.isfinite(x) or type(x) is int for x in (temperature, top_p))
            and all(type(m) is dict and m.keys() == {"role", "content"} and type(m["role"]) is str
                    and type(m["content"]) is str for m in messages)):
        return None
    turns = ",".join(f'{{"content":{_string(m["content"])},"role":{_string(m["role"])}}}' for m in messages)
    extra = f',"sample":{sample}' if sample else ""
    return (f'{{"max_tokens":{max_tokens},"messages":[{turns}]{extra},"teacher":{_string(teacher)},'
            f'"temperature":{temperature!r},"top_p":{top_p!r}}}')


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


CACHE_ID_FILE = "_cache_id"  # names this cache's generation: a deleted and recreated folder gets a new index
INGEST_ATTEMPTS = 3  # re-lists when a shard vanished mid-refresh (another driver merged it)


def default_index_dir() -> Path:
    """Where drivers keep request indexes: $ORCA_INDEX_DIR, else the user's cache folder."""
    if os.environ.get("ORCA_INDEX_DIR"):
        return Path(os.environ["ORCA_INDEX_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orca-pipeline" / "request-index"


class RequestCache:
    """The request-level cache of one store: REQUEST_SCHEMA shards in `folder` (a path or fsspec URL).

    `refresh` ingests the shards the index has not seen (and compacts); `lookup` answers from the index
    only. The index is `<index_dir>/<url digest>-<cache id>-<schema digest>.sqlite`: a local file,
    rebuilt from the shards when missing, when the folder was recreated, or when the schema changed.
    """

    def __init__(self, folder: str | Path, index_dir: str | Path | None = None, compact: bool = True):
        self.shards = ShardFolder(folder)
        self.folder = self.shards.url  # what workers on any node are given
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
        self.compact = compact
        self.counters: Counter[str] = Counter()  # shards_read, rows_ingested, lookups, merges, shards_merged
        self._index: RequestIndex | None = None
        self._lock = threading.Lock()

    def writer(self, prefix: str, flush_rows: int = 256, flush_seconds: float = 5.0) -> ShardWriter:
        return ShardWriter(self.shards, prefix, REQUEST_SCHEMA, flush_rows, flush_seconds)

    def refresh(self) -> None:
        """Bring the index up to date with the folder: O(new rows + listed files), then compact."""
        with self._lock:
            index = None
            for _ in range(INGEST_ATTEMPTS):
                names = self.shards.names()
                index = self._open_index(create=bool(names))
                if index is None:
                    return  # no cache yet
                known = index.shards()
                vanished = False
                for name in names:
                    if name not in known:
                        try:
                            self.counters["rows_ingested"] += index.ingest(name, self.shards.batches(name, REQUEST_SCHEMA))
                            self.counters["shards_read"] += 1
                        except FileNotFoundError:
                            vanished = True
                index.forget(set(known) - set(names))
                if not vanished:
                    break
            if self.compact and index is not None:
                self._compact(index)

    def lookup(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """request_id -> the row to serve, for the ids the index has (call `refresh` first)."""
        self.counters["lookups"] += 1
        with self._lock:
            return self._index.lookup(ids) if self._index is not None else {}

    def answers_of(self, model: str) -> tuple[int, float | None, float | None, float | None]:
        """(ok answers, mean prompt tokens, completion tokens, latency ms) of a teacher model (call `refresh` first)."""
        with self._lock:
            return self._index.answers_of(model) if self._index is not None else (0, None, None, None)

    def load(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Refresh, then request_id -> row for `ids` (all rows if None: O(cache), for tests and reports)."""
        self.refresh()
        if ids is not None:
            return self.lookup(ids)
        with self._lock:
            return {row["request_id"]: row for row in self._index.rows()} if self._index is not None else {}

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None

    # -- internals ---------------------------------------------------------------------
    def _open_index(self, create: bool) -> RequestIndex | None:
        cache_id = self.shards.read_text(CACHE_ID_FILE)
        if cache_id is None:
            if not create:  # no cache (or it was deleted): nothing to serve
                if self._index is not None:
                    self._index.close()
                    self._index = None
                return None
            cache_id = self.shards.create_text(CACHE_ID_FILE, uuid.uuid4().hex)
        schema_digest = sha256_text(str(REQUEST_SCHEMA))[:8]
        url_digest = sha256_text(self.shards.url)[:16]
        path = self.index_dir / f"{url_digest}-{cache_id}-{schema_digest}.sqlite"
        if self._index is None or self._index.path != path:
            if self._index is not None:
                self._index.close()
            for stale in self.index_dir.glob(f"{url_digest}-*.sqlite"):  # an older generation of this folder
                if stale != path:
                    for leftover in (stale, Path(f"{stale}-wal"), Path(f"{stale}-shm")):
                        with contextlib.suppress(OSError):
                            leftover.unlink()
            try:
                self._index = RequestIndex(path, REQUEST_SCHEMA)
            except sqlite3.DatabaseError:  # a damaged index file: it is only a cache of the shards
                log.warning("request index %s is unreadable; rebuilding it from the shards", path)
                path.unlink(missing_ok=True)
                self._index = RequestIndex(path, REQUEST_SCHEMA)
        return self._index

    def _compact(self, index: RequestIndex) -> None:
        """Merge same-tier shards until no tier is full; each merge is published before its inputs go."""
        with self.shards.compaction_turn() as mine:
            if not mine:
                return  # another driver on this folder is compacting
            self.shards.remove_stale_temps()
            while True:
                listed = set(self.shards.names())  # fresh: only the compactor removes shards
                known = {name: rows for name, rows in index.shards().items() if name in listed}
                groups = compaction_groups(known)
                merged = 0
                for group in groups:
                    try:
                        name, rows = merge(self.shards, group, REQUEST_SCHEMA)
                    except FileNotFoundError:
                        continue  # merged meanwhile by a driver elsewhere (object stores have no lock)
                    merged += 1
                    index.record(name, rows)  # its rows are the group's, already ingested
                    self.shards.remove(group)
                    index.forget(group)
                    self.counters["merges"] += 1
                    self.counters["shards_merged"] += len(group)
                if not merged:
                    return
