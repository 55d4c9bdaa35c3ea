"""The oracle's Batch API: `/v1/files` and `/v1/batches` in OpenAI's protocol (and Azure's `/openai/...` paths).

A client uploads a JSONL file (purpose `batch`) whose lines are
`{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`,
creates a batch on it, polls it, and downloads the output file (answered
lines) and the error file (failed, expired or cancelled lines), each line
carrying its `custom_id`. A batch goes validating -> in_progress ->
finalizing -> completed (or expired / cancelled), or failed when its input
file does not validate (then `errors` lists the bad lines).

Each line is answered by the same `state.answer` as an online call. On
purpose, per model: `batch_error_rate` sends that fraction of the lines to
the error file as server errors (random per line, so a resubmission can
succeed); `batch_expire_after` lines is all a batch finishes within its
completion window, the rest expire; `batch_duration_s` keeps a batch in
progress at least that long (time to kill a client while it polls). Files
live in a temporary folder, streamed line by line: a 50,000-line batch never
sits in memory. Completed lines are counted per `custom_id` in `/stats`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from orca_oracle.state import ORACLE, Oracle, answer, error, error_body, unauthorized

MAX_FILE_BYTES = 200_000_000  # OpenAI's limits per batch input file
MAX_REQUESTS = 50_000
CHAT_URLS = ("/v1/chat/completions", "/chat/completions")  # OpenAI's line url, Azure's
TERMINAL = ("completed", "failed", "expired", "cancelled")
YIELD_EVERY = 64  # lines answered between yields to the event loop (polls stay answered)


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class BatchStore:
    """Uploaded and produced files (on disk) and batch objects, of one server."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, dict[str, Any]] = {}  # id -> the file object
        self.batches: dict[str, dict[str, Any]] = {}  # id -> the batch object (insertion order: oldest first)
        self.tasks: set[asyncio.Task] = set()

    def path(self, file_id: str) -> Path:
        return self.folder / file_id

    def add_file(self, file_id: str, filename: str, purpose: str) -> dict[str, Any]:
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": self.path(file_id).stat().st_size,
                               "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                               "status": "processed", "expires_at": None, "status_details": None}
        return self.files[file_id]


BATCHES = web.AppKey("batches", BatchStore)


async def _store(app: web.Application) -> AsyncIterator[None]:
    folder = Path(tempfile.mkdtemp(prefix="orca-oracle-files-"))
    app[BATCHES] = BatchStore(folder)
    yield
    for task in app[BATCHES].tasks:
        task.cancel()
    shutil.rmtree(folder, ignore_errors=True)


def _not_found(what: str, name: str) -> web.Response:
    return error(404, f"No such {what}: '{name}'", "invalid_request_error", None)


# -- files -----------------------------------------------------------------------------------------
async def upload_file(request: web.Request) -> web.Response:
    if not request.app[ORACLE].authorized(request):
        return unauthorized()
    store = request.app[BATCHES]
    file_id, purpose, filename = _id("file-"), None, "upload.jsonl"
    reader = await request.multipart()
    async for part in reader:
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            filename, size = part.filename or filename, 0
            with store.path(file_id).open("wb") as out:  # streamed to disk, checked against the size limit
                while chunk := await part.read_chunk(1 << 20):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        out.close()
                        store.path(file_id).unlink()
                        return error(400, f"File is larger than {MAX_FILE_BYTES} bytes.", "invalid_request_error",
                                     "file_too_large")
                    out.write(chunk)
    if not store.path(file_id).exists():
        return error(400, "Missing file.", "invalid_request_error", "missing_required_parameter")
    if purpose != "batch":
        store.path(file_id).unlink()
        return error(400, f"Unsupported purpose: {purpose!r} (this server takes 'batch').", "invalid_request_error",
                     "invalid_value")
    return web.json_response(store.add_file(file_id, filename, purpose))


def _found_or_404(request: web.Request, kind: str) -> dict[str, Any] | web.Response:
    """The `kind` ("file" or "batch") the path names, or the error response (401, 404) to send instead."""
    if not request.app[ORACLE].authorized(request):
        return unauthorized()
    item_id = request.match_info[f"{kind}_id"]
    table = request.app[BATCHES].files if kind == "file" else request.app[BATCHES].batches
    found = table.get(item_id)
    return found if found is not None else _not_found(kind, item_id)


