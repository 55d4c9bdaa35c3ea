"""How work and permits flow in the fan-out: leased rate limits, provider headers, the streaming loop,
a SIGKILLed driver, and a real multi-node Ray cluster losing a node.

Real components only: the oracle server on 127.0.0.1 (or a small aiohttp server playing a provider
that sends rate-limit headers), the in-process executor, real Ray runtimes in subprocesses (each in
its own temp dir, so they never touch another Ray on the machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from orca_core import steps
from orca_core.context import StepContext
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.store import ArtifactStore
from orca_core.teacher.client import TeacherClient
from orca_core.teacher.headers import RateLimitHeaders, duration_s, rate_limit_headers, retry_after_seconds
from orca_core.teacher.dispatch import window
from orca_core.teacher.jobs import Progress, TraceJob
from orca_core.teacher.gate import Gate
from orca_core.teacher.limiter import GateLost, LeasedLimiter, gate_caller
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server
from orca_core.teacher.worker import TraceWorker
from orca_core.traces import TRACES_FILE, RequestCache

FAMILIES = "[basic_arithmetic, leg_counting, family_relationships_mc, needle_haystack]"  # large question spaces


# -- provider headers: golden values ------------------------------------------------------------
def test_durations_and_retry_after_in_every_form():
    assert [duration_s(t) for t in ["1s", "6m0s", "20ms", "1h2m3.5s", "0.5", "7", "2m", "1m30s"]] == \
        [1.0, 360.0, 0.02, 3723.5, 0.5, 7.0, 120.0, 90.0]
    assert [duration_s(t) for t in ["", None, "6m0", "s", "1d", "1s2"]] == [None] * 6
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=timezone.utc).timestamp()
    assert retry_after_seconds({"Retry-After": "120"}) == 120.0
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now) == 30.0
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT"}, now) == 0.0  # past: at once
    assert retry_after_seconds({"retry-after-ms": "1500", "Retry-After": "2"}) == 1.5  # the finer one wins
    assert retry_after_seconds({"Retry-After": "soon"}) is None and retry_after_seconds({}) is None
    assert rate_limit_headers({"content-type": "application/json"}) == RateLimitHeaders()
    assert rate_limit_headers({
        "x-ratelimit-limit-requests": "10000", "x-ratelimit-limit-tokens": "2000000",
        "x-ratelimit-remaining-requests": "9999", "x-ratelimit-remaining-tokens": "1999234",
        "x-ratelimit-reset-requests": "6ms", "X-RateLimit-Reset-Tokens": "1m2.5s",
    }) == RateLimitHeaders(10000, 2000000, 9999, 1999234, 0.006, 62.5)


# -- the leased limiter ---------------------------------------------------------------------------
def leased(n: int, max_cost_usd: float | None = None, price_per_token: float = 0.0, **limits):
    gate = Gate({"t": limits}, max_cost_usd)
    return gate, [LeasedLimiter(gate_caller(gate), "t", f"w{i}", price_per_token) for i in range(n)]


async def requests(limiter: LeasedLimiter, count: int, concurrency: int, seconds: float = 0.0,
                   cost: float = 0.0, tokens: int = 10, seen: list | None = None) -> int:
    """`count` requests through `limiter`, `concurrency` at a time; returns how many were admitted."""
    admitted = 0
    todo = list(range(count))

    async def one() -> None:
        nonlocal admitted
        while todo:
            todo.pop()
            if not await limiter.acquire(tokens):
                return
            admitted += 1
            if seen is not None:
                seen.append(time.monotonic())
            await asyncio.sleep(seconds)
            await limiter.release(tokens, tokens, cost)

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return admitted


def test_two_workers_share_one_rate_smoothly_with_few_gate_calls():
    async def go():
        gate, (a, b) = leased(2, rpm=1200, max_concurrency=100)  # 20 per second for both together
        seen: list[float] = []
        started = time.monotonic()
        await asyncio.gather(requests(a, 30, 8, seen=seen), requests(b, 30, 8, seen=seen))
        return time.monotonic() - started, sorted(t - started for t in seen), gate.stats()["endpoints"]["t"]

    elapsed, times, gate = asyncio.run(go())
    assert 2.6 <= elapsed <= 3.6  # 60 at 20 per second, from an (almost) empty bucket
    assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 22  # paced (+ jitter)
    assert 60 <= gate["granted"] <= 70 and gate["leases"] <= 60 / 4  # blocks of half a second, split between two


def test_a_fast_endpoint_costs_one_gate_call_per_block_not_per_request():
    async def go():
        gate, workers = leased(2, rpm=6_000_000, max_concurrency=64)
        await asyncio.gather(*(requests(w, 2000, 32, seconds=0.001) for w in workers))
        return gate.stats()["endpoints"]["t"]

    gate = asyncio.run(go())
    assert gate["granted"] >= 4000 and gate["leases"] <= 4000 / 16


def test_concurrency_cap_holds_across_workers_and_is_shared():
    async def go():
        gate, workers = leased(2, rpm=600_000, max_concurrency=5)
        peak, used = 0, set()

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, sum(w.in_flight for w in workers))
                used.update(w.worker for w in workers if w.in_flight)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(requests(w, 40, 8, seconds=0.02) for w in workers))
        watcher.cancel()
        return peak, used

    peak, used = asyncio.run(go())
    assert peak == 5 and used == {"w0", "w1"}


def test_a_pause_reaches_the_other_workers_and_the_budget_refuses():
    async def go():
        gate, (a, b) = leased(2, rpm=600_000)
        await a.pause(0.5, "rate_limited")  # a 429 seen by a: b must wait too
        started = time.monotonic()
        assert await b.acquire(10)
        waited = time.monotonic() - started
        await b.release(10, 10, 0.0)
        gate2, (c,) = leased(1, max_cost_usd=1.0, rpm=600_000)
        assert await c.acquire(10)
        await c.release(10, 10, 1.5)
        return waited, await c.acquire(10), gate2.stats()

    waited, admitted, stats = asyncio.run(go())
    assert waited >= 0.45 and admitted is False and stats["spent_usd"] == 1.5 and not stats["budget_left"]


def test_reserved_dollars_stop_every_worker_at_the_budget():
    async def go():
        # Each request may cost 200 tokens x $0.001 = $0.2 and does: the cap of $1 admits exactly 5.
        gate, workers = leased(4, max_cost_usd=1.0, price_per_token=0.001, rpm=600_000, max_concurrency=64)
        admitted = await asyncio.gather(*(requests(w, 20, 8, seconds=0.01, cost=0.2, tokens=200) for w in workers))
        return sum(admitted), gate.stats()

    admitted, stats = asyncio.run(go())
    assert admitted == 5 and stats["spent_usd"] == pytest.approx(1.0) and not stats["budget_left"]


def test_a_worker_whose_gate_is_gone_stops_without_sending(tmp_path):
    # What a Ray actor sees when its driver (and so the gate actor) died: every lease call fails.
    async def gone(*args):
        raise ConnectionError("the gate actor is dead")

    async def go():
        endpoint = TeacherEndpoint(kind="vllm", model="m", base_url="http://127.0.0.1:9/v1", rpm=60000)
        worker = TraceWorker("w0", {"t": endpoint}, {"t": endpoint.base_url}, {"t": LeasedLimiter(gone, "t", "w0")},
                             str(tmp_path / "requests"), concurrency=4)
        job = TraceJob(source_id="s1", source="proc", task_name="task", template_type="zs_opt", sub_collection="cot",
                       stage="orca1", teacher_role="t", strategy="", system_message_id=1, teacher_system="",
                       student_system="", user="2+2?", reference="4")
        await worker.submit([(i, Progress(job)) for i in range(8)])
        started = time.monotonic()
        with pytest.raises(GateLost, match="does not answer"):
            while True:
                await worker.durable(timeout=5)
        waited = time.monotonic() - started
        return waited, await worker.close()

    waited, stats = asyncio.run(go())
    assert waited < 3 and stats.get("requests", 0) == 0 and stats["stopped"] == 1  # 3 lease attempts over 1.5 s


# -- the client against a provider that sends rate-limit headers ------------------------------------
COMPLETION = {"choices": [{"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 1}}


def provider_calls(replies: list[tuple[int, dict[str, str]]], calls: int) -> tuple[list[float], dict, LeasedLimiter]:
    """Serve `replies` in order (status, headers) on 127.0.0.1; make `calls` client calls; arrival times."""
    arrivals: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        status, headers = replies[min(len(arrivals), len(replies)) - 1]
        body = COMPLETION if status == 200 else {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}
        return web.json_response(body, status=status, headers=headers)

    async def go():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        endpoint = TeacherEndpoint(kind="vllm", model="m", base_url=f"http://127.0.0.1:{port}/v1", rpm=60000,
                                   retry_base_s=0.01, max_attempts=3)
        gate = Gate({"t": {"rpm": 60000}})
        limiter = LeasedLimiter(gate_caller(gate), "t", "w0")
        try:
            async with aiohttp.ClientSession() as session:
                client = TeacherClient(endpoint, endpoint.base_url, limiter, session)
                results = [await client.call([{"role": "user", "content": "2+2?"}]) for _ in range(calls)]
        finally:
            await runner.cleanup()
        assert all(r.status == "ok" for r in results)
        return gate.stats()["endpoints"]["t"], limiter

    gate, limiter = asyncio.run(go())
    return arrivals, gate, limiter


def test_exhausted_ratelimit_headers_pause_until_the_reset_and_lower_the_rate():
    spent = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
             "x-ratelimit-reset-requests": "700ms"}
    fine = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "598"}
    arrivals, gate, limiter = provider_calls([(200, spent), (200, fine)], calls=2)
    assert arrivals[1] - arrivals[0] >= 0.68  # waited for the window's reset, without a 429
    assert gate["rpm_lowered"] == 1 and limiter.counts["pause:ratelimit_remaining"] == 1


def test_retry_after_ms_times_the_retry_of_a_429():
    arrivals, gate, limiter = provider_calls([(429, {"retry-after-ms": "400", "Retry-After": "1"}), (200, {})], calls=1)
    assert len(arrivals) == 2 and 0.38 <= arrivals[1] - arrivals[0] < 0.9
    assert limiter.counts["pause:rate_limited"] == 1


# -- fan-outs against the oracle --------------------------------------------------------------------
def start_oracle(sources: Path, **settings):
    endpoint = lambda model: TeacherEndpoint(kind="oracle", model=model, rpm=1, oracle=settings)  # noqa: E731
    return oracle_server({"assistant": endpoint("oracle-assistant"), "strong": endpoint("oracle-strong")},
                         [sources / "train.parquet"])


def oracle_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


def overrides(store: Path, url: str, per_family: int, *extra: str, **teacher) -> list[str]:
    fields = {"kind": "vllm", "base_url": url, "rpm": 600000, "max_concurrency": 64, "retry_base_s": 0.01,
              "retry_max_s": 0.05, **teacher}
    flow = ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    return [f"store.root={store}", f"sources.procedural.families={FAMILIES}",
            f"sources.procedural.train_per_family={per_family}", "sources.procedural.heldout_per_family=1",
            "prompts.strong_fraction=0", f"teachers.assistant={{model: oracle-assistant, {flow}}}",
            f"teachers.strong={{model: oracle-strong, {flow}}}", *extra]


def with_sources(store: Path, per_family: int) -> Path:
    """The sources artifact of `overrides(store, ..., per_family)`, built in `store` (the oracle's answer book)."""
    recipe = load_recipe("smoke", overrides(store, "http://127.0.0.1:9/v1", per_family))
    return Path(steps.run_step(ArtifactStore(recipe.store.root), steps.SOURCES, recipe).ref.url)


class Recording:
    """A fan-out runner that keeps the reports of the runner it wraps."""

    def __init__(self, runner):
        self.runner, self.reports = runner, []

    def run(self, *args):
        self.reports.append(self.runner.run(*args))
        return self.reports[-1]


def traces(recipe, runner):
    store = ArtifactStore(recipe.store.root)
    ctx = StepContext(fanout=runner, request_cache=Path(store.url("requests")), sink=lambda *a: None)
    return steps.run_step(store, steps.TRACES_ORCA1, recipe, ctx=ctx)


def cache_rows(store: Path, index_dir: Path) -> list[dict]:
    return list(RequestCache(store / "requests", index_dir=index_dir, compact=False).load().values())


def at(row: dict) -> float:
    return datetime.fromisoformat(row["created_at"]).timestamp()


def test_oracle_rpm_is_sustained_across_two_workers_without_a_429(tmp_path):
    sources = with_sources(tmp_path / "store", 180)
    rpm = 3000  # 50 per second, enforced by the oracle over a sliding 10 s window
    with start_oracle(sources, rpm_limit=rpm, rate_window_s=10.0, latency_ms=20) as urls:
        recipe = load_recipe("smoke", overrides(tmp_path / "store", urls["assistant"], 180, rpm=rpm))
        runner = Recording(LocalFanoutRunner(recipe, workers=2))
        traces(recipe, runner)
        served = oracle_stats(urls["assistant"])
    times = sorted(at(row) for row in cache_rows(tmp_path / "store", tmp_path / "index"))
    sustained = (len(times) - 1) / (times[-1] - times[0]) * 60  # first to last answer: ~15 s
    assert len(times) == 720 and served["by_status"] == {"200": 720}  # not one 429
    assert sustained >= 0.95 * rpm
    worker = runner.reports[0].worker
    assert worker["requests"] == 720 and worker["leases"] <= 720 / 5  # permits come in blocks


def test_a_slow_request_does_not_stall_its_worker(tmp_path):
    sources = with_sources(tmp_path / "store", 100)
    # Some requests hang (timeout fault): the client gives up after 1.5 s and retries. Meanwhile the same
    # worker must keep taking new jobs: it holds at most window(8, 4) = 16 not yet durable.
    with start_oracle(sources, faults={"timeout": 0.01}, timeout_sleep_s=5.0, latency_ms=10) as urls:
        recipe = load_recipe("smoke", overrides(tmp_path / "store", urls["assistant"], 100, "ray.actor_concurrency=8",
                                                "ray.flush_rows=4", timeout_s=1.5, max_attempts=3))
        traces(recipe, LocalFanoutRunner(recipe))
    rows = cache_rows(tmp_path / "store", tmp_path / "index")
    slow = [r for r in rows if r["attempts"] >= 2 and r["status"] == "ok"]
    assert len(rows) == 400 and slow
    for row in slow:
        began, ended = at(row) - row["latency_ms"] / 1000, at(row)
        answered_meanwhile = sum(1 for r in rows if began < at(r) < ended)
        # A worker stalled by the slow one would answer fewer than its window meanwhile.
        assert answered_meanwhile >= 2 * window(8, 4), (row["latency_ms"], answered_meanwhile)


# -- Ray: a SIGKILLed driver, a lost node ------------------------------------------------------------
@pytest.fixture
def ray_dir():
    """A short temp dir for private Ray runtimes (their socket paths must stay under 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="orca-flow-ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


KILLED_FANOUT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import ray
    from orca_core import steps
    from orca_core.context import StepContext
    from orca_core.recipe import load_recipe
    from orca_core.store import ArtifactStore
    from tasks.fanout import RayFanoutRunner
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=sys.argv[1])
    recipe = load_recipe("smoke", sys.argv[2:])
    store = ArtifactStore(recipe.store.root)
    ctx = StepContext(fanout=RayFanoutRunner(recipe), request_cache=Path(store.url("requests")))
    print("ROWS", steps.run_step(store, steps.TRACES_ORCA1, recipe, ctx=ctx).rows, flush=True)
""")


