"""Batch API mode (`mode: batch`): a fan-out's requests as JSONL files through `/v1/files` and `/v1/batches`.

How a platform team sends millions of requests at the provider's batch
discount without rate-limit engineering. Per round:

1. `fan_out` resolves the jobs against the request cache as online, and
   hands the pending calls to `BatchExecutor`, which writes one line per
   request (`custom_id` = the request id; identical requests once) into
   JSONL files of at most `batch.max_requests` lines and `batch.max_bytes`,
   uploads each (purpose `batch`), creates a batch on it (24 h window) and
   records it in the store (`BatchRecords`) before it polls;
2. it polls every batch with backoff, downloads its output and error files
   and writes each line as a request-cache row (the same rows as online
   calls, at the discounted price); a killed run's next start finds the
   recorded batches and collects them instead of paying again;
3. lines that failed transiently (5xx, 429, expired, cancelled, missing) get
   no row: the next round's resolve finds them pending and resubmits them
   alone, up to the endpoint's `max_attempts`, after which they are failure
   rows like an online call's last retry. The next call of a multi-call
   strategy goes in the next round too, so rounds run until nothing is sent.

The client is the official `openai` SDK (sync): multipart upload, the Azure
paths (`AzureOpenAI`), typed objects, streamed downloads and its retries of
the few control calls come for free, and none of it is on a hot path.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai

from orca_core.recipe.models import TeacherEndpoint
from orca_core.teacher.batch_records import BatchRecords
from orca_core.teacher.client import (FatalTeacherError, bad_request_reason, call_cost, error_of,
                                      estimate_prompt_tokens)
from orca_core.teacher.fanout import FanoutPlan, FanoutReport, fan_out
from orca_core.teacher.identity import describe
from orca_core.teacher.jobs import Progress, call_id
from orca_core.traces import RequestCache, ShardWriter, now_iso

log = logging.getLogger(__name__)

TRANSIENT_CODES = {"batch_expired": "expired", "batch_cancelled": "cancelled"}


def chat_body(endpoint: TeacherEndpoint, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The chat-completions body of a request (what an online call posts)."""
    return {"model": endpoint.model, "messages": messages, "temperature": endpoint.temperature,
            "top_p": endpoint.top_p, "max_tokens": endpoint.max_tokens}


def sdk_client(role: str, endpoint: TeacherEndpoint, base_url: str | None) -> openai.OpenAI:
    key = "unused"
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env) or ""
        if not key:
            raise FatalTeacherError(f"{describe(endpoint, role)}: environment variable {endpoint.api_key_env} is not set")
    if endpoint.kind == "azure":
        return openai.AzureOpenAI(azure_endpoint=base_url, api_version=endpoint.api_version, api_key=key,
                                  timeout=endpoint.timeout_s, max_retries=endpoint.max_attempts)
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=endpoint.timeout_s, max_retries=endpoint.max_attempts)