async def get_file(request: web.Request) -> web.StreamResponse:
    found = _found_or_404(request, "file")
    return found if isinstance(found, web.Response) else web.json_response(found)


async def file_content(request: web.Request) -> web.StreamResponse:
    found = _found_or_404(request, "file")
    if isinstance(found, web.Response):
        return found
    return web.FileResponse(request.app[BATCHES].path(found["id"]), headers={"Content-Type": "application/jsonl"})


async def delete_file(request: web.Request) -> web.StreamResponse:
    found = _found_or_404(request, "file")
    if isinstance(found, web.Response):
        return found
    store = request.app[BATCHES]
    del store.files[found["id"]]
    store.path(found["id"]).unlink(missing_ok=True)
    return web.json_response({"id": found["id"], "object": "file", "deleted": True})


# -- batches ---------------------------------------------------------------------------------------
async def create_batch(request: web.Request) -> web.Response:
    if not request.app[ORACLE].authorized(request):
        return unauthorized()
    store = request.app[BATCHES]
    try:
        body = await request.json()
        input_file_id, endpoint = body["input_file_id"], body["endpoint"]
        window, metadata = body["completion_window"], body.get("metadata")
    except (ValueError, KeyError, TypeError) as err:
        return error(400, f"Invalid request body: {err}", "invalid_request_error", "invalid_request")
    if input_file_id not in store.files:
        return _not_found("file", input_file_id)
    if endpoint not in CHAT_URLS:
        return error(400, f"Unsupported endpoint {endpoint!r} (this server batches chat completions).",
                     "invalid_request_error", "invalid_value")
    if window != "24h":
        return error(400, "completion_window must be '24h'.", "invalid_request_error", "invalid_value")
    now = int(time.time())
    batch = {"id": _id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
             "input_file_id": input_file_id, "completion_window": window, "status": "validating",
             "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
             "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
             "expired_at": None, "cancelling_at": None, "cancelled_at": None, "model": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata, "usage": None}
    store.batches[batch["id"]] = batch
    task = asyncio.create_task(_process(request.app[ORACLE], store, batch))
    store.tasks.add(task)
    task.add_done_callback(store.tasks.discard)
    return web.json_response(batch)


async def get_batch(request: web.Request) -> web.Response:
    found = _found_or_404(request, "batch")
    return found if isinstance(found, web.Response) else web.json_response(found)


async def cancel_batch(request: web.Request) -> web.Response:
    found = _found_or_404(request, "batch")
    if isinstance(found, web.Response):
        return found
    if found["status"] in ("validating", "in_progress", "finalizing"):
        found.update(status="cancelling", cancelling_at=int(time.time()))
    return web.json_response(found)


async def list_batches(request: web.Request) -> web.Response:
    """Newest first, `limit` (default 20) at a time, after the batch id `after`."""
    if not request.app[ORACLE].authorized(request):
        return unauthorized()
    newest_first = list(reversed(request.app[BATCHES].batches.values()))
    after = request.query.get("after")
    if after:
        ids = [b["id"] for b in newest_first]
        newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
    limit = max(1, min(100, int(request.query.get("limit", "20"))))
    page = newest_first[:limit]
    return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(newest_first) > limit})


