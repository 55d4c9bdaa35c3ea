"""Batch API mode end to end against the oracle's `/v1/files` and `/v1/batches` on 127.0.0.1. Prints JSON.

    .venv/bin/python bench/batch.py [--prompts 10000 100000]

Per size: a traces-orca1 step over a synthetic FLAN-shaped pool of unique
questions (`bench/fanout.py`'s), whose two teachers are `mode: batch` endpoints
(the oracle as an external `kind: openai` server), one request per prompt
(strong_fraction 0): seconds (sources excluded), requests the oracle answered
in batches, batches and their sizes, lines paid twice (target 0), the
driver's peak RSS; then the same step with its artifact removed and the cache
kept: seconds and requests sent (target 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from json_output import print_json  # noqa: E402

from orca_core import steps  # noqa: E402
from orca_core.context import StepContext  # noqa: E402
from orca_core.recipe import load_recipe  # noqa: E402
from orca_core.recipe.models import TeacherEndpoint  # noqa: E402
from orca_core.store import ArtifactStore  # noqa: E402
from orca_core.teacher.runner import oracle_server  # noqa: E402

from fanout import FLAN_ONLY, write_pool  # noqa: E402  (the same synthetic pool of unique questions)


def recipe(store: Path, prompts: int, url: str = "http://127.0.0.1:1/v1"):
    teacher = f"kind: openai, base_url: '{url}', rpm: 60, mode: batch, batch: {{poll_s: 0.5, poll_max_s: 2}}"
    pool = write_pool(store.parent / "pools", prompts)
    return load_recipe("smoke", [
        f"store.root={store}", "sources.procedural=null", f"sources.flan={{paths: ['{pool}'], counts: {FLAN_ONLY}}}",
        "prompts.strong_fraction=0", f"teachers.assistant={{model: oracle-assistant, {teacher}}}",
        f"teachers.strong={{model: oracle-strong, {teacher}}}"])


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


def peak_rss_mb() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024


def bench(folder: Path, prompts: int) -> dict:
    store = ArtifactStore(str(folder / "store"))
    started = time.perf_counter()
    sources = Path(steps.run_step(store, steps.SOURCES, recipe(folder / "store", prompts)).ref.url)
    sources_s = time.perf_counter() - started
    endpoint = lambda model: TeacherEndpoint(kind="oracle", model=model, rpm=1, oracle={"latency_ms": 0})  # noqa: E731
    with oracle_server({"a": endpoint("oracle-assistant"), "s": endpoint("oracle-strong")},
                       [sources / "train.parquet"]) as urls:
        r = recipe(folder / "store", prompts, urls["a"])
        ctx = StepContext(request_cache=Path(store.url("requests")))
        started = time.perf_counter()
        result = steps.run_step(store, steps.TRACES_ORCA1, r, ctx=ctx)
        cold_s = time.perf_counter() - started
        served = server_stats(urls["a"])
        shutil.rmtree(result.ref.url)  # the artifact goes, the request cache stays
        started = time.perf_counter()
        steps.run_step(store, steps.TRACES_ORCA1, r, ctx=ctx)
        cached_s = time.perf_counter() - started
        after = server_stats(urls["a"])
    requests = served["batch_ok"]
    return {"prompts": prompts, "sources_seconds": round(sources_s, 1), "traces": result.rows["traces"],
            "requests": requests, "seconds": round(cold_s, 1),
            "seconds_per_1k_requests": round(cold_s / max(requests, 1) * 1000, 2),
            "batches": len(served["batches"]), "lines_per_batch": [b["lines"] for b in served["batches"]],
            "paid_twice": sum(1 for n in served["batch_ok_by_request_id"].values() if n > 1),
            "driver_peak_rss_mb": peak_rss_mb(),
            "cached_rerun": {"seconds": round(cached_s, 1), "requests": after["batch_ok"] - requests,
                             "batches": len(after["batches"]) - len(served["batches"])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()

    def measure() -> dict:
        out = {}
        for prompts in args.prompts:
            with tempfile.TemporaryDirectory(prefix="orca-bench-batch-") as folder:
                out[f"{prompts}_prompts"] = bench(Path(folder), prompts)
        return out

    print_json(measure)


if __name__ == "__main__":
    main()
