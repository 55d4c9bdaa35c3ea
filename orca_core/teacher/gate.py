"""The rate-limit gate: one per run (an object in-process, one async actor on Ray), the only holder of
each endpoint's limits and of the run's budget.

- Requests/min and tokens/min are a schedule: every request gets a time slot and
  takes max(1/requests-rate, its tokens/tokens-rate) of it (the generic cell rate
  algorithm), 2 % under the stated limits. A lease books the next slots, about
  `block_s` of the schedule shared among the workers that want some, and never
  more than `block_s` ahead; workers send at the slots (`limiter.LeasedLimiter`).
- `max_concurrency` is split into shares among the workers with demand,
  rebalanced at each lease; a share never takes slots another worker still holds.
- A pause (Retry-After, spent x-ratelimit headers) moves the schedule past it;
  a provider's lower stated limit lowers the rate.
- Dollars are reserved per lease (an upper bound per request) and settled at
  the next one; once `max_cost_usd` is spent nothing more is granted.

Plain asyncio: all methods run in one event loop, so no locks beyond the conditions are needed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any


class Budget:
    """Dollars of this run, shared by every endpoint: spent, and reserved by leases not yet settled."""

    def __init__(self, max_cost_usd: float | None = None):
        self.max_cost_usd, self.spent_usd, self.reserved_usd = max_cost_usd, 0.0, 0.0

    def left(self) -> bool:
        return self.max_cost_usd is None or self.spent_usd < self.max_cost_usd

    def grant(self, wanted: float, each: float) -> float:
        """Dollars to reserve for `wanted`: what is unreserved, at least one request's `each` while any is left."""
        if self.max_cost_usd is None:
            return wanted
        free = self.max_cost_usd - self.spent_usd - self.reserved_usd
        granted = min(wanted, free) if free >= each else (each if free > 0 else 0.0)
        self.reserved_usd += granted
        return granted

    def settle(self, spent: float, unreserved: float) -> None:
        self.spent_usd += spent
        self.reserved_usd = max(0.0, self.reserved_usd - unreserved)


@dataclass
class LeaseAsk:
    """What a worker wants from the gate, and what it settles from earlier leases."""

    requests: int  # permits wanted
    tokens_each: float  # estimated tokens of one request
    dollars_each: float  # upper bound of the cost of one request
    in_flight: int
    waiting: int
    spent_usd: float = 0.0  # settled: cost of finished requests ...
    unreserved_usd: float = 0.0  # ... and the reservations they (and expired permits) release
    refund_tokens: float = 0.0  # estimated minus used tokens of finished requests


@dataclass
class Lease:
    requests: int
    first_in_s: float  # the first permit's slot, seconds from now ...
    step_s: float  # ... and the spacing of the next ones
    tokens_each: float
    dollars: float
    concurrency: int  # the worker's share of max_concurrency
    pause_s: float  # nobody sends before this many seconds from now
    ttl_s: float  # a permit expires this long after its slot
    budget_left: bool


# The schedule runs this much under the stated limits: a send that timing jitter (event loops, the
# network) delays lands next to an on-time one, and a provider counting over a short sliding window
# would see one request too many.
HEADROOM = 0.02


class EndpointGate:
    """One endpoint's schedule, pause and concurrency shares."""

    def __init__(self, rpm: int, tpm: int | None = None, max_concurrency: int = 16):
        self.rpm, self.tpm, self.max_concurrency = rpm, tpm, max_concurrency
        self.requests_next = self.tokens_next = 0.0  # the earliest next slot by requests and by tokens
        self.paused_until = 0.0
        self.held: dict[str, int] = {}  # worker -> concurrency share it may use (>= its requests in flight)
        self.demanding: set[str] = set()
        self.changed = asyncio.Condition()
        self.counts: Counter[str] = Counter()
        self.pauses: Counter[str] = Counter()

    def share(self, worker: str, in_flight: int, demand: int) -> int:
        """Fair share among workers with demand, never taking slots the others hold."""
        (self.demanding.add if demand else self.demanding.discard)(worker)
        fair = math.ceil(self.max_concurrency / max(1, len(self.demanding)))
        others = sum(n for w, n in self.held.items() if w != worker)
        allowed = max(in_flight, min(demand, fair, self.max_concurrency - others))
        self.held[worker] = allowed
        return allowed

    def leave(self, worker: str) -> None:
        self.held.pop(worker, None)
        self.demanding.discard(worker)

    def _per_request(self) -> float:
        return 60.0 / (self.rpm * (1 - HEADROOM))

    def _per_token(self) -> float:
        return 60.0 / (self.tpm * (1 - HEADROOM)) if self.tpm else 0.0

    def step(self, tokens_each: float) -> float:
        """Seconds of the schedule one request takes."""
        return max(self._per_request(), tokens_each * self._per_token())

    def schedule(self, count: int, tokens_each: float, now: float) -> tuple[float, float]:
        """Book `count` slots: the first one's time and their spacing."""
        step = self.step(tokens_each)
        first = max(now, self.paused_until, self.requests_next, self.tokens_next)
        last = first + (count - 1) * step
        self.requests_next = last + self._per_request()
        self.tokens_next = last + tokens_each * self._per_token()
        return first, step

    def refund(self, tokens: float, now: float) -> None:
        """Tokens estimated but not used give their share of the schedule back."""
        if self.tpm and tokens > 0:
            self.tokens_next = max(now, self.tokens_next - tokens * self._per_token())


