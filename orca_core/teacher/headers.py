"""A provider's rate-limit headers, parsed: what the limiter adapts to and how long a 429 waits.

- `Retry-After`: seconds ("2", "0.5") or an HTTP-date; `retry-after-ms`:
  milliseconds (OpenAI and Azure send it, and it wins: it is the precise one).
- `x-ratelimit-limit-{requests,tokens}`, `x-ratelimit-remaining-{requests,tokens}`,
  `x-ratelimit-reset-{requests,tokens}` (OpenAI's durations: "1s", "6m0s",
  "20ms", "1h2m3.5s"; a bare number is seconds).

Unparseable values are None: a provider's odd header never stops a run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class RateLimitHeaders:
    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


def _get(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; HTTP header names are not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() if isinstance(value, str) else None


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value else None
    except ValueError:
        return None


def duration_s(value: str | None) -> float | None:
    """Seconds of an OpenAI reset duration ("6m0s", "20ms", "1.5s") or a bare number of seconds."""
    if not value:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long the provider asks to wait: `retry-after-ms`, else `Retry-After` in seconds or as an HTTP-date."""
    ms = _get(headers, "retry-after-ms")
    if ms and re.fullmatch(r"\d+(\.\d+)?", ms):
        return float(ms) / 1000
    value = _get(headers, "retry-after")
    if not value:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at is None:
        return None
    return max(0.0, at.timestamp() - (time.time() if now is None else now))


def rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    return RateLimitHeaders(
        limit_requests=_int(_get(headers, "x-ratelimit-limit-requests")),
        limit_tokens=_int(_get(headers, "x-ratelimit-limit-tokens")),
        remaining_requests=_int(_get(headers, "x-ratelimit-remaining-requests")),
        remaining_tokens=_int(_get(headers, "x-ratelimit-remaining-tokens")),
        reset_requests_s=duration_s(_get(headers, "x-ratelimit-reset-requests")),
        reset_tokens_s=duration_s(_get(headers, "x-ratelimit-reset-tokens")),
    )
