"""The oracle teacher as an OpenAI-compatible HTTP server (aiohttp), the offline default teacher.

It speaks the OpenAI and Azure OpenAI chat-completions protocols so that the
real client path (auth, retries, rate limiting, error handling) runs
unchanged against it, and it misbehaves on purpose, per model: rate limits
answered with 429 + Retry-After, lognormal latency and injected faults
(5xx, hangs, dropped connections, malformed or empty bodies, content
filtering). Fault draws are random per request, not per request content, so
a retry can succeed. The answers themselves come from `oracle_solver` and
are deterministic. `/stats` counts what was served, so tests can check that
no request was paid for twice. Binds 127.0.0.1 only; the key is never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from orca_core.recipe.models import OracleSettings
from orca_core.teacher.oracle_solver import OracleBook, count_tokens, prompt_tokens, respond, truncate_tokens
from orca_core.traces import request_id



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


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.ok = 0
        self.ok_by_request_id: Counter[str] = Counter()

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "by_status": dict(self.by_status), "faults": dict(self.faults),
                "ok": self.ok, "ok_by_request_id": dict(self.ok_by_request_id)}


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


def error(status: int, message: str, kind: str, code: str | None,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status,
                             headers=headers)


def completion(model: str, rid: str, content: str, finish: str, prompt: int) -> dict[str, Any]:
    completion_tokens = count_tokens(content)
    return {
        "id": f"chatcmpl-{rid[:24]}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                  "total_tokens": prompt + completion_tokens},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    oracle = request.app[ORACLE]
    oracle.stats.requests += 1
    response = await _answer(oracle, request)
    if response is not None:
        oracle.stats.by_status[str(response.status)] += 1
    return response if response is not None else web.Response()  # dropped: nothing reaches the client


async def _answer(oracle: Oracle, request: web.Request) -> web.StreamResponse | None:
    if not oracle.authorized(request):
        return error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    try:
        body = await request.json()
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of objects")
    except (ValueError, KeyError, TypeError) as err:
        return error(400, f"Invalid request body: {err}", "invalid_request_error", "invalid_request")
    model = request.match_info.get("deployment") or body.get("model")
    state = oracle.models.get(model)
    if state is None:
        return error(404, f"The model '{model}' does not exist.", "invalid_request_error", "model_not_found")
    prompt = prompt_tokens(messages)
    if prompt > state.settings.context_window:
        return error(400, f"This model's maximum context length is {state.settings.context_window} tokens; the "
                          f"messages have {prompt}.", "invalid_request_error", "context_length_exceeded")
    content, finish = respond(oracle.book, model, state.settings, messages), "stop"
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(max_tokens, int) and count_tokens(content) > max_tokens:
        content, finish = truncate_tokens(content, max_tokens), "length"
    wait = state.admit(time.monotonic(), prompt + count_tokens(content))
    if wait:
        return error(429, "Rate limit reached; retry after the indicated time.", "requests", "rate_limit_exceeded",
                     {"Retry-After": str(max(1, math.ceil(wait)))})
    await asyncio.sleep(state.latency_s())
    rid = request_id(model, messages, body.get("temperature"), body.get("top_p"), body.get("max_tokens"))
    fault = state.fault()
    if fault:
        oracle.stats.faults[fault] += 1
    if fault == "timeout":  # hang, then answer whoever is still there
        await asyncio.sleep(state.settings.timeout_sleep_s)
        if request.transport is None or request.transport.is_closing():
            return None
    elif fault:
        return _inject(fault, request, completion(model, rid, content, finish, prompt))
    oracle.stats.ok += 1
    oracle.stats.ok_by_request_id[rid] += 1
    return web.json_response(completion(model, rid, content, finish, prompt))


def _inject(fault: str, request: web.Request, body: dict[str, Any]) -> web.Response | None:
    """The response for an injected fault; None when the connection was dropped."""
    if fault in ("http_500", "http_503"):
        return error(int(fault[-3:]), "The server had an error while processing your request.", "server_error", None)
    if fault == "drop":
        if request.transport is not None:
            request.transport.close()
        return None
    if fault == "malformed":
        text = json.dumps(body)
        return web.Response(text=text[: len(text) // 2], content_type="application/json")
    choice = body["choices"][0]  # empty or content_filter: a 200 without content
    choice["message"]["content"] = ""
    choice["finish_reason"] = "content_filter" if fault == "content_filter" else "stop"
    body["usage"].update(completion_tokens=0, total_tokens=body["usage"]["prompt_tokens"])
    return web.json_response(body)


async def list_models(request: web.Request) -> web.Response:
    oracle = request.app[ORACLE]
    if not oracle.authorized(request):
        return error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "orca-oracle"} for name in oracle.models]
    return web.json_response({"object": "list", "data": data})


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[ORACLE].stats.as_json())


async def reset_stats(request: web.Request) -> web.Response:
    request.app[ORACLE].stats.reset()
    return web.json_response({"reset": True})


def create_app(models: dict[str, OracleSettings], book: OracleBook, api_key: str | None = None) -> web.Application:
    app = web.Application()
    app[ORACLE] = Oracle(models, book, api_key)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    return app


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Listen (port 0: a free one); the runner (to clean up) and the base URL (ends in /v1)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_port = runner.addresses[0][1]
    return runner, f"http://{host}:{bound_port}/v1"


def serve(host: str = "127.0.0.1", port: int = 0, *, models: dict[str, OracleSettings],
          sources: Iterable[str | Path], api_key: str | None = None, ready_file: Path | None = None) -> None:
    """Run the oracle until killed; announce the base URL on stdout and in `ready_file`."""
    app = create_app(models, OracleBook.from_parquet(sources), api_key)

    async def run() -> None:
        runner, url = await start(app, host, port)
        try:
            if ready_file is not None:  # written whole, then renamed: a reader never sees half a URL
                partial = Path(f"{ready_file}.partial")
                partial.write_text(url)
                os.replace(partial, ready_file)
            print(f"ORACLE_READY {url}", flush=True)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())