def _validate(path: Path, endpoint: str) -> tuple[list[dict[str, Any]], int, str | None]:
    """(errors, lines, the model of the first line): OpenAI fails a whole batch whose input does not validate."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    count, model = 0, None

    def bad(code: str, message: str, line: int, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": line})

    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            count += 1
            try:
                line = json.loads(raw)
                custom_id, body = line["custom_id"], line["body"]
            except (ValueError, KeyError, TypeError):
                bad("invalid_json_line", "This line is not a JSON object with custom_id and body.", number)
                continue
            if not isinstance(custom_id, str) or not custom_id:
                bad("missing_required_parameter", "custom_id must be a non-empty string.", number, "custom_id")
            elif custom_id in seen:
                bad("duplicate_custom_id", "The custom_id for this request is a duplicate of another request. "
                    "The custom_id parameter must be unique for each request in a batch.", number, "custom_id")
            seen.add(custom_id)
            if line.get("method") != "POST" or line.get("url") != endpoint:
                bad("invalid_url", f"method must be POST and url {endpoint!r}, as the batch's endpoint.", number, "url")
            if model is None and isinstance(body, dict):
                model = body.get("model")
    if count > MAX_REQUESTS:
        bad("too_many_requests", f"The input file has {count} requests; a batch takes at most {MAX_REQUESTS}.", count)
    if count == 0:
        bad("empty_file", "The input file has no requests.", 0)
    return errors[:100], count, model


def _now() -> int:
    return int(time.time())


async def _process(oracle: Oracle, store: BatchStore, batch: dict[str, Any]) -> None:
    errors, total, model = _validate(store.path(batch["input_file_id"]), batch["endpoint"])
    if errors:
        batch.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors})
        return
    state = oracle.models.get(model) if isinstance(model, str) else None
    settings = state.settings if state else None
    expire_after = settings.batch_expire_after if settings else None
    counts = batch["request_counts"]
    batch.update(status="in_progress", in_progress_at=_now(), model=model)
    counts["total"] = total
    started = time.monotonic()
    output_id, error_id = _id("file-"), _id("file-")
    answered: list[str] = []
    kinds = {"failed": 0, "expired": 0, "cancelled": 0}
    usage = {"input_tokens": 0, "output_tokens": 0}
    with store.path(batch["input_file_id"]).open("rb") as lines, store.path(output_id).open("w") as output, \
            store.path(error_id).open("w") as failed:
        for index, raw in enumerate(line for line in lines if line.strip()):
            line = json.loads(raw)
            result = {"id": _id("batch_req_"), "custom_id": line["custom_id"], "response": None, "error": None}
            if batch["status"] == "cancelling":
                kinds["cancelled"] += 1
                result["error"] = {"code": "batch_cancelled", "message": "This request was cancelled."}
            elif expire_after is not None and index >= expire_after:
                kinds["expired"] += 1
                result["error"] = {"code": "batch_expired",
                                   "message": "This request could not be executed before the completion window expired."}
            else:
                body = line["body"]
                status, reply = answer(oracle, body.get("model") if isinstance(body, dict) else None, body)
                if status == 200 and oracle.models[body["model"]].batch_line_fails():
                    status, reply = 500, error_body("The server had an error while processing your request.",
                                                    "server_error", None)
                result["response"] = {"status_code": status, "request_id": uuid.uuid4().hex, "body": reply}
                if status == 200:
                    output.write(json.dumps(result) + "\n")
                    answered.append(line["custom_id"])
                    counts["completed"] += 1
                    usage["input_tokens"] += reply["usage"]["prompt_tokens"]
                    usage["output_tokens"] += reply["usage"]["completion_tokens"]
                else:
                    kinds["failed"] += 1
            if result["response"] is None or result["response"]["status_code"] != 200:
                failed.write(json.dumps(result) + "\n")
                counts["failed"] += 1
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
    while settings and time.monotonic() - started < settings.batch_duration_s and batch["status"] != "cancelling":
        await asyncio.sleep(0.05)
    cancelling = batch["status"] == "cancelling"
    batch.update(finalizing_at=_now(), status="cancelling" if cancelling else "finalizing")
    for file_id, kind in ((output_id, "output"), (error_id, "error")):
        if store.path(file_id).stat().st_size:
            store.add_file(file_id, f"{batch['id']}_{kind}.jsonl", "batch_output")
            batch[f"{kind}_file_id"] = file_id
        else:
            store.path(file_id).unlink()
    oracle.stats.batch_ok_by_request_id.update(answered)  # paid: the lines that completed
    final = "cancelled" if cancelling else "expired" if kinds["expired"] else "completed"
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    batch.update(status=final, **{f"{final}_at": _now()},
                 usage={**usage, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0}})
    oracle.stats.batches.append({"id": batch["id"], "model": model, "lines": total,
                                 "input_bytes": store.files[batch["input_file_id"]]["bytes"],
                                 "completed": counts["completed"], **kinds, "status": final})


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_store)
    for prefix in ("/v1", "/openai"):  # OpenAI's paths and Azure OpenAI's
        app.router.add_post(f"{prefix}/files", upload_file)
        app.router.add_get(f"{prefix}/files/{{file_id}}", get_file)
        app.router.add_get(f"{prefix}/files/{{file_id}}/content", file_content)
        app.router.add_delete(f"{prefix}/files/{{file_id}}", delete_file)
        app.router.add_post(f"{prefix}/batches", create_batch)
        app.router.add_get(f"{prefix}/batches", list_batches)
        app.router.add_get(f"{prefix}/batches/{{batch_id}}", get_batch)
        app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", cancel_batch)
