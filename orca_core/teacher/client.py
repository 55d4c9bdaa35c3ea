"""The OpenAI-compatible chat client (OpenAI, Azure OpenAI, vLLM's server, the oracle).

`TeacherClient.call` never raises for one bad request. It retries transient
errors (429, 5xx, timeouts, connection errors, malformed JSON) with
exponential backoff and jitter, up to `max_attempts`, and returns the final
failure as a `CallResult` with status `failed:<reason>`. Permanent errors
(context too long, content filter, empty answer, 4xx other than those below)
fail at once. Errors that would fail every request (bad key, unknown model,
missing key variable, a 400 that is not about this request's length or
content: a wrong parameter, an unsupported field, a malformed body) raise
`FatalTeacherError`, which stops the fan-out before it writes a million
failure rows (`bad_request_reason` tells the two kinds of 400 apart). A
refused budget raises `BudgetExhausted`.

The API key is read from the environment variable the recipe names; it goes
into the request header and nowhere else (never a row, log or message).

Every response's rate-limit headers reach the limiter: `Retry-After` (seconds
or HTTP-date) and `retry-after-ms` time a 429's pause; `x-ratelimit-*` let it
pause before the provider refuses (`headers.py`).

The client is aiohttp, not the official `openai` SDK: inside Ray actors,
against a 100 ms endpoint at 64 in flight, aiohttp reached 144-204 req/s and
`openai.AsyncOpenAI` 88-156 (DESIGN.md, measured here), and the SDK's own
retries and timeouts would stack on ours. The `openai` dependency stays for the
Batch API mode (`batch.py`: file uploads, the Azure variants) and the tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from orca_core.recipe.models import TeacherEndpoint
from orca_core.teacher.headers import RateLimitHeaders, rate_limit_headers, retry_after_seconds
from orca_core.teacher.identity import describe


class FatalTeacherError(RuntimeError):
    """The endpoint refuses every request (auth, unknown model, a bad request): stop, nothing collected is lost."""


# A 400 that only this request gets, from its prompt: a failure row, and the run goes on. OpenAI (and Groq) name
# the error in `code`; vLLM's server sends type BadRequestError, `code` 400 and only says so in the message
# ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens ...", "The decoder
# prompt (length 5000) is longer than the maximum model length of 4096").
CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded"})
CONTEXT_LENGTH_PHRASES = ("maximum context length", "maximum model length", "reduce the length of the messages")
# OpenAI's prompt flagged by moderation (`invalid_prompt`, `content_policy_violation`), Azure's content filter.
CONTENT_FILTER_CODES = frozenset({"content_filter", "invalid_prompt", "content_policy_violation"})
ERROR_DETAIL_CHARS = 300  # of the provider's message in a fatal error


class BudgetExhausted(RuntimeError):
    """teachers.max_cost_usd is spent: no new requests."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class _Permanent(Exception):
    def __init__(self, reason: str, usage: dict | None = None):
        super().__init__(reason)
        self.reason, self.usage = reason, usage or {}


class Limiter(Protocol):
    async def acquire(self, tokens: int) -> bool: ...
    async def release(self, estimated_tokens: int = 0, used_tokens: int = 0, cost_usd: float = 0.0) -> None: ...
    async def pause(self, seconds: float, reason: str = "rate_limited") -> None: ...
    async def observe(self, headers: RateLimitHeaders) -> None: ...


@dataclass(frozen=True)
class CallResult:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    attempts: int
    status: str  # ok | failed:<reason>


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """A cheap upper-ish estimate (no tokenizer download): ~4 characters per token, 4 per message."""
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in messages)


def call_cost(endpoint: TeacherEndpoint, prompt_tokens: int, completion_tokens: int) -> float:
    """Dollars of a call at the endpoint's prices (what a run pays, what `orca plan` prices), less the Batch
    API's discount for a `mode: batch` endpoint."""
    online = prompt_tokens / 1000 * endpoint.price_prompt_per_1k + completion_tokens / 1000 * endpoint.price_completion_per_1k
    return online * (1 - endpoint.batch.discount) if endpoint.mode == "batch" else online


