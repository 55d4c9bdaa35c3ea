"""The request cache: lookup semantics, concurrent writers, crash safety, and lookup cost independent of size.

Writers and compactors run as real subprocesses and are killed with SIGKILL;
file opens are counted by a Python audit hook (every Parquet read goes
through `open`), not by the cache's own counters.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orca_core.request_shards import ShardFolder, compaction_groups, tier
from orca_core.traces import RequestCache


def row(rid: str, status: str = "ok", at: str = "00") -> dict:
    return {"request_id": rid, "teacher_model": "m", "response": f"{rid}@{at}",
            "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 5, "cost_usd": 0.001,
            "latency_ms": 10.0, "attempts": 1, "status": status, "created_at": f"2026-01-01T00:00:{at}.000+00:00"}


def write_shards(cache: RequestCache, shards: list[list[dict]]) -> None:
    writer = cache.writer("t", flush_rows=10**9, flush_seconds=10**9)
    for rows in shards:
        for r in rows:
            writer.add(r)
        writer.flush()


def served(cache: RequestCache, ids) -> dict[str, tuple[str, str]]:
    cache.refresh()
    return {rid: (r["status"], r["created_at"][17:19]) for rid, r in cache.lookup(ids).items()}


def raw_rows(url: str | Path) -> Counter:
    """Every row of every published shard (duplicates counted)."""
    folder, rows = ShardFolder(url), Counter()
    for name in folder.names():
        with folder.fs.open(folder.file(name), "rb") as handle:
            rows.update(tuple(r.values()) for r in pq.read_table(handle).to_pylist())
    return rows


# -- semantics -----------------------------------------------------------------------
HISTORY = [  # (request id, status, created second), in the order they were written
    ("a", "failed:timeout", "01"), ("a", "ok", "05"), ("a", "ok", "03"), ("a", "failed:http_500", "09"),
    ("b", "failed:timeout", "02"), ("b", "failed:content_filter", "07"), ("b", "failed:http_500", "04"),
    ("c", "ok", "06"),
    ("d", "ok", "08"), ("d", "ok", "08"),  # the same answer twice (an in-flight duplicate)
]
GOLDEN = {"a": ("ok", "03"), "b": ("failed:content_filter", "07"), "c": ("ok", "06"), "d": ("ok", "08")}


@pytest.mark.parametrize("order", ["as_written", "reversed", "one_per_refresh"])
def test_ok_beats_failure_oldest_ok_wins_newest_failure_when_no_ok(tmp_path, order):
    cache = RequestCache(tmp_path / "requests", index_dir=tmp_path / "index")
    rows = [row(rid, status, at) for rid, status, at in HISTORY]
    if order == "reversed":
        rows.reverse()
    if order == "one_per_refresh":  # rows arrive over many refreshes, each ingesting one new shard
        for r in rows:
            write_shards(cache, [[r]])
            cache.refresh()
    else:
        write_shards(cache, [rows[:4], rows[4:7], rows[7:]])
    assert served(cache, "abcdz") == GOLDEN  # z: never asked
    # The served row is the whole row: the answer and its accounting.
    assert cache.lookup(["a"])["a"] == row("a", "ok", "03")
    assert {rid: (r["status"], r["created_at"][17:19]) for rid, r in cache.load().items()} == GOLDEN
    # A fresh index rebuilt from the shards alone agrees.
    assert served(RequestCache(tmp_path / "requests", index_dir=tmp_path / "other-index"), "abcd") == GOLDEN


def test_a_recreated_folder_is_not_answered_from_its_old_index(tmp_path):
    cache = RequestCache(tmp_path / "requests", index_dir=tmp_path / "index")
    write_shards(cache, [[row("a"), row("b")]])
    assert set(served(cache, "ab")) == {"a", "b"}
    shutil.rmtree(tmp_path / "requests")  # the user drops every answer
    assert served(cache, "ab") == {}
    write_shards(cache, [[row("b", at="30")]])
    assert served(cache, "ab") == {"b": ("ok", "30")}
    assert len(list((tmp_path / "index").glob("*.sqlite"))) == 1  # the old generation's index is gone


def test_a_damaged_index_is_rebuilt_from_the_shards(tmp_path):
    cache = RequestCache(tmp_path / "requests", index_dir=tmp_path / "index")
    write_shards(cache, [[row("a"), row("b", "failed:timeout")]])
    assert served(cache, "ab") == {"a": ("ok", "00"), "b": ("failed:timeout", "00")}
    cache.close()
    for path in (tmp_path / "index").iterdir():
        path.write_bytes(b"not a database" * 100)
    assert served(RequestCache(tmp_path / "requests", index_dir=tmp_path / "index"), "ab") == {
        "a": ("ok", "00"), "b": ("failed:timeout", "00")}


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_object_store_folder_without_rename(tmp_path, request, store):
    """No rename, no lock: shards are uploaded whole; compaction still merges; the semantics hold.
    `memory`: fsspec's in-process filesystem; `s3`: a real S3 server (SeaweedFS) on 127.0.0.1."""
    if store == "s3":
        url = f"{request.getfixturevalue('s3_root')}/requests"
    else:
        url = f"memory://orca-test-{os.getpid()}-{random.randrange(10**9)}/requests"
    cache = RequestCache(url, index_dir=tmp_path / "index")
    assert cache.folder == url
    write_shards(cache, [[row(rid, status, at)] for rid, status, at in HISTORY])
    assert served(cache, "abcdz") == GOLDEN
    write_shards(cache, [[row(f"id{i}", at=f"{i % 60:02d}")] for i in range(60)])
    assert served(cache, ["id0", "id59"]) == {"id0": ("ok", "00"), "id59": ("ok", "59")}
    assert len(ShardFolder(url).names()) < 16  # 70 one-row shards merged by tiers of 8
    assert sum(raw_rows(url).values()) == 70  # every row kept
    assert served(RequestCache(url, index_dir=tmp_path / "fresh"), "abcd") == GOLDEN


