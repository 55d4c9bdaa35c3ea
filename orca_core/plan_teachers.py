"""The teacher work of a fan-out step, for `orca plan`: requests net of the request cache, tokens, dollars, hours.

With the upstream artifacts built, the jobs are the fan-out's own
(`generate.orca1_fanout`, `orca2_fanout`, `selection_fanout`), resolved
against the request cache the way the fan-out resolves them: a job whose calls
already have rows costs nothing; a pending multi-call job costs its remaining
calls, whose prompts carry the earlier answers (unknown yet: counted at the
completion estimate); a pending job whose next request an earlier job of the
step sends too (one model in both roles, a prompt twice) costs nothing, as the
fan-out sends that request once (`fan_out`: `RecentIds` on the call id).
Without the sources artifact the job counts come from the recipe (rows per
family, strong fraction, strategies) and the line says "estimated"; the prompt of an unseen row is then the mean prompt of the
endpoint's cached answers, or ASSUMED_PROMPT_TOKENS when it has none.

Completion tokens: the mean of the endpoint's answers in the cache (one query
of the cache's SQLite index, whatever the store), else
`max_tokens` (an upper bound). Hours: the slowest of requests / rpm, tokens /
tpm and requests x mean latency / concurrency (latency from the cache, or the
oracle's setting); concurrency is the endpoint's, capped by the fan-out's actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from orca_core.generate import (chosen_strategies, orca1_fanout, orca2_fanout, selection_fanout, strategy_candidates,
                                wanted_strategies)
from orca_core.prompts import STRATEGIES
from orca_core.recipe.models import Recipe, TeacherEndpoint
from orca_core.sources import TRAIN_FILE
from orca_core.teacher.client import call_cost
from orca_core.teacher.fanout import FanoutPlan, chunked
from orca_core.teacher.jobs import RecentIds, TraceJob, call_id, resolve
from orca_core.teacher.tokens import prompt_counter
from orca_core.traces import RequestCache

ASSUMED_PROMPT_TOKENS = 256  # a call's prompt when neither the sources nor the cache can tell (system message + task)
ESTIMATED = "estimated (sources not built yet)"
ESTIMATED_STRATEGIES = "estimated (strategies not built yet: auto tasks at the longest strategy)"


@dataclass
class TeacherWork:
    step: str
    role: str
    model: str
    kind: str
    requests: int  # calls to send: not in the request cache yet
    cached: int  # calls the request cache already answers (they cost nothing)
    prompt_tokens: int
    completion_tokens: int
    prompt_basis: str
    completion_basis: str
    usd: float
    hours: float
    note: str  # "" when the job list is the fan-out's own; else how it was estimated
    shared: int = 0  # calls another job of the step sends first (same request id): answered by its answer


@dataclass(frozen=True)
class History:
    """An endpoint's answers already in the request cache (its model's ok rows)."""

    answers: int = 0
    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    latency_ms: float | None = None


def history(cache: RequestCache, model: str) -> History:
    """From the cache's index (refreshed by the caller): one query, whatever the store (local or s3://)."""
    answers, prompt_tokens, completion_tokens, latency_ms = cache.answers_of(model)
    return History(answers, prompt_tokens, completion_tokens, latency_ms) if answers else History()


def calls(strategy: str) -> int:
    return 1 + len(STRATEGIES[strategy].followups)  # as TraceJob.calls


LONGEST = max(STRATEGIES, key=calls)


# -- the job list: the fan-out's own, or an estimate from the recipe ------------------------------
def _fanout_of(name: str, recipe: Recipe, sources: Path, strategies: Path | None) -> tuple[FanoutPlan | None, str]:
    if name == "traces-orca1":
        return orca1_fanout(recipe, sources), ""
    rows = pq.read_table(sources / TRAIN_FILE, columns=None if name == "strategies" else ["task_name"]).to_pylist()
    wanted = wanted_strategies(recipe, sorted({r["task_name"] for r in rows}))
    if name == "strategies":
        auto = [t for t, s in wanted.items() if s == "auto"]
        return (selection_fanout(recipe, rows, auto)[1] if auto else None), ""
    if strategies is not None:
        return orca2_fanout(recipe, sources, chosen_strategies(strategies)), ""
    estimated = {t: LONGEST if s == "auto" else s for t, s in wanted.items()}
    return orca2_fanout(recipe, sources, estimated), ESTIMATED_STRATEGIES


def _same_requests(a: TeacherEndpoint, b: TeacherEndpoint) -> bool:
    """Whether a prompt asked of `a` and of `b` is one request (one model serving both roles): sent once."""
    probe = TraceJob("", "", "", "", "", "orca1", "", "", 0, "", "", "", None)
    return call_id(probe, a, []) == call_id(probe, b, [])


