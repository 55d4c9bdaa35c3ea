"""Teacher fan-out figures against the oracle on 127.0.0.1. Prints JSON.

    .venv/bin/python bench/fanout.py [--quick] [--only NAME ...]
    .venv/bin/python bench/fanout.py --scale [--sizes 10000,100000,1000000]

- sustained: throughput as a fraction of the oracle's enforced RPM (target >= 0.95),
  the client configured with the same RPM (what a user sets for a provider);
- ray_vs_asyncio: req/s against an unlimited oracle, Ray actors (2 x 32 in flight)
  versus one process with one asyncio worker (64 in flight): the ratio;
- kill_resume: a fan-out killed with SIGKILL mid-way, then resumed: requests the
  teacher got on resume versus the number missing from the cache (target: equal);
- scale: per prompt count (default 10K and 100K; `--scale`: 10K, 100K and 1M), against
  an unlimited oracle: cold seconds per 1K requests, the driver's peak RSS, seconds and
  requests of a fully cached rerun (traces artifact removed, request cache kept), files
  in the cache and the size of the driver's index. Targets from 100K to 1M: per-1K cost
  within 1.2x, RSS within 1.1x; the cached 1M rerun <= 60 s and 0 requests.

Prompts come from a synthetic FLAN-shaped pool of unique questions (any size; the
procedural families run out of unique questions at tens of thousands).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orca_core  # noqa: F401, I001  first: it picks Arrow's allocator before pyarrow loads
import pyarrow as pa
import pyarrow.parquet as pq

from orca_core import steps
from orca_core.context import StepContext
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.store import ArtifactStore
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server
from orca_core.traces import RequestCache

FLAN_ONLY = "{cot: null, niv2: 0, flan2021: 0, t0: 0, dialog: 0}"  # the whole pool, as Orca 1 took all of CoT


def write_pool(folder: Path, prompts: int) -> Path:
    """A FLAN-v2-shaped CoT pool of `prompts` unique questions; a smaller pool is a prefix of a bigger one."""
    path = folder / f"pool-{prompts}.parquet"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        a = [i % 9973 for i in range(prompts)]
        table = pa.table({
            "inputs": [f"Question {i}: a crate holds {x} apples and {i // 9973 + 2} more arrive. How many apples "
                       f"are in the crate now?" for i, x in enumerate(a)],
            "targets": [str(x + i // 9973 + 2) for i, x in enumerate(a)],
            "task_source": ["CoT"] * prompts,
            "task_name": [f"cot_apples_{i % 50}" for i in range(prompts)],
            "template_type": ["zs_noopt"] * prompts,
        })
        pq.write_table(table, path)
    return path


def recipe(store: Path, url: str, prompts: int, rpm: int, *extra: str):
    teacher = f"kind: vllm, base_url: '{url}', rpm: {rpm}, max_concurrency: 64"
    pool = write_pool(store.parent / "pools", prompts)
    return load_recipe("smoke", [
        f"store.root={store}", "sources.procedural=null", f"sources.flan={{paths: ['{pool}'], counts: {FLAN_ONLY}}}",
        "prompts.strong_fraction=0", f"teachers.assistant={{model: oracle-assistant, {teacher}}}",
        f"teachers.strong={{model: oracle-strong, {teacher}}}", *extra])


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


def traces(r, runner) -> float:
    store = ArtifactStore(r.store.root)
    steps.run_step(store, steps.SOURCES, r)
    ctx = StepContext(fanout=runner, request_cache=Path(store.url("requests")), sink=lambda *a: None)
    started = time.perf_counter()
    steps.run_step(store, steps.TRACES_ORCA1, r, ctx=ctx)
    return time.perf_counter() - started


def oracle_for(store: Path, prompts: int, **settings):
    """An oracle whose answer book is the sources artifact of a `prompts` pool (it answers any smaller one)."""
    r = recipe(store, "http://unused", prompts, 1)
    ref = steps.run_step(ArtifactStore(r.store.root), steps.SOURCES, r).ref
    e = lambda m: TeacherEndpoint(kind="oracle", model=m, rpm=1, oracle={"latency_ms": 20, **settings})  # noqa: E731
    return oracle_server({"a": e("oracle-assistant"), "s": e("oracle-strong")}, [Path(ref.url) / "train.parquet"])


def bench_sustained(tmp: Path, rpm: int, seconds: int) -> dict:
    prompts = rpm * seconds // 60
    with oracle_for(tmp / "book", prompts, rpm_limit=rpm) as urls:
        url = urls["a"]
        elapsed = traces(recipe(tmp / "sustained", url, prompts, rpm), LocalFanoutRunner(load_recipe("smoke")))
        s = server_stats(url)
    achieved = s["ok"] / elapsed * 60
    return {"oracle_rpm": rpm, "requests": s["ok"], "seconds": round(elapsed, 1), "achieved_rpm": round(achieved),
            "fraction": round(achieved / rpm, 3), "http_429": s["by_status"].get("429", 0)}


def bench_ray_vs_asyncio(tmp: Path, prompts: int) -> dict:
    from tasks.fanout import RayFanoutRunner

    out = {}
    with oracle_for(tmp / "book2", prompts) as urls:
        url = urls["a"]
        for name, extra, runner in [
            ("asyncio_1x64", ["ray.actor_concurrency=64"], lambda r: LocalFanoutRunner(r)),
            ("ray_2x32", ["ray.actor_concurrency=32", "ray.fanout_actors=2"], lambda r: RayFanoutRunner(r)),
        ]:
            r = recipe(tmp / name, url, prompts, 10**7, *extra)
            if name.startswith("ray"):  # start Ray before the clock: its start-up is not throughput
                from tasks.ray_runtime import ensure_ray
                ensure_ray(r)
            elapsed = traces(r, runner(r))
            out[name] = round(prompts / elapsed, 1)
    out["ratio_ray_over_asyncio"] = round(out["ray_2x32"] / out["asyncio_1x64"], 3)
    return out


KILL_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
from fanout import recipe, traces
from tasks.fanout import RayFanoutRunner
r = recipe(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), 6000, "ray.flush_rows=16", "ray.flush_seconds=0.5")
traces(r, RayFanoutRunner(r))
"""