def test_compaction_plan_is_size_tiered():
    assert [tier(n) for n in (1, 7, 8, 63, 64, 511, 512)] == [0, 0, 1, 1, 2, 2, 3]
    shards = {f"s{i:02d}": 64 for i in range(17)} | {"big": 1 << 18, "mid": 600}
    assert compaction_groups(shards) == [[f"s{i:02d}" for i in range(8)], [f"s{i:02d}" for i in range(8, 16)]]


# -- concurrency and crashes ---------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from test_request_cache import row
    from orca_core.traces import RequestCache
    k, n = int(sys.argv[2]), int(sys.argv[4])
    writer = RequestCache(sys.argv[1]).writer(f"w{k}", flush_rows=int(sys.argv[5]), flush_seconds=3600)
    for i in range(n):
        writer.add(row(f"id{i}", "ok" if (i + k) % 3 else "failed:timeout", f"{(i * 7 + k * 13) % 60:02d}"))
        if writer.shards and not writer.rows:  # just flushed: say how many rows are durable
            print(writer.shards * writer.flush_rows, flush=True)
    writer.flush()
""")


def expected_winner(i: int, writers: range) -> tuple[str, str]:
    rows = [("ok" if (i + k) % 3 else "failed:timeout", f"{(i * 7 + k * 13) % 60:02d}") for k in writers]
    ok = [at for status, at in rows if status == "ok"]
    return ("ok", min(ok)) if ok else ("failed:timeout", max(at for _, at in rows))


def test_writers_in_several_processes_while_the_driver_refreshes_and_compacts(tmp_path):
    folder, writers, n = tmp_path / "requests", range(3), 240
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(k), str(Path(__file__).parent), str(n), "7"],
                              stdout=subprocess.DEVNULL) for k in writers]
    cache = RequestCache(folder, index_dir=tmp_path / "index")
    while any(p.poll() is None for p in procs):
        cache.refresh()  # ingests and compacts while shards keep arriving
        time.sleep(0.02)
    assert [p.returncode for p in procs] == [0] * len(writers)
    ids = [f"id{i}" for i in range(n)]
    assert served(cache, ids) == {f"id{i}": expected_winner(i, writers) for i in range(n)}
    assert cache.counters["merges"] > 0
    assert sum(raw_rows(folder).values()) == len(writers) * n  # every row kept once, merged or not
    assert len(ShardFolder(folder).names()) < len(writers) * n // 7 // 3  # far fewer files than flushes


def test_a_writer_killed_with_sigkill_loses_only_its_unflushed_rows(tmp_path):
    folder = tmp_path / "requests"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), "1", str(Path(__file__).parent), "100000", "10"],
                            stdout=subprocess.PIPE, text=True)
    durable = 0
    while durable < 200:
        durable = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = RequestCache(folder, index_dir=tmp_path / "index")
    saved = sorted(int(rid[2:]) for rid in cache.load())
    assert saved == list(range(len(saved)))  # whole shards only: a prefix of what was written
    assert len(saved) % 10 == 0 and 200 <= len(saved) < 100000  # what it reported durable, and not the rest


COMPACTOR = textwrap.dedent("""
    import sys
    from orca_core.traces import RequestCache
    folder, index = sys.argv[1], sys.argv[2]
    RequestCache(folder, index_dir=index, compact=False).refresh()  # ingest
    print("ingested", flush=True)
    RequestCache(folder, index_dir=index).refresh()  # compact
    print("compacted", flush=True)
