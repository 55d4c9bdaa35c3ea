"""Teacher fan-out figures against the oracle on 127.0.0.1. Prints JSON.

    .venv/bin/python bench/fanout.py [--quick]

- sustained: throughput as a fraction of the oracle's enforced RPM (target >= 0.95),
  the client configured with the same RPM (what a user sets for a provider);
- ray_vs_asyncio: req/s against an unlimited oracle, Ray actors (2 x 32 in flight)
  versus one process with one asyncio worker (64 in flight): the ratio;
- kill_resume: a fan-out killed with SIGKILL mid-way, then resumed: requests the
  teacher got on resume versus the number missing from the cache (target: equal);
- rss: peak RSS of a fan-out driver at 10K and 100K prompts (target: flat).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from orca_core import steps
from orca_core.context import StepContext
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.store import ArtifactStore
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server
from orca_core.traces import RequestCache

FAMILIES = "[basic_arithmetic, leg_counting, family_relationships_mc, needle_haystack]"  # large question spaces


def recipe(store: Path, url: str, per_family: int, rpm: int, *extra: str):
    teacher = f"kind: vllm, base_url: '{url}', rpm: {rpm}, max_concurrency: 64"
    return load_recipe("smoke", [
        f"store.root={store}", f"sources.procedural.families={FAMILIES}",
        f"sources.procedural.train_per_family={per_family}", "sources.procedural.heldout_per_family=1",
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


def oracle_for(store: Path, **settings):
    r = load_recipe("smoke", [f"store.root={store}", f"sources.procedural.families={FAMILIES}",
                              "sources.procedural.train_per_family=25000", "sources.procedural.heldout_per_family=1"])
    ref = steps.run_step(ArtifactStore(r.store.root), steps.SOURCES, r).ref  # the answer book, up to 100K prompts
    e = lambda m: TeacherEndpoint(kind="oracle", model=m, rpm=1, oracle={"latency_ms": 20, **settings})  # noqa: E731
    return oracle_server({"a": e("oracle-assistant"), "s": e("oracle-strong")}, [Path(ref.url) / "train.parquet"])


def bench_sustained(tmp: Path, rpm: int, seconds: int) -> dict:
    per_family = rpm * seconds // 60 // 4
    with oracle_for(tmp / "book", rpm_limit=rpm) as urls:
        url = urls["a"]
        elapsed = traces(recipe(tmp / "sustained", url, per_family, rpm), LocalFanoutRunner(load_recipe("smoke")))
        s = server_stats(url)
    achieved = s["ok"] / elapsed * 60
    return {"oracle_rpm": rpm, "requests": s["ok"], "seconds": round(elapsed, 1), "achieved_rpm": round(achieved),
            "fraction": round(achieved / rpm, 3), "http_429": s["by_status"].get("429", 0)}


def bench_ray_vs_asyncio(tmp: Path, per_family: int) -> dict:
    from tasks.fanout import RayFanoutRunner

    out = {}
    with oracle_for(tmp / "book2") as urls:
        url = urls["a"]
        for name, extra, runner in [
            ("asyncio_1x64", ["ray.actor_concurrency=64"], lambda r: LocalFanoutRunner(r)),
            ("ray_2x32", ["ray.actor_concurrency=32", "ray.fanout_actors=2"], lambda r: RayFanoutRunner(r)),
        ]:
            r = recipe(tmp / name, url, per_family, 10**7, *extra)
            if name.startswith("ray"):  # start Ray before the clock: its start-up is not throughput
                from tasks.ray_runtime import ensure_ray
                ensure_ray(r)
            elapsed = traces(r, runner(r))
            out[name] = round(4 * per_family / elapsed, 1)
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


def bench_kill_resume(tmp: Path, per_family: int) -> dict:
    code = KILL_CHILD.format(bench=str(Path(__file__).parent))
    with oracle_for(tmp / "book3") as urls:
        url = urls["a"]
        args = [sys.executable, "-c", code, str(tmp / "kill"), url, str(per_family)]
        cache = RequestCache(tmp / "kill" / "requests")
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(cache.load()) < per_family:  # about a quarter done
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
    total = 4 * per_family
    twice = sum(1 for n in after["ok_by_request_id"].values() if n > 1)
    return {"prompts": total, "saved_at_kill": saved, "missing": total - saved, "sent_on_resume": after["ok"] - before,
            "equal": after["ok"] - before == total - saved, "paid_twice_in_flight_at_kill": twice}


RSS_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
from fanout import recipe, traces
from orca_core.recipe import load_recipe
from orca_core.teacher.runner import LocalFanoutRunner
r = recipe(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), 10**7)
seconds = traces(r, LocalFanoutRunner(r))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report its parent's peak.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(peak_kb // 1024, round(seconds, 1))
"""


def bench_rss(tmp: Path, sizes: list[int]) -> dict:
    code = RSS_CHILD.format(bench=str(Path(__file__).parent))
    out = {}
    with oracle_for(tmp / "book4", latency_ms=0) as urls:
        for size in sizes:
            # Sources are built here, so the child's peak is the fan-out's alone (it finds them cached).
            r = recipe(tmp / f"rss{size}", urls["a"], size // 4, 10**7)
            steps.run_step(ArtifactStore(r.store.root), steps.SOURCES, r)
            done = subprocess.run([sys.executable, "-c", code, str(tmp / f"rss{size}"), urls["a"], str(size // 4)],
                                  check=True, capture_output=True, text=True)
            peak_mb, seconds = done.stdout.split()
            out[f"{size}_prompts"] = {"peak_rss_mb": int(peak_mb), "seconds": float(seconds)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    parser.add_argument("--only", choices=["sustained", "ray_vs_asyncio", "kill_resume", "rss"], action="append")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    benches = {
        "sustained": lambda tmp: bench_sustained(tmp, rpm=3000, seconds=15 if args.quick else 40),
        "ray_vs_asyncio": lambda tmp: bench_ray_vs_asyncio(tmp, per_family=500 if args.quick else 1500),
        "kill_resume": lambda tmp: bench_kill_resume(tmp, per_family=250 if args.quick else 500),
        "rss": lambda tmp: bench_rss(tmp, [2000, 10000] if args.quick else [10000, 100000]),
    }
    with tempfile.TemporaryDirectory(prefix="orca-bench-") as folder:
        result = {name: run(Path(folder)) for name, run in benches.items() if not args.only or name in args.only}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
