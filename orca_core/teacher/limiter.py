"""A worker's side of the rate limits: permits leased in blocks from the run's gate (`gate.py`), spent at
their slots, so that no caller asks the gate per request.

- Each worker holds a `LeasedLimiter` per endpoint (the client's `Limiter`).
  A request waits for a permit whose slot has come and sends then: sends are
  evenly paced across every worker and node, and the gate sees one call per
  block of slots (O(requests / block)).
- A permit not used within `ttl_s` (0.2 s) of its slot expires: nobody saves
  permits up to burst later, and a stalled process resumes with at most 0.2 s
  of sends overdue (the schedule runs 2 % under the limits, which covers that
  over windows of 10 s and more).
- A 429's Retry-After, or `x-ratelimit-remaining-*` below what is in flight,
  pauses this worker at once and everyone at the gate (the others learn it at
  their next lease); the permits held are dropped (they would all fall due
  when the pause ends). A lower `x-ratelimit-limit-*` lowers the gate's rate.
- Dollars come with the permits (an upper bound per request); costs and
  reservations are settled at the next lease, or at once when the worker has
  nothing left to send. A run overshoots `max_cost_usd` by at most what is in flight.
- A gate that stops answering (its driver died) raises `GateLost`: the worker
  stops sending.

Plain asyncio: all methods of one object run in one event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from orca_core.teacher.gate import Lease, LeaseAsk
from orca_core.teacher.headers import RateLimitHeaders


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
                        async with asyncio.timeout(timeout):  # not wait_for: see Gate._wait
                            await self.changed.wait()
                    except TimeoutError:
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


def price_per_token(endpoint) -> float:
    """Upper bound of one token's price at an endpoint (for reserving a request's dollars)."""
    return max(endpoint.price_prompt_per_1k, endpoint.price_completion_per_1k) / 1000


def gate_caller(gate, remote: bool = False) -> Callable[..., Awaitable[Any]]:
    """`call(method, *args)` for a Gate object (in-process) or a Gate actor handle (Ray)."""
    async def call(method: str, *args):
        fn = getattr(gate, method)
        return await (fn.remote(*args) if remote else fn(*args))
    return call