class BatchClient:
    """One endpoint's Batch API: submit a JSONL file, poll a batch, stream its result lines."""

    def __init__(self, role: str, endpoint: TeacherEndpoint, base_url: str | None):
        self.role, self.endpoint = role, endpoint
        self.sdk = sdk_client(role, endpoint, base_url)
        self.url = "/chat/completions" if endpoint.kind == "azure" else "/v1/chat/completions"

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An SDK call (it retries 429, 5xx and connection errors itself); a refused key or endpoint is fatal."""
        try:
            return method(*args, **kwargs)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            raise FatalTeacherError(f"{describe(self.endpoint, self.role)}, Batch API: HTTP {err.status_code} "
                                    f"({err.message})") from None

    def upload(self, path: Path) -> str:
        return self._call(self.sdk.files.create, file=path, purpose="batch").id

    def create(self, input_file_id: str, submission: str) -> Any:
        return self._call(self.sdk.batches.create, input_file_id=input_file_id, endpoint=self.url,
                          completion_window="24h", metadata={"orca_submission": submission})

    def find(self, submission: str, since: int) -> Any | None:
        """The batch created for `submission` (a run killed before it recorded the batch id), if any."""
        for batch in self._call(self.sdk.batches.list, limit=100):  # newest first; the SDK pages on
            if (batch.metadata or {}).get("orca_submission") == submission:
                return batch
            if batch.created_at < since - 60:
                return None
        return None

    def retrieve(self, batch_id: str) -> Any:
        return self._call(self.sdk.batches.retrieve, batch_id)

    def lines(self, file_id: str | None) -> Iterator[dict[str, Any]]:
        if not file_id:
            return
        with self._call(self.sdk.files.with_streaming_response.content, file_id) as response:
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)


class Spool:
    """One role's JSONL input file being filled, within the provider's limits per file."""

    def __init__(self, folder: Path, endpoint: TeacherEndpoint):
        self.path = folder / f"{uuid.uuid4().hex}.jsonl"
        self.handle = self.path.open("w")
        self.endpoint, self.lines, self.bytes = endpoint, 0, 0

    def fits(self, size: int) -> bool:
        limits = self.endpoint.batch
        return self.lines < limits.max_requests and self.bytes + size <= limits.max_bytes

    def add(self, line: str) -> None:
        self.handle.write(line)
        self.lines, self.bytes = self.lines + 1, self.bytes + len(line.encode())

    def close(self) -> Path:
        self.handle.close()
        return self.path


def custom_ids(path: Path) -> list[str]:
    with path.open() as lines:
        return [json.loads(line)["custom_id"] for line in lines if line.strip()]


class BatchExecutor:
    """`fan_out`'s executor for batch-mode roles: pending calls -> batches; returns when all are collected."""

    def __init__(self, clients: dict[str, BatchClient], records: BatchRecords, writer: ShardWriter, spool: Path,
                 max_cost_usd: float | None = None):
        self.clients, self.records, self.writer = clients, records, writer
        self.spool, self.max_cost_usd = spool, max_cost_usd  # spool: a local folder for the files being filled
        self.counters: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.transient: Counter[str] = Counter()  # request id -> transient failures so far (this run)
        self.budget_exhausted = False
        self.another_round = False
        self.spent = 0.0

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "failures": dict(self.failures), "budget_exhausted": self.budget_exhausted}

    # -- one round ------------------------------------------------------------------------------
    def run(self, batches: Iterator[list[Progress]], on_progress: Callable[[dict[str, Any]], None],
            recheck: Any = None) -> dict[str, Any]:
        """Every pending call into files, the files into batches; back when all are collected.

        `fan_out` already sends identical requests once within its recent window; here every id of the round
        is kept (64-bit prefixes): in batch mode no answer reaches the cache before the round ends, and a
        repeated custom_id would fail a whole file's validation. `recheck` (lost online workers) has no use here.
        """
        submitted: list[dict[str, Any]] = []
        spools: dict[str, Spool] = {}
        seen: set[int] = set()
        self.another_round = False  # set when a line is not its job's last call, or a line must be resubmitted
        reserved = 0.0
        for batch in batches:
            for p in batch:
                if self.budget_exhausted:
                    break
                role = p.job.teacher_role
                endpoint = self.clients[role].endpoint
                rid = call_id(p.job, endpoint, p.previous)
                if int(rid[:16], 16) in seen:
                    continue  # an identical request is already in this round's files: sent once
                seen.add(int(rid[:16], 16))
                messages = p.job.messages(p.previous)
                prompt = estimate_prompt_tokens(messages)
                if prompt + endpoint.max_tokens > endpoint.context_window:
                    self._row(rid, endpoint, status="failed:context_length", attempts=0)  # never sent: it cannot fit
                    continue
                estimate = call_cost(endpoint, prompt, endpoint.max_tokens)
                if self.max_cost_usd is not None and self.spent + reserved + estimate > self.max_cost_usd:
                    self.budget_exhausted = True
                    break
                reserved += estimate
                self.another_round |= len(p.previous) + 1 < p.job.calls
                line = json.dumps({"custom_id": rid, "method": "POST", "url": self.clients[role].url,
                                   "body": chat_body(endpoint, messages)}) + "\n"
                spool = spools.get(role)
                if spool is not None and not spool.fits(len(line.encode())):
                    submitted.append(self._submit(role, spools.pop(role)))
                    spool = None
                if spool is None:
                    spool = spools[role] = Spool(self.spool, endpoint)
                spool.add(line)
            if self.budget_exhausted:
                break
        for role, spool in spools.items():
            submitted.append(self._submit(role, spool))
        self.wait(submitted, on_progress)
        return self.stats()

    def _submit(self, role: str, spool: Spool) -> dict[str, Any]:
        """Upload, record, create, record the batch id: a kill at any point is resumable, never paid twice."""
        client, path = self.clients[role], spool.close()
        record = {"submission": uuid.uuid4().hex, "role": role, "model": client.endpoint.model,
                  "requests": spool.lines, "created_at": int(time.time()), "batch_id": None, "state": "submitting"}
        record["input_file_id"] = client.upload(path)
        self.records.write(record)
        record["batch_id"] = client.create(record["input_file_id"], record["submission"]).id
        record["state"] = "submitted"
        self.records.write(record)
        record["spool"] = str(path)  # in memory only: the ids it covers, without a download
        self.counters["batches"] += 1
        self.counters["batch_lines"] += spool.lines
        self.counters["resubmitted_lines"] += sum(1 for rid in custom_ids(path) if rid in self.transient)
        log.info("batch %s: %d requests to %s", record["batch_id"], spool.lines, client.endpoint.model)
        return record

    # -- polling and collecting ----------------------------------------------------------------
    def resume(self, on_progress: Callable[[dict[str, Any]], None]) -> None:
        """Collect the batches a killed run submitted (found in the store), before anything new is sent."""
        pending = []
        for record in self.records.open():
            client = self.clients.get(record["role"])
            if client is None or client.endpoint.model != record["model"]:
                continue  # another step's or another endpoint's batch: that run collects it
            if record["batch_id"] is None:
                found = client.find(record["submission"], record["created_at"])
                if found is None:
                    self.records.write({**record, "state": "never created"})
                    continue
                record = {**record, "batch_id": found.id, "state": "submitted"}
                self.records.write(record)
            pending.append(record)
        if pending:
            log.info("resuming %d batch(es) a previous run submitted", len(pending))
            self.wait(pending, on_progress)

    def wait(self, records: list[dict[str, Any]], on_progress: Callable[[dict[str, Any]], None]) -> None:
        if not records:
            return
        delay = min(self.clients[r["role"]].endpoint.batch.poll_s for r in records)
        longest = max(self.clients[r["role"]].endpoint.batch.poll_max_s for r in records)
        open_ = list(records)
        while open_:
            still = []
            for record in open_:
                batch = self.clients[record["role"]].retrieve(record["batch_id"])
                if batch.status in ("completed", "expired", "cancelled", "failed"):
                    self._collect(record, batch)
                else:
                    still.append(record)
            on_progress(self.stats())
            open_ = still
            if open_:
                time.sleep(delay)
                delay = min(longest, delay * 2)

    def _collect(self, record: dict[str, Any], batch: Any) -> None:
        client = self.clients[record["role"]]
        if batch.status == "failed":  # the input file did not validate: a bug here, not the provider's
            errors = [f"line {e.line}: {e.code}: {e.message}" for e in (batch.errors.data if batch.errors else [])[:5]]
            raise RuntimeError(f"batch {batch.id} for teacher {client.endpoint.model} failed validation: "
                               f"{'; '.join(errors) or 'no reason given'}")
        ended = batch.completed_at or batch.expired_at or batch.cancelled_at or int(time.time())
        latency_ms = max(0, ended - batch.created_at) * 1000.0
        answered: set[str] = set()
        for line in itertools.chain(client.lines(batch.output_file_id), client.lines(batch.error_file_id)):
            answered.add(line["custom_id"])
            self._line(client, line, latency_ms)
        spool = record.get("spool")
        expected = custom_ids(Path(spool)) if spool else [line["custom_id"] for line in client.lines(batch.input_file_id)]
        for rid in expected:
            if rid not in answered:
                self._transient(rid, client.endpoint, "missing")
        self.writer.flush()  # durable before the record says collected
        self.records.write({k: v for k, v in record.items() if k != "spool"} | {"state": "collected",
                                                                                 "status": batch.status})
        if spool:
            Path(spool).unlink(missing_ok=True)

    def _line(self, client: BatchClient, line: dict[str, Any], latency_ms: float) -> None:
        rid, endpoint, response = line["custom_id"], client.endpoint, line.get("response")
        if response is None:
            code = (line.get("error") or {}).get("code") or "unknown"
            self._transient(rid, endpoint, TRANSIENT_CODES.get(code, code))
            return
        status, body = response.get("status_code", 0), response.get("body") or {}
        if status in (401, 403, 404):
            raise FatalTeacherError(f"{describe(endpoint, client.role)}, Batch API: HTTP {status} in a batch line "
                                    f"({(body.get('error') or {}).get('code') or 'refused'})")
        if status == 429 or status >= 500:
            self._transient(rid, endpoint, "rate_limited" if status == 429 else f"http_{status}")
            return
        if status != 200:  # a systematic 400 too: a whole file of them is paid nothing, so a row, not a stop
            reason = bad_request_reason(error_of(body)) or f"http_{status}"
            self._row(rid, endpoint, status=f"failed:{reason}", latency_ms=latency_ms)
            return
        try:
            choice, usage = body["choices"][0], body.get("usage") or {}
            content, finish = choice["message"].get("content") or "", choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError, AttributeError):
            self._transient(rid, endpoint, "malformed")
            return
        p, c = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        status_text = "failed:content_filter" if finish == "content_filter" else (
            "ok" if content.strip() else "failed:empty")
        self._row(rid, endpoint, status=status_text, content=content if status_text == "ok" else "", finish=finish,
                  prompt=p, completion=c, latency_ms=latency_ms)

    def _transient(self, rid: str, endpoint: TeacherEndpoint, reason: str) -> None:
        """No row yet (the next round resubmits it), unless the endpoint's attempts are spent."""
        self.transient[rid] += 1
        self.counters[f"lines_{reason}"] += 1
        if self.transient[rid] >= endpoint.max_attempts:
            self._row(rid, endpoint, status=f"failed:{reason}")
        else:
            self.another_round = True

    def _row(self, rid: str, endpoint: TeacherEndpoint, *, status: str, content: str = "", finish: str = "",
             prompt: int = 0, completion: int = 0, latency_ms: float = 0.0, attempts: int | None = None) -> None:
        cost = call_cost(endpoint, prompt, completion)
        self.writer.add({"request_id": rid, "teacher_model": endpoint.model, "response": content,
                         "finish_reason": finish, "prompt_tokens": prompt, "completion_tokens": completion,
                         "cost_usd": cost, "latency_ms": latency_ms,
                         "attempts": self.transient[rid] + 1 if attempts is None else attempts,
                         "status": status, "created_at": now_iso()})
        self.spent += cost
        self.counters["requests"] += 1
        self.counters["jobs_done" if status == "ok" else "jobs_failed"] += 1
        self.counters["prompt_tokens"] += prompt
        self.counters["completion_tokens"] += completion
        self.counters["cost_micro_usd"] += round(cost * 1e6)
        if status != "ok":
            self.failures[status.removeprefix("failed:")] += 1


def run_batch_fanout(plan: FanoutPlan, cache: RequestCache, base_urls: dict[str, str | None],
                     sink: Callable[[int, int, str], None], retry_failed: bool = False,
                     max_cost_usd: float | None = None) -> FanoutReport:
    """Resume recorded batches, then rounds of `fan_out` through the Batch API until nothing is left to send."""
    started = time.monotonic()
    clients = {role: BatchClient(role, e, base_urls.get(role)) for role, e in plan.endpoints.items()}
    writer = cache.writer(f"batch-{os.getpid()}", flush_rows=10_000, flush_seconds=60.0)
    records = BatchRecords(f"{cache.folder}/batches")
    with tempfile.TemporaryDirectory(prefix="orca-batch-") as spool:
        executor = BatchExecutor(clients, records, writer, Path(spool), max_cost_usd)
        executor.resume(lambda stats: None)
        first: FanoutReport | None = None
        while True:
            report = fan_out(plan, cache, executor, sink, retry_failed and first is None)
            first = first or report
            if report.sent_jobs == 0 or executor.budget_exhausted or not executor.another_round:
                break  # (a round with nothing left to send would only resolve every job again)
        writer.flush()
    first.worker = executor.stats()
    first.seconds = time.monotonic() - started
    return first
