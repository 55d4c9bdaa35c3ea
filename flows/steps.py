"""Run a list of the recipe's steps as Prefect tasks along the DAG and say, per step, what happened and why.

Every flow (the whole pipeline, or one part of it) goes through `run_steps`,
so a step is the same task with the same cache key whichever flow runs it.

A step starts as soon as the steps it reads are done, on Prefect's thread-pool
task runner, at most `prefect.max_concurrent_steps` at a time; when more are
ready than slots are free, the earlier in run order goes first (the training
chain before the evaluations beside it). Independent steps overlap: both
teachers' traces, the evaluation of stage k while stage k+1 trains.

- A step is submitted only once its upstream steps are done (not with a
  `wait_for` on futures): its artifact is verified against the upstream ones
  published now, which decides whether Prefect's cache record may be used,
  and a step waiting on its upstream would hold a slot of the pool.
- A step that fails (after its retries) fails the run, as Prefect does, but
  only once every step that does not depend on it has finished; its dependents
  never run (state NotReady, Prefect's name for it).
- An error no retry can fix (`NOT_RETRIED`) starts nothing more: the steps
  running finish (a thread cannot be stopped; they are not retried), then the
  run fails.
- A recipe's answers-only control (`control:`) adds the nodes `control/<step>`:
  each runs as its control recipe's step (`orca_core.steps.runs_as`: key,
  build and store folder), and its training waits for this recipe's last
  stage (`dag_upstream`), so two trainings never share Ray's CPUs.
- Fan-out steps that call real teacher endpoints take turns: each step's gate
  holds the endpoint's rate limits on its own. Oracle teachers (a server per
  step) overlap freely.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from orca_core.plan import reason
from orca_core.recipe.models import Recipe
from orca_core.steps import FANOUT_STEPS, Step, dag_upstream, explain, plan_key, runs_as, steps_for
from tasks.report import publish_report, publish_run_summary
from tasks.step import NOT_RETRIED, PreparedStep, prepare_step, prefect_step, step_outcome, store_for

DONE = ("Completed", "Cached")


def why(recipe: Recipe, step: Step) -> str:
    """Why the step will hit or miss, in a few words (what `orca explain` says in full)."""
    return reason(explain(store_for(recipe), step, recipe))


def takes_turns(recipe: Recipe, step: Step) -> bool:
    """Must this step not overlap another such step? A fan-out to real endpoints (its gate holds their limits)."""
    teachers = (recipe.teachers.assistant, recipe.teachers.strong)
    return step.name in FANOUT_STEPS and any(t.kind != "oracle" for t in teachers)


def run_steps(recipe: Recipe, names: list[str], retry_failed: bool = False,
              summary_key: str = "orca-pipeline-summary") -> list[dict[str, Any]]:
    """Run the named steps along the DAG; one JSON-able row per step, in run order
    (state, key, rows, seconds, start and end from the run's start, why, artifact)."""
    known = steps_for(recipe)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; this recipe's steps: {list(known)}")
    steps = [known[name] for name in names]
    # Upstream steps outside this run (another part of the DAG) must be in the store already: not waited on.
    needs = {step.name: tuple(u for u in dag_upstream(step, recipe, known) if u in names) for step in steps}
    rows = run_dag(recipe, steps, needs, retry_failed, summary_key)
    report = next((r for r in rows if r["step"] == "report"), None)
    if report is not None:
        ref = store_for(recipe).ref("report", report["key"])
        publish_report(recipe.store.root, ref)
        get_run_logger().info("report: %s/report.md (+ report.html, accuracy.png, loss.png)", ref.url)
    return rows


def run_dag(recipe: Recipe, steps: list[Step], needs: dict[str, tuple[str, ...]], retry_failed: bool = False,
            summary_key: str = "orca-pipeline-summary") -> list[dict[str, Any]]:
    """Run `steps` (in run order), each once the steps `needs` names for it are done; raise the first failure."""
    logger = get_run_logger()
    limit = recipe.prefect.max_concurrent_steps
    run_started = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    # future -> (the step, why it runs, its node in the DAG, the recipe it runs under)
    running: dict[PrefectFuture, tuple[PreparedStep, str, str, Recipe]] = {}
    futures: dict[str, PrefectFuture] = {}
    ended: dict[PrefectFuture, float] = {}
    failures: list[BaseException] = []

    def since_start(t: float) -> float:
        return round(t - run_started, 2)

    def start_ready(runner: ThreadPoolTaskRunner) -> bool:
        progressed = False
        for step in steps:
            if len(running) >= limit:
                break
            upstream = needs[step.name]
            if step.name in rows or step.name in futures or any(u not in rows for u in upstream):
                continue
            failed = [u for u in upstream if rows[u]["state"] not in DONE]
            if failed:  # Prefect's own name for a task whose upstream did not complete
                rows[step.name] = _row(step.name, "NotReady", plan_key(step, recipe),
                                       f"upstream {', '.join(failed)} did not complete")
                progressed = True
                continue
            if takes_turns(recipe, step) and any(takes_turns(recipe, p.step) for p, *_ in running.values()):
                continue
            reason_now = why(recipe, step)
            inner, under = runs_as(step, recipe)  # a control node runs as its control recipe's step
            prepared = prepare_step(prefect_step(inner), inner, under, retry_failed)
            future = runner.submit(prepared.task, prepared.parameters,
                                   wait_for=[futures[u] for u in upstream])  # done already: the edges Prefect shows
            future.add_done_callback(lambda f: ended.setdefault(f, time.perf_counter()))
            running[future], futures[step.name] = (prepared, reason_now, step.name, under), future
            progressed = True
        return progressed

    def collect(future: PrefectFuture) -> None:
        prepared, reason_now, name, under = running.pop(future)
        future.wait()
        started, end = prepared.started, ended.get(future, time.perf_counter())
        try:
            outcome = step_outcome(prepared, future.state, under)
            rows[name] = _row(name, outcome.state, outcome.key, reason_now, outcome.rows, outcome.ref.url)
        except Exception as err:  # noqa: BLE001 - any step's error: recorded, raised once the run ends
            rows[name] = _row(name, "Failed", prepared.key, f"{type(err).__name__}: {err}")
            failures.append(err)
        rows[name].update(seconds=round(end - started, 2), start=since_start(started), end=since_start(end))
        logger.info("%-21s %-9s %s %.1fs (%s)", name, rows[name]["state"], prepared.key[:12], end - started,
                    rows[name]["why"])

    with ThreadPoolTaskRunner(max_workers=limit) as runner:
        while len(rows) < len(steps) and not any(isinstance(e, NOT_RETRIED) for e in failures):
            progressed = start_ready(runner)
            if not running:
                if not progressed:
                    raise RuntimeError(f"steps {[s.name for s in steps if s.name not in rows]} wait on each other")
                continue
            collect(next(as_completed(list(running))))
    for future in list(running):  # after an error no retry can fix: the steps that were running, now ended
        collect(future)
    ordered = [rows.get(s.name) or _row(s.name, "NotReady", plan_key(s, recipe), "the run ended first")
               for s in steps]
    publish_run_summary(ordered, since_start(time.perf_counter()), summary_key)
    if failures:  # one no retry can fix first: it must also stop the flow's retries
        raise next((e for e in failures if isinstance(e, NOT_RETRIED)), failures[0])
    return ordered


def _row(step: str, state: str, key: str, reason_now: str, rows: dict[str, int] | None = None,
         artifact: str = "") -> dict[str, Any]:
    return {"step": step, "state": state, "key": key, "rows": rows or {}, "seconds": 0.0, "start": None,
            "end": None, "why": reason_now, "artifact": artifact}