def bench_kill_resume(tmp: Path, prompts: int) -> dict:
    code = KILL_CHILD.format(bench=str(Path(__file__).parent))
    with oracle_for(tmp / "book3", prompts) as urls:
        url = urls["a"]
        args = [sys.executable, "-c", code, str(tmp / "kill"), url, str(prompts)]
        cache = RequestCache(tmp / "kill" / "requests")
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(cache.load()) < prompts // 4:  # about a quarter done
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        saved, before, still = None, None, time.monotonic()
        while time.monotonic() - still < 2.0:  # Ray workers outlive the driver by moments
            now = (len(cache.load()), server_stats(url)["ok"])
            if now != (saved, before):
                (saved, before), still = now, time.monotonic()
            time.sleep(0.25)
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = server_stats(url)
    twice = sum(1 for n in after["ok_by_request_id"].values() if n > 1)
    return {"prompts": prompts, "saved_at_kill": saved, "missing": prompts - saved, "sent_on_resume": after["ok"] - before,
            "equal": after["ok"] - before == prompts - saved, "paid_twice_in_flight_at_kill": twice}


SCALE_CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
from fanout import recipe
from orca_core import steps
from orca_core.context import StepContext
from orca_core.store import ArtifactStore
from orca_core.teacher.runner import LocalFanoutRunner
r = recipe(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), 10**7)
store = ArtifactStore(r.store.root)
ctx = StepContext(fanout=LocalFanoutRunner(r), request_cache=Path(store.url("requests")), sink=lambda *a: None)
started = time.perf_counter()
result = steps.run_step(store, steps.TRACES_ORCA1, r, ctx=ctx)
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report its parent's peak.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
this_run = store.manifest(result.ref)["stats"]["this_run"]
print(json.dumps({{"seconds": seconds, "peak_rss_mb": peak_kb // 1024, "requests": this_run["requests"],
                  "traces": result.rows["traces"]}}))