class Gate:
    """Every endpoint's limits plus the run's budget: what the Ray layer hosts in one actor."""

    def __init__(self, limits: dict[str, dict], max_cost_usd: float | None = None, ttl_s: float = 0.2,
                 block_s: float = 0.5, max_wait_s: float = 5.0):
        self.budget = Budget(max_cost_usd)
        self.endpoints = {role: EndpointGate(**kw) for role, kw in limits.items()}
        self.ttl_s, self.block_s, self.max_wait_s = ttl_s, block_s, max_wait_s

    async def lease(self, role: str, worker: str, ask: LeaseAsk) -> Lease:
        """Settle, then book the next slots. Waits only while the schedule is booked over `block_s` ahead,
        for a concurrency share, or for unreserved dollars; at most `max_wait_s` (then grants nothing)."""
        e = self.endpoints[role]
        deadline = time.monotonic() + self.max_wait_s
        async with e.changed:
            self.budget.settle(ask.spent_usd, ask.unreserved_usd)
            e.refund(ask.refund_tokens, time.monotonic())
            e.counts["leases"] += 1
            e.changed.notify_all()  # settled dollars may unblock another worker
            while True:
                now = time.monotonic()
                allowed = e.share(worker, ask.in_flight, ask.in_flight + ask.waiting)
                if not self.budget.left() or ask.requests <= 0 or 0 < ask.in_flight >= allowed:
                    return self._lease(e, now, allowed)  # out of budget, or the worker waits for its own requests
                lead = max(e.requests_next, e.tokens_next) - now
                if lead > self.block_s and now < deadline:  # booked far enough ahead: wait until it is not
                    await self._wait(e, min(lead - self.block_s, deadline - now))
                    continue
                if allowed > ask.in_flight:  # else no share yet: until another worker's share shrinks
                    per_worker = self.block_s / e.step(ask.tokens_each) / max(1, len(e.demanding))
                    count, dollars = min(ask.requests, max(1, int(per_worker))), 0.0
                    if ask.dollars_each > 0:
                        dollars = self.budget.grant(ask.dollars_each * count, ask.dollars_each)
                        count = min(count, int(dollars / ask.dollars_each + 1e-9))
                    if count:
                        first, step = e.schedule(count, ask.tokens_each, now)
                        e.counts["granted"] += count
                        fits = ask.tokens_each if e.tpm else float("inf")  # without a token limit, any request fits
                        return self._lease(e, now, allowed, count, first - now, step, fits, dollars)
                    if ask.in_flight:  # every dollar left is reserved, some by this worker: it settles them soon
                        return self._lease(e, now, allowed)
                if now >= deadline:
                    return self._lease(e, now, allowed)
                await self._wait(e, deadline - now)  # until a settlement or a changed share

    @staticmethod
    async def _wait(e: EndpointGate, seconds: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 a wait_for cancelled twice (a worker stops its jobs on a
        # fatal error, then closes) returns before its inner wait() has taken the lock back, which it then holds
        # for good, and the run hangs at exit.
        try:
            async with asyncio.timeout(max(seconds, 0.001)):
                await e.changed.wait()
        except TimeoutError:
            pass

    def _lease(self, e: EndpointGate, now: float, allowed: int, count: int = 0, first_in_s: float = 0.0,
               step_s: float = 0.0, tokens_each: float = 0.0, dollars: float = 0.0) -> Lease:
        return Lease(count, first_in_s, step_s, tokens_each, dollars, allowed, max(0.0, e.paused_until - now),
                     self.ttl_s, self.budget.left())

    async def pause(self, role: str, seconds: float, reason: str = "rate_limited") -> None:
        """Nobody sends for `seconds`: the schedule resumes after the pause, paced (no burst when it ends)."""
        e = self.endpoints[role]
        e.paused_until = max(e.paused_until, time.monotonic() + seconds)
        e.pauses[reason] += 1

    async def adapt(self, role: str, rpm: int | None = None, tpm: int | None = None) -> None:
        """The provider states lower limits than configured: use them."""
        e = self.endpoints[role]
        if rpm and rpm < e.rpm:
            e.rpm = rpm
            e.counts["rpm_lowered"] += 1
        if tpm and e.tpm and tpm < e.tpm:
            e.tpm = tpm
            e.counts["tpm_lowered"] += 1

    async def leave(self, worker: str, settle: dict[str, LeaseAsk] | None = None) -> None:
        """A worker closed (or died): its shares go to the others; its last settlements count."""
        for role, e in self.endpoints.items():
            async with e.changed:
                if settle and role in settle:
                    self.budget.settle(settle[role].spent_usd, settle[role].unreserved_usd)
                e.leave(worker)
                e.changed.notify_all()

    def stats(self) -> dict[str, Any]:
        return {"spent_usd": round(self.budget.spent_usd, 6), "budget_left": self.budget.left(),
                "endpoints": {role: {**e.counts, "pauses": dict(e.pauses)} for role, e in self.endpoints.items()}}


def gate_limits(endpoints: dict) -> dict[str, dict]:
    """EndpointGate settings per role from the recipe's teacher endpoints."""
    return {role: {"rpm": e.rpm, "tpm": e.tpm, "max_concurrency": e.max_concurrency} for role, e in endpoints.items()}