class TeacherClient:
    def __init__(self, endpoint: TeacherEndpoint, base_url: str, limiter: Limiter, session: aiohttp.ClientSession,
                 role: str | None = None):
        self.endpoint, self.limiter, self.session = endpoint, limiter, session
        self.who = describe(endpoint, role)  # names the endpoint and its key's variable in fatal errors
        base = base_url.rstrip("/")
        key = None
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise FatalTeacherError(f"{self.who}: environment variable {endpoint.api_key_env} is not set")
        if endpoint.kind == "azure":
            self.url = f"{base}/openai/deployments/{endpoint.model}/chat/completions?api-version={endpoint.api_version}"
            self._headers = {"api-key": key} if key else {}
        else:
            self.url = f"{base}/chat/completions"
            self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return call_cost(self.endpoint, prompt_tokens, completion_tokens)

    def _failure(self, reason: str, attempts: int, started: float, usage: dict | None = None) -> CallResult:
        usage = usage or {}
        p, c = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        return CallResult("", "", p, c, self.cost(p, c), (time.perf_counter() - started) * 1000, attempts, f"failed:{reason}")

    async def call(self, messages: list[dict[str, str]], request_id: str | None = None) -> CallResult:
        """`request_id` goes out as X-Client-Request-Id: the provider's logs (and the oracle's /stats) name it."""
        e = self.endpoint
        started = time.perf_counter()
        prompt_estimate = estimate_prompt_tokens(messages)
        if prompt_estimate + e.max_tokens > e.context_window:
            return self._failure("context_length", 0, started)  # never sent: it cannot fit
        reason = "unknown"
        for attempt in range(1, e.max_attempts + 1):
            estimate = prompt_estimate + e.max_tokens
            if not await self.limiter.acquire(estimate):
                raise BudgetExhausted(f"teacher {e.model}: budget spent")
            used, cost = 0, 0.0
            try:
                content, finish, usage = await self._post(messages, request_id)
                p, c = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
                used, cost = p + c, self.cost(p, c)
                latency = (time.perf_counter() - started) * 1000
                return CallResult(content, finish, p, c, cost, latency, attempt, "ok")
            except _Permanent as err:
                p, c = int(err.usage.get("prompt_tokens", 0)), int(err.usage.get("completion_tokens", 0))
                used, cost = p + c, self.cost(p, c)
                return self._failure(err.reason, attempt, started, err.usage)
            except _Transient as err:
                reason = err.reason
                if err.retry_after:
                    await self.limiter.pause(err.retry_after)
            finally:
                await self.limiter.release(estimate, used, cost)
            if attempt < e.max_attempts:
                delay = min(e.retry_max_s, e.retry_base_s * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # jitter: retries do not stampede
        return self._failure(reason, e.max_attempts, started)

    async def _post(self, messages: list[dict[str, str]], request_id: str | None) -> tuple[str, str, dict[str, Any]]:
        e = self.endpoint
        body = {"model": e.model, "messages": messages, "temperature": e.temperature, "top_p": e.top_p,
                "max_tokens": e.max_tokens}
        headers = {**self._headers, "X-Client-Request-Id": request_id} if request_id else self._headers
        try:
            async with self.session.post(self.url, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=e.timeout_s)) as response:
                text = await response.text()
                status = response.status
                retry_after = retry_after_seconds(response.headers)
                limits = rate_limit_headers(response.headers)
        except asyncio.TimeoutError:
            raise _Transient("timeout") from None
        except aiohttp.ClientError:
            raise _Transient("connection") from None
        await self.limiter.observe(limits)
        if status == 429:
            raise _Transient("rate_limited", retry_after or 1.0)
        if status >= 500:
            raise _Transient(f"http_{status}", retry_after)
        error = error_of(text)
        code = error.get("code")
        if status in (401, 403):
            raise FatalTeacherError(f"{self.who}: HTTP {status}, the key was refused ({code or 'unauthorized'})")
        if status == 404:
            raise FatalTeacherError(f"{self.who}: HTTP 404 ({code or 'not found'}): no such model or path")
        if status >= 400:
            reason = bad_request_reason(error)
            if reason is None and status == 400:
                detail = str(error.get("message") or text)[:ERROR_DETAIL_CHARS]
                raise FatalTeacherError(f"{self.who}: HTTP 400, the endpoint refuses the request itself, so it would "
                                        f"refuse every one ({code or error.get('type') or 'bad request'}: "
                                        f"{detail})")
            raise _Permanent(reason or f"http_{status}")
        try:
            payload = json.loads(text)
            choice = payload["choices"][0]
            content = choice["message"].get("content") or ""
            finish = choice.get("finish_reason") or "stop"
            usage = payload.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Transient("malformed") from None
        if finish == "content_filter":
            raise _Permanent("content_filter", usage)
        if not content.strip():
            raise _Permanent("empty", usage)
        return content, finish, usage


def error_of(body: str | dict[str, Any]) -> dict[str, Any]:
    """The `error` object of an error response's body (text or parsed), {} when it has none."""
    try:
        error = (json.loads(body) if isinstance(body, str) else body).get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def bad_request_reason(error: dict[str, Any]) -> str | None:
    """The failure reason of a 4xx that only this request gets (`context_length`, `content_filter`), or None:
    the request itself is refused (a wrong parameter, an unsupported field, a malformed body), so every other
    would be too. `error` is the response's `error` object (`error_of`)."""
    code = error.get("code")
    code = code.lower() if isinstance(code, str) else ""  # vLLM's code is the HTTP status, a number
    message = str(error.get("message") or "").lower()
    if code in CONTEXT_LENGTH_CODES or any(phrase in message for phrase in CONTEXT_LENGTH_PHRASES):
        return "context_length"
    if code in CONTENT_FILTER_CODES:
        return "content_filter"
    return None