"""


def scale_run(code: str, store: Path, url: str, prompts: int) -> dict:
    """The traces step in a fresh driver process (sources already built): its seconds, peak RSS, requests."""
    done = subprocess.run([sys.executable, "-c", code, str(store), url, str(prompts)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_scale(tmp: Path, sizes: list[int]) -> dict:
    code = SCALE_CHILD.format(bench=str(Path(__file__).parent))
    os.environ["ORCA_INDEX_DIR"] = str(tmp / "index")  # the driver's index (inherited by the children)
    out: dict = {}
    for size in sizes:
        store = tmp / f"scale{size}"
        with oracle_for(store, size, latency_ms=0) as urls:  # unlimited: no rate limit, no latency
            cold = scale_run(code, store, urls["a"], size)
            shutil.rmtree(store / steps.TRACES_ORCA1.name)  # the artifact goes; the request cache stays
            rerun = scale_run(code, store, urls["a"], size)
        requests = store / "requests"
        out[f"{size}_prompts"] = {
            "requests": cold["requests"], "cold_s_per_1k": round(cold["seconds"] / cold["requests"] * 1000, 3),
            "cold_seconds": round(cold["seconds"], 1), "driver_peak_rss_mb": cold["peak_rss_mb"],
            "cached_rerun_seconds": round(rerun["seconds"], 1), "cached_rerun_requests": rerun["requests"],
            "cached_rerun_peak_rss_mb": rerun["peak_rss_mb"],
            "cache_files": sum(1 for p in requests.glob("*.parquet") if not p.name.startswith(".")),
            "cache_mb": round(sum(p.stat().st_size for p in requests.glob("*.parquet")) / 2**20, 1),
            "index_mb": round(sum(p.stat().st_size for p in (tmp / "index").glob("*")) / 2**20, 1),
        }
        shutil.rmtree(store)  # disk: the 1M store is GBs with its index
        for leftover in (tmp / "index").glob("*"):
            leftover.unlink()
    big, small = out.get("1000000_prompts"), out.get("100000_prompts")
    if big and small:
        out["targets"] = {
            "per_1k_ratio_1m_over_100k": round(big["cold_s_per_1k"] / small["cold_s_per_1k"], 3),  # <= 1.2
            "rss_ratio_1m_over_100k": round(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),  # <= 1.1
            "cached_1m_rerun_seconds": big["cached_rerun_seconds"],  # <= 60
            "cached_1m_rerun_requests": big["cached_rerun_requests"],  # 0
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    parser.add_argument("--only", choices=["sustained", "ray_vs_asyncio", "kill_resume", "scale"], action="append")
    parser.add_argument("--scale", action="store_true", help="only the scale bench, at 10K, 100K and 1M prompts")
    parser.add_argument("--sizes", help="prompt counts of the scale bench, comma-separated")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    default_sizes = [10_000, 100_000, 1_000_000] if args.scale else [2000, 10_000] if args.quick else [10_000, 100_000]
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else default_sizes
    only = ["scale"] if args.scale else args.only
    benches = {
        "sustained": lambda tmp: bench_sustained(tmp, rpm=3000, seconds=15 if args.quick else 40),
        "ray_vs_asyncio": lambda tmp: bench_ray_vs_asyncio(tmp, prompts=2000 if args.quick else 6000),
        "kill_resume": lambda tmp: bench_kill_resume(tmp, prompts=1000 if args.quick else 2000),
        "scale": lambda tmp: bench_scale(tmp, sizes),
    }
    with tempfile.TemporaryDirectory(prefix="orca-bench-") as folder:
        result = {name: run(Path(folder)) for name, run in benches.items() if not only or name in only}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
