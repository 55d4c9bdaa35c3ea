"""The oracle's state: per-model settings and draws, the counters, and the answer to one request body.

`answer` is what an online call and a batch line share: the same body gets
the same completion (or the same 4xx) either way. Rate limits, latency and
faults are the online path's (`server`); batch lines have their own partial
failures and expiry (`batches`).
"""

from __future__ import annotations

import hmac
import math
import random
import time
from collections import Counter, deque
from typing import Any

from aiohttp import web

from orca_core.keys import canonical_json, sha256_text
from orca_core.recipe.models import OracleSettings
from orca_oracle.solver import OracleBook, count_tokens, prompt_tokens, respond, truncate_tokens


class ModelState:
    """One model's settings, its random draws (latency, faults) and its rate-limit window."""

    def __init__(self, settings: OracleSettings):
        self.settings = settings
        self.rng = random.Random(f"oracle-faults:{settings.seed}")
        self.window: deque[tuple[float, int]] = deque()  # (time, tokens) of admitted requests
        self.window_tokens = 0

    def admit(self, now: float, tokens: int) -> float:
        """0 if the request fits the limits (and is recorded), else the seconds until it would."""
        s, waits = self.settings, []
        span = s.rate_window_s  # the limits are per minute, enforced over this sliding window
        requests = max(1, round(s.rpm_limit * span / 60)) if s.rpm_limit else None
        token_cap = max(1, round(s.tpm_limit * span / 60)) if s.tpm_limit else None
        while self.window and self.window[0][0] <= now - span:
            self.window_tokens -= self.window.popleft()[1]
        if requests and len(self.window) >= requests:
            waits.append(self.window[len(self.window) - requests][0] + span - now)
        if token_cap and self.window_tokens + tokens > token_cap:
            excess, wait = self.window_tokens + tokens - token_cap, span
            for at, used in self.window:
                excess -= used
                if excess <= 0:
                    wait = at + span - now
                    break
            waits.append(wait)
        if waits:
            return max(waits)
        self.window.append((now, tokens))
        self.window_tokens += tokens
        return 0.0

    def latency_s(self) -> float:
        s = self.settings
        return self.rng.lognormvariate(math.log(s.latency_ms), s.latency_sigma) / 1000 if s.latency_ms > 0 else 0.0

    def fault(self) -> str | None:
        draw = self.rng.random()
        for kind, rate in self.settings.faults.items():
            if draw < rate:
                return kind
            draw -= rate
        return None

    def batch_line_fails(self) -> bool:
        """A batch line's injected server error (random per line, so a resubmission can succeed)."""
        return self.rng.random() < self.settings.batch_error_rate


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.ok = 0
        self.ok_by_request_id: Counter[str] = Counter()
        self.batch_ok_by_request_id: Counter[str] = Counter()  # completed batch lines, by custom_id
        self.batches: list[dict[str, Any]] = []  # per batch: id, lines, completed, failed, expired, cancelled

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "by_status": dict(self.by_status), "faults": dict(self.faults),
                "ok": self.ok, "ok_by_request_id": dict(self.ok_by_request_id),
                "batch_ok": sum(self.batch_ok_by_request_id.values()),
                "batch_ok_by_request_id": dict(self.batch_ok_by_request_id), "batches": self.batches}


class Oracle:
    def __init__(self, models: dict[str, OracleSettings], book: OracleBook, api_key: str | None):
        self.models = {name: ModelState(settings) for name, settings in models.items()}
        self.book, self.stats, self._key = book, Stats(), api_key

    def authorized(self, request: web.Request) -> bool:
        if not self._key:
            return True
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        given = request.headers.get("api-key") or bearer
        return hmac.compare_digest(given.encode(), self._key.encode())


ORACLE = web.AppKey("oracle", Oracle)


def error_body(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def error(status: int, message: str, kind: str, code: str | None,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, kind, code), status=status, headers=headers)


def unauthorized() -> web.Response:
    return error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def request_key(model: str | None, body: dict[str, Any]) -> str:
    """What `/stats` counts an online call under when the client names no id (X-Client-Request-Id)."""
    return sha256_text(canonical_json({"model": model, "messages": body.get("messages"),
                                       "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                                       "max_tokens": body.get("max_tokens")}))


def completion(model: str, content: str, finish: str, prompt: int) -> dict[str, Any]:
    completion_tokens = count_tokens(content)
    return {
        "id": f"chatcmpl-{random.getrandbits(96):024x}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                  "total_tokens": prompt + completion_tokens},
    }


def answer(oracle: Oracle, model: str | None, body: Any) -> tuple[int, dict[str, Any]]:
    """(200, a chat.completion) or (4xx, an error body) for one chat request body."""
    try:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of objects")
    except (KeyError, TypeError) as err:
        return 400, error_body(f"Invalid request body: {err}", "invalid_request_error", "invalid_request")
    state = oracle.models.get(model) if isinstance(model, str) else None
    if state is None:
        return 404, error_body(f"The model '{model}' does not exist.", "invalid_request_error", "model_not_found")
    prompt = prompt_tokens(messages)
    if prompt > state.settings.context_window:
        return 400, error_body(f"This model's maximum context length is {state.settings.context_window} tokens; the "
                               f"messages have {prompt}.", "invalid_request_error", "context_length_exceeded")
    content, finish = respond(oracle.book, model, state.settings, messages), "stop"
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(max_tokens, int) and count_tokens(content) > max_tokens:
        content, finish = truncate_tokens(content, max_tokens), "length"
    return 200, completion(model, content, finish, prompt)
