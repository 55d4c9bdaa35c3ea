"""One rate limiter per teacher endpoint, shared by every caller (every Ray actor).

- requests/min and tokens/min as token buckets refilled continuously, so the
  rate is smooth: a server enforcing a sliding 60 s window never sees a burst
  over its limit (a 60 s client window would send a minute's quota at once);
- concurrency: at most `max_concurrency` requests in flight across all callers;
- a 429's Retry-After pauses everyone, not just the caller that got it;
- budget: once `max_cost_usd` is spent, `acquire` refuses (returns False) and
  no new request goes out; requests already in flight may overshoot by their
  own cost.

Plain asyncio: the Ray layer wraps it as an async actor (all methods run in
the actor's one event loop, so no locks beyond the condition are needed).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter


class Bucket:
    """A token bucket: `rate` per second, holding at most `capacity`."""

    def __init__(self, per_minute: float, burst_seconds: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = 1.0  # start (nearly) empty: an opening burst would overrun a provider's sliding window
        self.updated = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0: take it now). Oversized amounts wait for a full bucket."""
        self._refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount  # may go negative for an oversized request: later callers wait it off

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class Budget:
    """Dollars spent in this run, shared by every endpoint's limiter."""

    def __init__(self, max_cost_usd: float | None = None):
        self.max_cost_usd, self.spent_usd = max_cost_usd, 0.0

    def left(self) -> bool:
        return self.max_cost_usd is None or self.spent_usd < self.max_cost_usd


class RateLimiter:
    def __init__(self, rpm: int, tpm: int | None = None, max_concurrency: int = 16,
                 budget: Budget | None = None, burst_seconds: float = 1.0):
        self.requests = Bucket(rpm, burst_seconds)
        self.tokens = Bucket(tpm, burst_seconds) if tpm else None
        self.max_concurrency = max_concurrency
        self.budget = budget or Budget()
        self.in_flight = 0
        self.paused_until = 0.0
        self.sent = 0
        self.pauses: Counter[str] = Counter()
        self._changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # created lazily, inside the running loop
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, tokens: int) -> bool:
        """Wait for a slot; False (and nothing taken) once the budget is spent."""
        async with self.changed:
            while True:
                if not self.budget.left():
                    return False
                now = time.monotonic()
                wait = max(self.paused_until - now, self.requests.wait_for(1, now),
                           self.tokens.wait_for(tokens, now) if self.tokens else 0.0)
                if wait <= 0 and self.in_flight < self.max_concurrency:
                    self.requests.take(1)
                    if self.tokens:
                        self.tokens.take(tokens)
                    self.in_flight += 1
                    self.sent += 1
                    return True
                try:  # woken early by a release, or time out when the buckets have refilled
                    await asyncio.wait_for(self.changed.wait(), timeout=wait if wait > 0 else None)
                except asyncio.TimeoutError:
                    pass

    async def release(self, estimated_tokens: int = 0, used_tokens: int = 0, cost_usd: float = 0.0) -> None:
        """A request finished: free its slot, refund unused tokens, add its cost."""
        async with self.changed:
            self.in_flight -= 1
            self.budget.spent_usd += cost_usd
            if self.tokens and estimated_tokens > used_tokens:
                self.tokens.give_back(estimated_tokens - used_tokens)
            self.changed.notify_all()

    async def pause(self, seconds: float, reason: str = "rate_limited") -> None:
        """Honour a Retry-After: nobody sends for `seconds`."""
        async with self.changed:
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)
            self.pauses[reason] += 1

    def stats(self) -> dict:
        return {"sent": self.sent, "in_flight": self.in_flight, "pauses": dict(self.pauses)}


class Gate:
    """Every endpoint's limiter plus the run's budget: what the Ray layer hosts in one actor."""

    def __init__(self, limits: dict[str, dict], max_cost_usd: float | None = None):
        self.budget = Budget(max_cost_usd)
        self.limiters = {role: RateLimiter(**kw, budget=self.budget) for role, kw in limits.items()}

    async def acquire(self, role: str, tokens: int) -> bool:
        return await self.limiters[role].acquire(tokens)

    async def release(self, role: str, estimated_tokens: int = 0, used_tokens: int = 0, cost_usd: float = 0.0) -> None:
        await self.limiters[role].release(estimated_tokens, used_tokens, cost_usd)

    async def pause(self, role: str, seconds: float, reason: str = "rate_limited") -> None:
        await self.limiters[role].pause(seconds, reason)

    def stats(self) -> dict:
        return {"spent_usd": round(self.budget.spent_usd, 6), "budget_left": self.budget.left(),
                "endpoints": {role: limiter.stats() for role, limiter in self.limiters.items()}}


class RoleLimiter:
    """One role's view of a Gate (local) or of a Gate actor (Ray: pass `remote=True`)."""

    def __init__(self, gate, role: str, remote: bool = False):
        self.gate, self.role, self.remote = gate, role, remote

    async def _call(self, method: str, *args):
        fn = getattr(self.gate, method)
        return await (fn.remote(self.role, *args) if self.remote else fn(self.role, *args))

    async def acquire(self, tokens: int) -> bool:
        return await self._call("acquire", tokens)

    async def release(self, estimated_tokens: int = 0, used_tokens: int = 0, cost_usd: float = 0.0) -> None:
        await self._call("release", estimated_tokens, used_tokens, cost_usd)

    async def pause(self, seconds: float, reason: str = "rate_limited") -> None:
        await self._call("pause", seconds, reason)


def gate_limits(endpoints: dict) -> dict[str, dict]:
    """RateLimiter settings per role from the recipe's teacher endpoints."""
    return {role: {"rpm": e.rpm, "tpm": e.tpm, "max_concurrency": e.max_concurrency} for role, e in endpoints.items()}
