"""Rate limits shared by every caller of an endpoint, without a round trip per request.

- The `Gate` (one per run: an object in-process, one async actor on Ray) owns
  each endpoint's limits as a schedule: every request gets a time slot, and
  takes max(1/requests-rate, its tokens/tokens-rate) of it (the generic cell
  rate algorithm). Sends are evenly paced across all workers and nodes, so a
  provider's sliding window never sees a burst over its limit.
- Callers never ask it per request. Each worker holds a `LeasedLimiter` per
  endpoint that leases permits in blocks: the next slots of the schedule
  (about `block_s` of it, shared among the workers that want some), with their
  dollars. The gate answers at once (only a missing concurrency share or
  dollars all reserved make it wait), so it sees O(requests / block) calls; the
  worker sends each request at its slot. A permit not used within `ttl_s`
  (0.2 s) of its slot expires: nobody saves permits up to burst later, and a
  stalled process resumes with at most 0.2 s of sends overdue (the schedule
  runs 2 % under the limits, which covers that over windows of 10 s and more).
- Concurrency: the gate splits `max_concurrency` into shares among the workers
  that have demand and rebalances them at each lease; a worker's share never
  takes slots another still holds, so the total never exceeds the cap.
- A 429's Retry-After, or `x-ratelimit-remaining-*` below what is in flight,
  pauses everyone: the schedule restarts after the pause (the other workers
  learn it at their next lease, within `block_s`), and the worker that pauses
  drops the permits it holds (they would all fall due at once when it ends).
  A lower `x-ratelimit-limit-requests/-tokens` than configured lowers the rate.
- Budget: dollars are reserved at lease time (an upper bound per request),
  settled at the next lease; once `max_cost_usd` is spent no lease is granted.
  A run may overshoot by the requests in flight, never by more.

Plain asyncio: all methods of one object run in one event loop, so no locks
beyond the conditions are needed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from orca_core.teacher.headers import RateLimitHeaders


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
        try:
            await asyncio.wait_for(e.changed.wait(), timeout=max(seconds, 0.001))
        except asyncio.TimeoutError:
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


@dataclass
class _Block:
    """Leased permits: slot k (of `count`) falls at `first + k * step`; `dollars` pays for them."""

    first: float
    step: float
    count: int
    tokens_each: float
    dollars: float
    taken: int = 0

    def slot(self) -> float:
        return self.first + self.taken * self.step


@dataclass
class _Unsettled:
    spent_usd: float = 0.0
    unreserved_usd: float = 0.0
    refund_tokens: float = 0.0


GATE_ATTEMPTS = 3  # lease calls before a worker gives the gate up (0.5 s, then 1 s apart)


class GateLost(RuntimeError):
    """The gate does not answer (its run's driver died): stop sending."""


class LeasedLimiter:
    """One worker's view of one endpoint: slots leased in blocks from the gate, spent locally at their times.

    `call(method, *args)` reaches the gate (`gate_caller`): a coroutine in-process, an actor call on Ray.
    Implements the client's `Limiter` protocol: acquire / release / pause / observe.
    """

    def __init__(self, call: Callable[..., Awaitable[Any]], role: str, worker: str, price_per_token: float = 0.0):
        self.call, self.role, self.worker = call, role, worker
        self.price_per_token = price_per_token  # the dearer of the endpoint's two prices: a request's upper bound
        self.blocks: deque[_Block] = deque()
        self.in_flight = self.waiting = self.allowed = 0
        self.in_flight_tokens = self.waiting_tokens = 0.0
        self.paused_until = 0.0
        self.ttl_s = 0.2  # the gate's, from each lease
        self.lead_s = 0.25  # lease again when the permits held run out within this
        self.budget_left = True
        self.unsettled = _Unsettled()
        self.counts: Counter[str] = Counter()
        self._renewing: asyncio.Task | None = None
        self._wait_release = False  # the last lease was empty while requests were out: ask after one ends
        self._stated: tuple = ()
        self._changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # created lazily, inside the running loop
            self._changed = asyncio.Condition()
        return self._changed

    def _expire(self, now: float) -> None:
        """Skip permits whose slot passed more than ttl ago; drop used-up blocks (releasing their dollars)."""
        for block in self.blocks:
            late = math.ceil((now - self.ttl_s - block.first) / block.step) if block.step > 0 else 0
            if late > block.taken:
                self.counts["permits_expired"] += min(late, block.count) - block.taken
                block.taken = min(late, block.count)
        while self.blocks and self.blocks[0].taken >= self.blocks[0].count:
            self.unsettled.unreserved_usd += self.blocks.popleft().dollars

    def _drop_permits(self) -> None:
        for block in self.blocks:
            self.counts["permits_expired"] += block.count - block.taken
            self.unsettled.unreserved_usd += block.dollars
        self.blocks.clear()

    def _fitting(self, tokens: float, dollars: float) -> _Block | None:
        """The block whose next permit a request of `tokens` (and `dollars`) may take; None: no permit fits."""
        if sum(b.dollars for b in self.blocks) < dollars - 1e-12:
            return None
        return next((b for b in self.blocks if b.taken < b.count and tokens <= b.tokens_each + 1e-9), None)

    def _take(self, block: _Block, dollars: float) -> None:
        block.taken += 1
        for b in self.blocks:  # dollars from the oldest blocks first
            used = min(b.dollars, dollars)
            b.dollars, dollars = b.dollars - used, dollars - used

    def _running_short(self, now: float, fitting: _Block | None) -> bool:
        """Time to lease: no permit fits, or those held cover neither the waiting requests nor `lead_s`."""
        if fitting is None:
            return True
        held = sum(b.count - b.taken for b in self.blocks)
        last = max(b.first + (b.count - 1) * b.step for b in self.blocks)
        return held < self.waiting and last - now < self.lead_s

    async def acquire(self, tokens: int) -> bool:
        """Wait for a permit and its slot; False (and nothing taken) once the budget is spent."""
        dollars = tokens * self.price_per_token
        self.waiting += 1
        self.waiting_tokens += tokens
        try:
            async with self.changed:
                while True:
                    if not self.budget_left:
                        return False
                    now = time.monotonic()
                    self._expire(now)
                    timeout = self.ttl_s
                    if self.paused_until > now:
                        timeout = self.paused_until - now
                    elif self.in_flight < self.allowed or self.allowed == 0:
                        block = self._fitting(tokens, dollars)
                        if block is not None and block.slot() <= now and self.in_flight < self.allowed:
                            self._take(block, dollars)  # its slot has come: send now
                            self.in_flight += 1
                            self.in_flight_tokens += tokens
                            return True
                        if block is not None:
                            timeout = block.slot() - now  # paced: wait for the slot
                        if self._running_short(now, block) and not (self._wait_release and self.in_flight):
                            self._renew(tokens)  # ask the gate (one call at a time)
                    # else every slot of the share is busy: until a release
                    try:  # woken by a lease or a release, else at a slot, an expiry or the end of a pause
                        await asyncio.wait_for(self.changed.wait(), timeout=timeout)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self.waiting -= 1
            self.waiting_tokens -= tokens

    def _renew(self, tokens: float) -> None:
        if self._renewing is not None:
            if not self._renewing.done():
                return
            if (error := self._renewing.exception()) is not None:
                raise GateLost(f"{self.role}: the rate-limit gate does not answer ({error!r})") from error
        self._renewing = asyncio.create_task(self._lease(tokens))

    async def _lease(self, tokens: float) -> None:
        # Ask for what waits, or a window (2 x the share): a fast endpoint costs a lease per window.
        wanted = max(self.waiting, 2 * self.allowed, 1)
        tokens_each = max(tokens, self.waiting_tokens / max(1, self.waiting))
        settle, self.unsettled = self.unsettled, _Unsettled()
        ask = LeaseAsk(wanted, tokens_each, tokens_each * self.price_per_token, self.in_flight, self.waiting,
                       settle.spent_usd, settle.unreserved_usd, settle.refund_tokens)
        try:
            for attempt in range(GATE_ATTEMPTS):  # a gate on a busy or recovering node may miss one call
                try:
                    lease: Lease = await self.call("lease", self.role, self.worker, ask)
                    break
                except Exception:
                    if attempt == GATE_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.5 * 2 ** attempt)
        finally:
            async with self.changed:
                self.changed.notify_all()  # waiters see the lease, or the error
        self.counts["leases"] += 1
        async with self.changed:
            now = time.monotonic()
            self.ttl_s = lease.ttl_s
            self.allowed, self.budget_left = lease.concurrency, lease.budget_left
            self._wait_release = not lease.requests
            self.paused_until = max(self.paused_until, now + lease.pause_s)
            if lease.requests:
                self.blocks.append(_Block(now + lease.first_in_s, lease.step_s, lease.requests, lease.tokens_each,
                                          lease.dollars))
            self.changed.notify_all()

    async def release(self, estimated_tokens: int = 0, used_tokens: int = 0, cost_usd: float = 0.0) -> None:
        """A request finished: free its slot; its cost and unused tokens are settled at the next lease."""
        self.unsettled.spent_usd += cost_usd
        self.unsettled.unreserved_usd += estimated_tokens * self.price_per_token
        self.unsettled.refund_tokens += max(0, estimated_tokens - used_tokens)
        async with self.changed:
            self.in_flight -= 1
            self.in_flight_tokens -= estimated_tokens
            self._wait_release = False
            self.changed.notify_all()
        if not self.in_flight and not self.waiting and (self.unsettled.spent_usd or any(b.dollars for b in self.blocks)):
            self._settle_idle()

    def _settle_idle(self) -> None:
        """Nothing left to send: give back the dollars held and report what was spent, at once (other workers
        may be waiting for them), with the concurrency share."""
        if self._renewing is not None and not self._renewing.done():
            return  # that lease settles
        self._drop_permits()
        settle, self.unsettled = self.unsettled, _Unsettled()
        ask = LeaseAsk(0, 0.0, 0.0, 0, 0, settle.spent_usd, settle.unreserved_usd, settle.refund_tokens)
        self._renewing = asyncio.create_task(self._settled(ask))

    async def _settled(self, ask: LeaseAsk) -> None:
        lease: Lease = await self.call("lease", self.role, self.worker, ask)
        async with self.changed:
            self.allowed, self.budget_left = lease.concurrency, lease.budget_left
            self.changed.notify_all()

    async def pause(self, seconds: float, reason: str = "rate_limited") -> None:
        """Honour a Retry-After here at once (the permits held are dropped), and at the gate for everyone."""
        until = time.monotonic() + seconds
        if until <= self.paused_until + 0.1:
            return  # already paused that long: no call
        self.paused_until = until
        self._drop_permits()
        self.counts[f"pause:{reason}"] += 1
        await self.call("pause", self.role, seconds, reason)

    async def observe(self, headers: RateLimitHeaders) -> None:
        """Adapt to the provider's x-ratelimit-* headers: pause while they say its window is spent."""
        if headers.remaining_requests is not None and headers.reset_requests_s \
                and headers.remaining_requests < self.in_flight:
            await self.pause(headers.reset_requests_s, "ratelimit_remaining")
        if headers.remaining_tokens is not None and headers.reset_tokens_s \
                and headers.remaining_tokens < self.in_flight_tokens:
            await self.pause(headers.reset_tokens_s, "ratelimit_remaining")
        stated = (headers.limit_requests, headers.limit_tokens)
        if any(stated) and stated != self._stated:
            self._stated = stated
            await self.call("adapt", self.role, headers.limit_requests, headers.limit_tokens)

    async def leave(self) -> None:
        """The worker closes: settle what is left and hand its shares back."""
        await self.call("leave", self.worker, {self.role: self.final_settlement()})

    def final_settlement(self) -> LeaseAsk:
        """What is still unsettled when the worker closes (for `Gate.leave`)."""
        self._drop_permits()
        s = self.unsettled
        return LeaseAsk(0, 0.0, 0.0, 0, 0, s.spent_usd, s.unreserved_usd, s.refund_tokens)


def gate_limits(endpoints: dict) -> dict[str, dict]:
    """EndpointGate settings per role from the recipe's teacher endpoints."""
    return {role: {"rpm": e.rpm, "tpm": e.tpm, "max_concurrency": e.max_concurrency} for role, e in endpoints.items()}


def price_per_token(endpoint) -> float:
    """Upper bound of one token's price at an endpoint (for reserving a request's dollars)."""
    return max(endpoint.price_prompt_per_1k, endpoint.price_completion_per_1k) / 1000


def gate_caller(gate, remote: bool = False) -> Callable[..., Awaitable[Any]]:
    """`call(method, *args)` for a Gate object (in-process) or a Gate actor handle (Ray)."""
    async def call(method: str, *args):
        fn = getattr(gate, method)
        return await (fn.remote(*args) if remote else fn(*args))
    return call