""")


def run_compactor(folder: Path, index: Path, kill_after: float | None) -> float:
    """Compact in a subprocess, SIGKILLed `kill_after` s into compaction; returns the seconds it compacted."""
    proc = subprocess.Popen([sys.executable, "-c", COMPACTOR, str(folder), str(index)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ingested"
    started = time.monotonic()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    return time.monotonic() - started


def test_compaction_killed_at_random_points_loses_nothing(tmp_path):
    folder, rng = tmp_path / "requests", random.Random(13)
    cache = RequestCache(folder, index_dir=tmp_path / "driver-index", compact=False)
    rows = [row(f"id{i % 1000}", rng.choice(["ok", "ok", "failed:timeout"]), f"{rng.randrange(60):02d}") for i in range(2000)]
    cuts = sorted(rng.sample(range(1, len(rows)), 199))
    write_shards(cache, [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)])])  # 200 shards of 1-40 rows
    ids = sorted({r["request_id"] for r in rows})
    golden = served(cache, ids)
    original, shards_before = raw_rows(folder), len(ShardFolder(folder).names())

    calibration = tmp_path / "calibration"
    shutil.copytree(folder, calibration)
    full = run_compactor(calibration, tmp_path / "calibration-index", None)  # the compaction alone, uninterrupted
    counts = []
    for _ in range(3):
        run_compactor(folder, tmp_path / "killed-index", rng.uniform(0.05, 0.4) * full)  # 3 x 0.4: mostly mid-way
        now = raw_rows(folder)
        assert set(now) == set(original) and all(now[r] >= n for r, n in original.items())  # nothing lost
        counts.append(len(ShardFolder(folder).names()))
        fresh = RequestCache(folder, index_dir=tmp_path / f"fresh{len(counts)}", compact=False)
        assert served(fresh, ids) == golden  # rebuilt from the shards as the kill left them
    run_compactor(folder, tmp_path / "killed-index", None)
    final = len(ShardFolder(folder).names())
    assert served(RequestCache(folder, index_dir=tmp_path / "killed-index"), ids) == golden  # the killed one's index
    assert served(cache, ids) == golden
    assert final < 30 < shards_before
    assert any(final < c < shards_before for c in counts), counts  # at least one kill landed mid-way


# -- cost --------------------------------------------------------------------------------------
class ParquetOpens:
    """Counts Parquet files opened under a folder (a Python audit hook: hooks cannot be removed, so it is
    switched on and off)."""

    def __init__(self):
        self.folder: str | None = None
        self.count = 0
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.folder and event == "open" and str(args[0]).startswith(self.folder) and str(args[0]).endswith(".parquet"):
            self.count += 1

    def during(self, folder: Path, action) -> int:
        self.folder, self.count = str(folder), 0
        try:
            action()
        finally:
            self.folder = None
        return self.count


OPENS = ParquetOpens()


@pytest.mark.parametrize("shards", [20, 250])
def test_resolving_a_chunk_opens_only_new_shards_whatever_the_cache_size(tmp_path, shards):
    folder = tmp_path / "requests"
    cache = RequestCache(folder, index_dir=tmp_path / "index", compact=False)
    write_shards(cache, [[row(f"id{s}-{i}") for i in range(64)] for s in range(shards)])
    chunk = [f"id{s}-{i}" for s in range(shards) for i in range(64)][:: max(1, shards * 64 // 2000)][:2000]

    assert OPENS.during(folder, cache.refresh) == shards  # the first refresh reads each shard once
    for _ in range(3):
        found = {}
        assert OPENS.during(folder, lambda: found.update(cache.load(chunk))) == 0
        assert len(found) == len(chunk)
    write_shards(cache, [[row("new1")], [row("new2")]])
    assert OPENS.during(folder, lambda: found.update(cache.load(["new1", "new2"]))) == 2  # only what is new
    assert {"new1", "new2"} <= set(found)



ALLOCATOR_PROBE = textwrap.dedent("""
    import sys
    from orca_core.traces import RequestCache
    import pyarrow as pa
    cache = RequestCache(sys.argv[1], index_dir=sys.argv[2])
    writer = cache.writer("t", flush_rows=50, flush_seconds=10**9)
    for i in range(500):
        writer.add({"request_id": str(i), "teacher_model": "m", "response": "x" * 200, "status": "ok",
                    "created_at": "2026-01-01T00:00:00.000+00:00"})
    cache.refresh()  # reads every shard and merges them (compaction)
    print(pa.default_memory_pool().backend_name, pa.mimalloc_memory_pool().max_memory(), len(cache.load()))
""")


@pytest.mark.parametrize("preset", [None, "mimalloc"])
def test_shard_io_uses_the_system_allocator_unless_the_user_sets_one(tmp_path, preset):
    """Parquet reader/writer properties take Arrow's C++ default pool, which pyarrow cannot be handed: importing
    orca_core makes it the system allocator (mimalloc kept that memory: a driver's RSS grew with its run)."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if preset:
        env["ARROW_DEFAULT_MEMORY_POOL"] = preset
    done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, str(tmp_path / "requests"), str(tmp_path / "index")],
                          env=env, capture_output=True, text=True, check=True)
    backend, mimalloc_peak, rows = done.stdout.split()
    assert int(rows) == 500
    if preset:  # the user's setting wins, and the probe sees mimalloc used when it is
        assert (backend, int(mimalloc_peak) > 0) == ("mimalloc", True)
    else:
        assert (backend, int(mimalloc_peak)) == ("system", 0)
