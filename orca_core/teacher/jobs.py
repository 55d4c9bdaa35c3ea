"""Trace jobs: which teacher answers which prompt, with which prompt, and how far each has got.

A job is one trace: a prompt for a teacher role, one call or a chain of calls
(multi-call strategies). Its calls' request ids follow from the job and the
earlier calls' answers, so the request cache alone says how far a job has
got: done, failed, or pending at call k. Builders are generators over source
rows: nothing here holds a whole collection in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orca_core.prompts import (STRATEGIES, chat, followup_messages, in_strong_subset, join_turns,
                               pick_orca1_system_message)
from orca_core.recipe.models import Recipe, TeacherEndpoint
from orca_core.teacher.identity import identity_digest
from orca_core.traces import SCHEMA_VERSION, RequestCache, now_iso, request_id


@dataclass(slots=True)  # not frozen: a frozen dataclass is ~4x slower to build, and millions are built per pass
class TraceJob:
    source_id: str
    source: str
    task_name: str
    template_type: str
    sub_collection: str
    stage: str  # orca1 | orca2 | selection
    teacher_role: str  # assistant | strong
    strategy: str  # "" for Orca 1
    system_message_id: int  # Orca 1 number, 0 for Orca 2
    teacher_system: str
    student_system: str
    user: str
    reference: str | None
    sample: int = 0  # the n-th answer to this prompt (endpoint `samples`): distinct request ids

    @property
    def calls(self) -> int:
        return 1 + len(STRATEGIES[self.strategy].followups) if self.strategy else 1

    def messages(self, previous: list[str]) -> list[dict[str, str]]:
        if self.strategy:
            return followup_messages(STRATEGIES[self.strategy], self.user, previous)
        return chat(self.teacher_system, self.user)


def call_id(job: TraceJob, endpoint: TeacherEndpoint, previous: list[str]) -> str:
    """The request id of the job's next call (after the answers `previous`), as its endpoint answers it."""
    return request_id(identity_digest(endpoint), job.messages(previous), endpoint.temperature, endpoint.top_p,
                      endpoint.max_tokens, job.sample)