def test_sigkill_of_the_driver_then_resume_pays_twice_at_most_the_in_flight_limit(tmp_path, python, ray_dir):
    sources = with_sources(tmp_path / "store", 60)
    # In-flight limit: 2 actors x (8 in flight + 8 answered, not yet flushed) = 32 requests (jobs queued are not paid).
    env = {**os.environ, "ORCA_INDEX_DIR": str(tmp_path / "driver-index"), "RAY_AUTH_MODE": "disabled"}
    with start_oracle(sources, latency_ms=40) as urls:
        url = urls["assistant"]
        args = overrides(tmp_path / "store", url, 60, "ray.fanout_actors=2", "ray.actor_concurrency=8",
                         "ray.flush_rows=8", "ray.flush_seconds=0.5", rpm=1200, max_concurrency=16)
        limit = 2 * (8 + 8)
        cache = RequestCache(tmp_path / "store" / "requests", index_dir=tmp_path / "index", compact=False)
        proc = subprocess.Popen([python, "-c", KILLED_FANOUT, str(ray_dir / "a"), *args], start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + 120
        while len(cache.load()) < 40:  # killed mid-way: some answers saved, most not yet
            assert proc.poll() is None and time.monotonic() < deadline, "the fan-out ended before it could be killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Ray's workers die with their owner moments later; snapshot once the cache and server are still for 2 s.
        saved, served_before, still_since = None, None, time.monotonic()
        while time.monotonic() - still_since < 2.0:
            now = (set(cache.load()), oracle_stats(url)["ok_by_request_id"])
            if now != (saved, served_before):
                (saved, served_before), still_since = now, time.monotonic()
            time.sleep(0.25)
        resumed = subprocess.run([python, "-c", KILLED_FANOUT, str(ray_dir / "b"), *args], capture_output=True,
                                 text=True, timeout=300, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        served = oracle_stats(url)["ok_by_request_id"]

    traces_rows = pq.read_table(next((tmp_path / "store" / "traces-orca1").glob("*/" + TRACES_FILE))).to_pylist()
    ids = [t["request_id"] for t in traces_rows]
    assert len(ids) == 240 == len(set(ids)) and all(t["status"] == "ok" for t in traces_rows)
    assert sum(served.values()) - sum(served_before.values()) == len(set(ids) - saved)  # resume sent what was missing
    paid_twice = sum(served.values()) - len(served)
    assert paid_twice <= limit and set(served) == set(ids)
    assert {rid for rid, n in served.items() if n > 1} <= set(served_before) - saved  # only answers lost at the kill


MULTI_NODE = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from orca_core import steps
    from orca_core.context import StepContext
    from orca_core.recipe import load_recipe
    from orca_core.store import ArtifactStore
    from orca_core.traces import RequestCache
    from tasks.fanout import RayFanoutRunner

    index_dir, remove_after, *overrides = sys.argv[1:]
    out = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})  # driver, gate
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]  # room for two 0.5-CPU actors each
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    out["driver"] = ray.get_runtime_context().get_node_id()  # Ray attaches it to one of the nodes on this IP
    recipe = load_recipe("smoke", overrides)
    store = ArtifactStore(recipe.store.root)
    runner = RayFanoutRunner(recipe)

    def run():
        try:
            ctx = StepContext(fanout=runner, request_cache=Path(store.url("requests")))
            out["rows"] = steps.run_step(store, steps.TRACES_ORCA1, recipe, ctx=ctx).rows
        except Exception as err:
            out["error"] = repr(err)

    thread = threading.Thread(target=run)
    thread.start()
    cache = RequestCache(store.url("requests"), index_dir=index_dir, compact=False)
    while thread.is_alive() and "removed" not in out:
        placed = dict(runner.executor.nodes) if runner.executor else {}
        if {"actor0", "actor1"} <= set(placed) and len(cache.load()) >= int(remove_after):
            # A node with an actor, not the driver's (its loss would end the driver: not this test's case).
            victim = next(n for n in nodes if n.node_id in (placed["actor0"], placed["actor1"])
                          and n.node_id != out["driver"])
            out["removed"], out["saved_at_removal"] = victim.node_id, len(cache.load())
            cluster.remove_node(victim, allow_graceful=False)  # a crash: raylet and workers killed
        time.sleep(0.05)
    thread.join()
    out["nodes"] = runner.executor.nodes
    out["worker"] = {k: v for k, v in runner.report.worker.items() if k in ("workers_lost", "requests")} \\
        if runner.report else {}
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