def _estimated_requests(name: str, recipe: Recipe, groups: list[tuple[str, str, int]]) -> dict[str, tuple[int, int]]:
    """Per role, (calls to send, calls another role's identical job sends) from the recipe's row counts:
    (task, sub-collection, rows) groups (x the role's samples)."""
    p, t = recipe.prompts, recipe.teachers
    if name == "traces-orca1":
        answered = sum(n for _, sub, n in groups if sub != "dialog")  # dialog rows get no Orca 1 trace
        strong_rows = round(answered * p.strong_fraction)
        # A strong job asks what the row's assistant job of the same sample asks: shared when the endpoints are one.
        same = _same_requests(t.assistant, t.strong)
        shared = strong_rows * min(t.strong.samples, t.assistant.samples) if same else 0
        return {"assistant": (answered * t.assistant.samples, 0),
                "strong": (strong_rows * t.strong.samples - shared, shared)}
    wanted = wanted_strategies(recipe, [task for task, _, _ in groups])  # FLAN groups take the default
    if name == "strategies":
        per_sample = sum(calls(s) for s in strategy_candidates())
        return {"strong": (t.strong.samples * sum(min(p.selection_samples, n) * per_sample
                                                  for task, _, n in groups if wanted[task] == "auto"), 0)}
    return {"strong": (t.strong.samples * sum(n * calls(LONGEST if wanted[task] == "auto" else wanted[task])
                                              for task, _, n in groups), 0)}


# -- pricing ----------------------------------------------------------------------------------
def _hours(recipe: Recipe, endpoint: TeacherEndpoint, requests: int, tokens: int, latency_ms: float | None) -> float:
    minutes = [requests / endpoint.rpm]
    if endpoint.tpm:
        minutes.append(tokens / endpoint.tpm)
    if latency_ms:
        concurrency = min(endpoint.max_concurrency, recipe.ray.fanout_actors * recipe.ray.actor_concurrency)
        minutes.append(requests * latency_ms / 1000 / concurrency / 60)
    return max(minutes) / 60


def _priced(step: str, role: str, endpoint: TeacherEndpoint, recipe: Recipe, requests: int, cached: int,
            prompt_tokens: int, prompt_basis: str, seen: History, note: str, shared: int) -> TeacherWork:
    if seen.answers:
        each, completion_basis = seen.completion_tokens, f"mean of {seen.answers:,} cached answers"
    else:
        each, completion_basis = endpoint.max_tokens, "max_tokens (upper bound)"
    completion = round(requests * each)
    latency = seen.latency_ms or (endpoint.oracle.latency_ms if endpoint.kind == "oracle" and endpoint.oracle else None)
    return TeacherWork(step, role, endpoint.model, endpoint.kind, requests, cached, prompt_tokens, completion,
                       prompt_basis, completion_basis, call_cost(endpoint, prompt_tokens, completion),
                       _hours(recipe, endpoint, requests, prompt_tokens + completion, latency), note, shared)


def fanout_work(name: str, recipe: Recipe, built: dict[str, Path | None], cache: RequestCache,
                groups: list[tuple[str, str, int]] | None) -> list[TeacherWork]:
    """Per role: what the fan-out step `name` will send. `built`: step -> artifact folder (None: not built);
    `cache`: the store's request cache, refreshed."""
    roles = {"assistant": recipe.teachers.assistant, "strong": recipe.teachers.strong}
    if built["sources"] is None:
        work = []
        for role, (n, shared) in _estimated_requests(name, recipe, groups or []).items():
            seen = history(cache, roles[role].model)
            each = seen.prompt_tokens if seen.answers else ASSUMED_PROMPT_TOKENS
            basis = (f"mean prompt of {seen.answers:,} cached answers" if seen.answers
                     else f"assumed {ASSUMED_PROMPT_TOKENS} a call")
            work.append(_priced(name, role, roles[role], recipe, n, 0, round(n * each), basis, seen, ESTIMATED, shared))
        return work
    plan, note = _fanout_of(name, recipe, built["sources"], built.get("strategies"))
    if plan is None:
        return []  # every task's strategy comes from the recipe: nothing to ask
    seen = {role: history(cache, e.model) for role, e in plan.endpoints.items()}
    counters = {role: prompt_counter(e, built.get("tokenizer")) for role, e in plan.endpoints.items()}
    completion = {role: seen[role].completion_tokens if seen[role].answers else e.max_tokens
                  for role, e in plan.endpoints.items()}
    tally = {role: {"requests": 0, "cached": 0, "shared": 0, "prompt": 0} for role in plan.endpoints}
    sent = RecentIds()  # as `fan_out`: a request several pending jobs share is sent once, by the first of them
    for chunk in chunked(plan.jobs(), 2000):
        resolved = resolve(chunk, plan.endpoints, cache)
        for p in resolved:
            tally[p.job.teacher_role]["cached"] += len(p.calls)
        pending = [p for p in resolved if p.state == "pending"]
        new = sent.fresh([call_id(p.job, plan.endpoints[p.job.teacher_role], p.previous) for p in pending])
        for p, first in zip(pending, new):
            role = p.job.teacher_role
            previous = p.previous
            if not first:
                tally[role]["shared"] += p.job.calls - len(previous)  # same next call: the same remaining calls
                continue
            for call in range(len(previous), p.job.calls):
                unknown = call - len(previous)  # earlier answers of this job that this run will get first
                tally[role]["prompt"] += (counters[role].count(p.job.messages(previous + [""] * unknown))
                                          + round(unknown * completion[role]))
                tally[role]["requests"] += 1
    return [_priced(name, role, e, recipe, tally[role]["requests"], tally[role]["cached"], tally[role]["prompt"],
                    counters[role].basis, seen[role], note, tally[role]["shared"])
            for role, e in plan.endpoints.items()]
