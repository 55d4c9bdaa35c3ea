"""Ray actors versus one asyncio process at equal concurrency, against the oracle on 127.0.0.1. Prints JSON.

    .venv/bin/python bench/ray_vs_asyncio.py [--prompts 6000] [--latency-ms 50] [--repeats 3]

One oracle (no rate limit, lognormal latency), one sources artifact; each
repeat runs the Orca 1 traces step cold (fresh store) twice: one process with
one asyncio worker at 64 in flight, then Ray with 2 actors x 32 in flight.
Throughput is requests over the fan-out's time less its workers' start-up
(Ray's runtime and its actors' imports: seconds, once per step, not per
request); the step's whole time is reported too. Prints req/s per run, the
medians and their ratio (target >= 0.9), and the gate's lease calls per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from orca_core import steps
from orca_core.context import StepContext
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.store import ArtifactStore
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server

FAMILIES = "[basic_arithmetic, leg_counting, family_relationships_mc, needle_haystack]"  # large question spaces


def recipe(store: Path, url: str, per_family: int, *extra: str):
    teacher = f"kind: vllm, base_url: '{url}', rpm: 10000000, max_concurrency: 64"
    return load_recipe("smoke", [
        f"store.root={store}", f"sources.procedural.families={FAMILIES}",
        f"sources.procedural.train_per_family={per_family}", "sources.procedural.heldout_per_family=1",
        "prompts.strong_fraction=0", f"teachers.assistant={{model: oracle-assistant, {teacher}}}",
        f"teachers.strong={{model: oracle-strong, {teacher}}}", *extra])


class Recording:
    """Keeps the fan-out report of the runner it wraps."""

    def __init__(self, runner):
        self.runner, self.report = runner, None

    def run(self, *args):
        self.report = self.runner.run(*args)
        return self.report


def traces(r, runner, sources_from: Path) -> tuple[float, dict]:
    """(step seconds, fan-out report) of a cold traces step."""
    store = ArtifactStore(r.store.root)
    Path(store.root).mkdir(parents=True, exist_ok=True)
    os.symlink(sources_from, Path(store.root, "sources"))  # the same sources artifact for every run
    recording = Recording(runner)
    ctx = StepContext(fanout=recording, request_cache=Path(store.url("requests")), sink=lambda *a: None)
    started = time.perf_counter()
    steps.run_step(store, steps.TRACES_ORCA1, r, ctx=ctx)
    return time.perf_counter() - started, recording.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    from tasks.fanout import RayFanoutRunner

    per_family = args.prompts // 4
    rates: dict[str, list[float]] = {"asyncio_1x64": [], "ray_2x32": []}
    step_rates: dict[str, list[float]] = {"asyncio_1x64": [], "ray_2x32": []}
    leases_per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="orca-bench-rva-") as folder:
        tmp = Path(folder)
        book = recipe(tmp / "book", "http://127.0.0.1:9/v1", per_family)
        sources = Path(steps.run_step(ArtifactStore(book.store.root), steps.SOURCES, book).ref.url)
        oracle = lambda m: TeacherEndpoint(kind="oracle", model=m, rpm=1, oracle={"latency_ms": args.latency_ms})  # noqa: E731
        with oracle_server({"a": oracle("oracle-assistant"), "s": oracle("oracle-strong")},
                           [sources / "train.parquet"]) as urls:
            url = urls["a"]
            # A private runtime in this run's own temp dir, started outside the clock.
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _temp_dir=str(tmp / "ray"))
            for repeat in range(args.repeats):
                for name, extra, runner in [
                    ("asyncio_1x64", ["ray.actor_concurrency=64"], LocalFanoutRunner),
                    ("ray_2x32", ["ray.actor_concurrency=32", "ray.fanout_actors=2"], RayFanoutRunner),
                ]:
                    r = recipe(tmp / f"{name}-{repeat}", url, per_family, *extra)
                    seconds, report = traces(r, runner(r), sources.parent)
                    sent = report.worker.get("requests", 0)
                    rates[name].append(round(sent / (report.seconds - report.worker.get("start_s", 0.0)), 1))
                    step_rates[name].append(round(4 * per_family / seconds, 1))
                    leases_per_request[name] = round(report.worker.get("leases", 0) / max(1, sent), 4)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    step_medians = {name: statistics.median(values) for name, values in step_rates.items()}
    print(json.dumps({"prompts": 4 * per_family, "latency_ms": args.latency_ms, "req_per_s": rates,
                      "median_req_per_s": medians,
                      "ratio_ray_over_asyncio": round(medians["ray_2x32"] / medians["asyncio_1x64"], 3),
                      "whole_step_req_per_s": step_rates,
                      "whole_step_ratio": round(step_medians["ray_2x32"] / step_medians["asyncio_1x64"], 3),
                      "gate_leases_per_request": leases_per_request}, indent=2))


if __name__ == "__main__":
    main()