class RecentIds:
    """The newest `window` request ids seen: which requests this run has already sent.

    Bounded, so memory stays flat at any scale: an id older than the window was sent so many requests
    ago that its answer is in the cache by now, where the next chunk's lookup finds it. Ids are kept as
    64-bit keys (a collision only holds a job back, and the run reports it incomplete) in a fixed numpy
    ring, checked a chunk at a time: a set of Python ints churned through the window scattered its
    survivors over the heap, and the driver's RSS crept up with the number of prompts (+25 MB from 100K
    to 300K; with the ring it stays flat).
    """

    def __init__(self, window: int = 1 << 17):
        self._ring = np.zeros(window, dtype=np.uint64)
        self._filled = 0  # slots holding an id
        self._next = 0  # the slot the next id goes to

    def fresh(self, rids: list[str]) -> list[bool]:
        """For each id in order: True if it is new (not among the recent ids, nor earlier in `rids`).

        The new ones are remembered.
        """
        keys = np.fromiter((int(rid[:16], 16) for rid in rids), dtype=np.uint64, count=len(rids))
        new = ~np.isin(keys, self._ring[: self._filled])
        first = np.zeros(len(keys), dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        new &= first
        self._remember(keys[new])
        return new.tolist()

    def _remember(self, keys: np.ndarray) -> None:
        window = len(self._ring)
        keys = keys[-window:]
        end = self._next + len(keys)
        if end <= window:
            self._ring[self._next:end] = keys
        else:  # wraps around: the tail of the ring, then its head
            self._ring[self._next:] = keys[: window - self._next]
            self._ring[: end - window] = keys[window - self._next:]
        self._next = end % window
        self._filled = min(window, self._filled + len(keys))


@dataclass
class Progress:
    """How far a job has got according to the request cache."""

    job: TraceJob
    calls: list[dict[str, Any]] = field(default_factory=list)  # cache rows of the finished calls, in order
    state: str = "pending"  # pending | done | failed

    @property
    def previous(self) -> list[str]:
        return [c["response"] for c in self.calls if c["status"] == "ok"]


def resolve(jobs: list[TraceJob], endpoints: dict[str, TeacherEndpoint], cache: RequestCache,
            retry_failed: bool = False) -> list[Progress]:
    """Walk each job's call chain through the cache: one refresh, then one index lookup per call depth,
    so a chunk costs O(chunk) however big the cache is."""
    cache.refresh()
    progress = [Progress(job) for job in jobs]
    active = progress
    while active:
        ids = [call_id(p.job, endpoints[p.job.teacher_role], p.previous) for p in active]
        rows = cache.lookup(ids)
        still = []
        for p, rid in zip(active, ids):
            row = rows.get(rid)
            if row is None or (row["status"] != "ok" and retry_failed):
                continue  # pending at this call
            p.calls.append(row)
            if row["status"] != "ok":
                p.state = "failed"
            elif len(p.calls) == p.job.calls:
                p.state = "done"
            else:
                still.append(p)
        active = still
    return progress


def trace_row(p: Progress, endpoint: TeacherEndpoint) -> dict[str, Any]:
    """The trace of a finished (done or failed) job."""
    job, calls = p.job, p.calls
    last = calls[-1]
    return {
        "request_id": last["request_id"],
        "call_ids": [c["request_id"] for c in calls],
        "source_id": job.source_id, "source": job.source, "task_name": job.task_name,
        "template_type": job.template_type, "sub_collection": job.sub_collection, "stage": job.stage,
        "teacher_role": job.teacher_role, "teacher_model": endpoint.model, "strategy": job.strategy,
        "system_message_id": job.system_message_id, "teacher_system": job.teacher_system,
        "student_system": job.student_system, "user": job.user, "reference": job.reference,
        "response": join_turns([c["response"] for c in calls]) if p.state == "done" else "",
        "finish_reason": last["finish_reason"],
        "prompt_tokens": sum(c["prompt_tokens"] for c in calls),
        "completion_tokens": sum(c["completion_tokens"] for c in calls),
        "cost_usd": sum(c["cost_usd"] for c in calls),
        "latency_ms": sum(c["latency_ms"] for c in calls),
        "attempts": sum(c["attempts"] for c in calls),
        "status": last["status"], "verdict": "", "created_at": last["created_at"] or now_iso(),
        "schema_version": SCHEMA_VERSION,
    }


# -- builders ----------------------------------------------------------------------
# The source columns the builders read: a pass over millions of rows decodes only these.
JOB_COLUMNS = ["id", "source", "task_name", "template_type", "sub_collection", "inputs", "answer", "multiple_choice"]


def _base(row: dict[str, Any]) -> dict[str, Any]:
    return {"source_id": row["id"], "source": row["source"], "task_name": row["task_name"],
            "template_type": row["template_type"], "sub_collection": row["sub_collection"],
            "user": row["inputs"], "reference": row["answer"]}


def orca1_jobs(rows: Iterable[dict[str, Any]], recipe: Recipe) -> Iterator[TraceJob]:
    """Orca 1: the assistant teacher answers every prompt, the strong teacher a random subset (each `samples` times)."""
    seed, teachers = recipe.seed, recipe.teachers
    for row in rows:
        if row["sub_collection"] == "dialog":
            continue
        message_id, system = pick_orca1_system_message(row["id"], row["sub_collection"], row["multiple_choice"], seed)
        common = dict(_base(row), stage="orca1", strategy="", system_message_id=message_id,
                      teacher_system=system, student_system=system)
        for sample in range(teachers.assistant.samples):
            yield TraceJob(teacher_role="assistant", sample=sample, **common)
        if in_strong_subset(row["id"], recipe.prompts.strong_fraction, seed):
            for sample in range(teachers.strong.samples):
                yield TraceJob(teacher_role="strong", sample=sample, **common)


def orca2_jobs(rows: Iterable[dict[str, Any]], recipe: Recipe, strategy_of: dict[str, str]) -> Iterator[TraceJob]:
    """Orca 2: the strong teacher answers with the task's strategy; the student sees the generic message."""
    for row in rows:
        strategy = strategy_of.get(row["task_name"]) or strategy_of.get("*")
        if not strategy:
            raise ValueError(f"no strategy for task {row['task_name']!r} (prompts.strategies / default_strategy)")
        for sample in range(recipe.teachers.strong.samples):
            yield TraceJob(**_base(row), stage="orca2", teacher_role="strong", strategy=strategy, system_message_id=0,
                           teacher_system=STRATEGIES[strategy].instruction,
                           student_system=recipe.prompts.generic_system_message, sample=sample)


def selection_jobs(rows: Iterable[dict[str, Any]], recipe: Recipe, candidates: list[str]) -> Iterator[TraceJob]:
    """Strategy selection: every candidate strategy on each gold-labelled sample, by the strong teacher."""
    for row in rows:
        for strategy in candidates:
            for sample in range(recipe.teachers.strong.samples):  # more samples: a better estimate of each strategy
                yield TraceJob(**_base(row), stage="selection", teacher_role="strong", strategy=strategy,
                               system_message_id=0, teacher_system=STRATEGIES[strategy].instruction,
                               student_system=recipe.prompts.generic_system_message, sample=sample)
