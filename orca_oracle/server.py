"""The oracle teacher as an OpenAI-compatible HTTP server (aiohttp), the offline default teacher.

It speaks the OpenAI and Azure OpenAI chat-completions protocols so that the
real client path (auth, retries, rate limiting, error handling) runs
unchanged against it, and it misbehaves on purpose, per model: rate limits
answered with 429 + Retry-After, lognormal latency and injected faults
(5xx, hangs, dropped connections, malformed or empty bodies, content
filtering). Fault draws are random per request, not per request content, so
a retry can succeed. The answers themselves come from `solver` and are
deterministic. The Batch API lives in `batches`. `/stats` counts what was
served, so tests can check that no request was paid for twice: an online
call under the client's `X-Client-Request-Id` header when it sends one, a
batch line under its `custom_id`. Binds 127.0.0.1 only; the key is never
logged.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from orca_core.recipe.models import OracleSettings
from orca_oracle import batches
from orca_oracle.solver import OracleBook
from orca_oracle.state import ORACLE, Oracle, answer, error, request_key, unauthorized


async def chat_completions(request: web.Request) -> web.StreamResponse:
    oracle = request.app[ORACLE]
    oracle.stats.requests += 1
    response = await _answer(oracle, request)
    if response is not None:
        oracle.stats.by_status[str(response.status)] += 1
    return response if response is not None else web.Response()  # dropped: nothing reaches the client


async def _answer(oracle: Oracle, request: web.Request) -> web.StreamResponse | None:
    if not oracle.authorized(request):
        return unauthorized()
    try:
        body = await request.json()
    except ValueError as err:
        return error(400, f"Invalid request body: {err}", "invalid_request_error", "invalid_request")
    model = request.match_info.get("deployment") or (body.get("model") if isinstance(body, dict) else None)
    status, reply = answer(oracle, model, body)
    if status != 200:
        return web.json_response(reply, status=status)
    state = oracle.models[model]
    wait = state.admit(time.monotonic(), reply["usage"]["total_tokens"])
    if wait:
        return error(429, "Rate limit reached; retry after the indicated time.", "requests", "rate_limit_exceeded",
                     {"Retry-After": str(max(1, math.ceil(wait)))})
    await asyncio.sleep(state.latency_s())
    fault = state.fault()
    if fault:
        oracle.stats.faults[fault] += 1
    if fault == "timeout":  # hang, then answer whoever is still there
        await asyncio.sleep(state.settings.timeout_sleep_s)
        if request.transport is None or request.transport.is_closing():
            return None
    elif fault:
        return _inject(fault, request, reply)
    oracle.stats.ok += 1
    oracle.stats.ok_by_request_id[request.headers.get("X-Client-Request-Id") or request_key(model, body)] += 1
    return web.json_response(reply)


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
        return unauthorized()
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "orca-oracle"} for name in oracle.models]
    return web.json_response({"object": "list", "data": data})


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[ORACLE].stats.as_json())


async def reset_stats(request: web.Request) -> web.Response:
    request.app[ORACLE].stats.reset()
    return web.json_response({"reset": True})


def create_app(models: dict[str, OracleSettings], book: OracleBook, api_key: str | None = None) -> web.Application:
    app = web.Application(client_max_size=batches.MAX_FILE_BYTES + (1 << 20))
    app[ORACLE] = Oracle(models, book, api_key)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    batches.add_routes(app)
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
    """Run the oracle until SIGTERM (or killed); announce the base URL on stdout and in `ready_file`."""
    app = create_app(models, OracleBook.from_parquet(sources), api_key)

    async def run() -> None:
        # SIGTERM (how the fan-out stops it) ends the wait, so the cleanup runs and the batch files go;
        # set before the URL is announced, so a caller that stops it at once still gets the cleanup.
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runner, url = await start(app, host, port)
        try:
            if ready_file is not None:  # written whole, then renamed: a reader never sees half a URL
                partial = Path(f"{ready_file}.partial")
                partial.write_text(url)
                os.replace(partial, ready_file)
            print(f"ORACLE_READY {url}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())