def test_multi_node_cluster_loses_a_node_mid_run_and_nothing_is_lost(tmp_path, python, ray_dir):
    sources = with_sources(tmp_path / "store", 100)
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir), "ORCA_INDEX_DIR": str(tmp_path / "driver-index"),
           "RAY_AUTH_MODE": "disabled"}
    with start_oracle(sources, latency_ms=50) as urls:
        url = urls["assistant"]
        args = overrides(tmp_path / "store", url, 100, "ray.fanout_actors=2", "ray.actor_cpus=0.5",
                         "ray.actor_concurrency=8", "ray.flush_rows=8", "ray.flush_seconds=0.5",
                         rpm=3000, max_concurrency=16)
        done = subprocess.run([python, "-c", MULTI_NODE, str(tmp_path / "index"), "80", *args],
                              capture_output=True, text=True, timeout=240, env=env)
        served = oracle_stats(url)["ok_by_request_id"]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert "error" not in result and result["removed"], (result, done.stderr[-3000:])
    first_two = {result["nodes"]["actor0"], result["nodes"]["actor1"]}
    assert len(first_two) == 2 and result["nodes"]["gate"] == result["driver"]  # spread; the gate with the driver
    assert result["removed"] in first_two and result["worker"]["workers_lost"] == 1
    replacements = {node for name, node in result["nodes"].items() if name not in ("actor0", "actor1", "gate")}
    assert replacements == first_two - {result["removed"]}  # the replacement runs on the node left

    traces_rows = pq.read_table(next((tmp_path / "store" / "traces-orca1").glob("*/" + TRACES_FILE))).to_pylist()
    ids = {t["request_id"] for t in traces_rows}
    assert len(traces_rows) == 400 == len(ids) and all(t["status"] == "ok" for t in traces_rows)
    saved = {rid for rid, row in RequestCache(tmp_path / "store" / "requests", index_dir=tmp_path / "index",
                                              compact=False).load().items() if row["status"] == "ok"}
    assert saved >= set(served) == ids  # every answer the oracle gave is in the cache: no ok row lost
    paid_twice = sum(served.values()) - len(served)
    assert paid_twice <= 8 + 8  # at most the lost actor's window: its in-flight requests were re-sent
    assert Counter(served.values()).keys() <= {1, 2}
