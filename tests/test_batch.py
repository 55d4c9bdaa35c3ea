"""Batch API mode against the oracle's real `/v1/files` and `/v1/batches` on 127.0.0.1.

The protocol test drives the oracle with the official `openai` SDK. The
fan-out tests point recipes at an oracle subprocess as an external
`kind: openai` endpoint in `mode: batch`, so the production path runs:
JSONL files, upload, create, poll, download, rows in the request cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import openai
import pyarrow.parquet as pq
import pytest

from orca_core import steps
from orca_core.context import StepContext
from orca_core.prompts import STRATEGIES, chat
from orca_core.recipe import load_recipe
from orca_core.recipe.models import OracleSettings, TeacherEndpoint
from orca_core.sources.procedural import generate_suite
from orca_core.store import ArtifactStore
from orca_core.teacher.batch import BatchClient, BatchExecutor, chat_body
from orca_core.teacher.batch_records import BatchRecords
from orca_core.teacher.client import FatalTeacherError
from orca_core.teacher.runner import oracle_server
from orca_core.traces import TRACES_FILE, RequestCache
from orca_oracle.server import create_app, start
from orca_oracle.solver import OracleBook

FAMILIES = "[basic_arithmetic, spell_backward, calendar_weekday_mc, needle_haystack]"
POLL = {"poll_s": 0.05, "poll_max_s": 0.2}


# -- the protocol, with the official SDK ------------------------------------------------------------
@pytest.fixture(scope="module")
def rows() -> list[dict]:
    train, _, _ = generate_suite(None, 6, 0, seed=0)
    return train


@pytest.fixture(scope="module")
def sdk(rows):
    """The official SDK against an in-process oracle serving `good` and `small` (context window 20)."""
    models = {"good": OracleSettings(latency_ms=0, strategy_penalty=0), "small": OracleSettings(context_window=20)}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start(create_app(models, OracleBook(rows), "sk-batch")), loop).result(10)
    yield openai.OpenAI(base_url=url, api_key="sk-batch", max_retries=0)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def line(custom_id: str, model: str, messages: list[dict], **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": messages, **body}}


def finished(sdk: openai.OpenAI, batch_id: str):
    deadline = time.monotonic() + 20
    while (batch := sdk.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
    return batch


def test_the_openai_sdk_drives_files_and_batches(sdk, rows):
    direct = chat(STRATEGIES["direct-answer"].instruction, rows[0]["inputs"])
    lines = [line("a", "good", direct), line("b", "good", chat("", rows[1]["inputs"]), max_tokens=3),
             line("c", "nope", direct), line("d", "small", chat("", max(rows, key=lambda r: len(r["inputs"]))["inputs"]))]
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    created = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"run": "test"})
    assert created.status == "validating" and created.input_file_id == uploaded.id
    batch = finished(sdk, created.id)
    assert batch.status == "completed" and batch.metadata == {"run": "test"}
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 2, 2)
    out = {r["custom_id"]: r for r in map(json.loads, sdk.files.content(batch.output_file_id).text.splitlines())}
    errors = {r["custom_id"]: r for r in map(json.loads, sdk.files.content(batch.error_file_id).text.splitlines())}
    assert set(out) == {"a", "b"} and set(errors) == {"c", "d"}
    assert out["a"]["response"]["status_code"] == 200
    assert out["a"]["response"]["body"]["choices"][0]["message"]["content"] == rows[0]["answer"]  # the online answer
    assert out["b"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert out["b"]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert batch.usage.output_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in out.values())
    assert errors["c"]["response"]["status_code"] == 404
    assert errors["d"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert batch.id in [b.id for b in sdk.batches.list()]
    assert sdk.batches.cancel(batch.id).status == "completed"  # too late to cancel
    assert sdk.files.delete(batch.output_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(batch.output_file_id)


def test_an_input_file_that_does_not_validate_fails_the_whole_batch(sdk, rows):
    messages = chat("", rows[0]["inputs"])
    bad = [line("x", "good", messages), line("x", "good", messages), {**line("y", "good", messages), "url": "/v1/embeddings"}]
    uploaded = sdk.files.create(file=("bad.jsonl", jsonl(bad)), purpose="batch")
    batch = finished(sdk, sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h").id)
    assert batch.status == "failed" and batch.output_file_id is None
    assert [(e.code, e.line) for e in batch.errors.data] == [("duplicate_custom_id", 2), ("invalid_url", 3)]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(sdk.base_url), api_key="wrong", max_retries=0).batches.list()


# -- the fan-out in batch mode ---------------------------------------------------------------------
# One oracle (keyed) and one store for the module: each test has its own models, so its own request ids.
ORACLE_KEY = {"ORCA_TEST_ORACLE_KEY": "sk-right", "ORCA_TEST_WRONG_KEY": "sk-wrong"}
MODELS = {
    "plain": {"latency_ms": 0},
    "flaky": {"latency_ms": 0, "batch_error_rate": 0.2, "batch_expire_after": 40},
    "slow": {"latency_ms": 0, "batch_duration_s": 2.0},
    "locked": {},
}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(base URL, store root with a sources artifact) for models `<name>-a` and `<name>-s` of MODELS."""
    root = tmp_path_factory.mktemp("batch") / "store"
    recipe = load_recipe("smoke", [f"store.root={root}", f"sources.procedural.families={FAMILIES}",
                                   "sources.procedural.train_per_family=25"])
    sources = Path(steps.run_step(ArtifactStore(recipe.store.root), steps.SOURCES, recipe).ref.url)
    endpoints = {f"{name}-{r}": TeacherEndpoint(kind="oracle", model=f"{name}-{r}", rpm=1, oracle=settings,
                                                 api_key_env="ORCA_TEST_ORACLE_KEY")
                 for name, settings in MODELS.items() for r in "as"}
    with pytest.MonkeyPatch.context() as env:
        for name, value in ORACLE_KEY.items():
            env.setenv(name, value)
        with oracle_server(endpoints, [sources / "train.parquet", sources / "heldout.parquet"]) as urls:
            yield urls["plain-a"], root


def batch_args(oracle, models: str, *extra: str, **teacher) -> list[str]:
    url, root = oracle
    fields = {"kind": "openai", "base_url": url, "rpm": 60, "mode": "batch", "batch": POLL,
              "api_key_env": "ORCA_TEST_ORACLE_KEY", **teacher}
    flow = ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    return [f"store.root={root}", f"sources.procedural.families={FAMILIES}",
            "sources.procedural.train_per_family=25", f"teachers.assistant={{model: {models}-a, {flow}}}",
            f"teachers.strong={{model: {models}-s, {flow}}}", *extra]


def server(oracle, reset: bool = False) -> dict:
    root = oracle[0].removesuffix("/v1")
    request = urllib.request.Request(f"{root}/stats/reset", method="POST") if reset else f"{root}/stats"
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def traces_step(recipe, step=steps.TRACES_ORCA1):
    store = ArtifactStore(recipe.store.root)
    ctx = StepContext(request_cache=Path(store.url("requests")))  # no online runner: every role is in batch mode
    return steps.run_step(store, step, recipe, ctx=ctx)


def test_failed_and_expired_lines_are_resubmitted_alone_at_the_discount(oracle):
    server(oracle, reset=True)
    recipe = load_recipe("smoke", batch_args(oracle, "flaky", price_prompt_per_1k=1.0, price_completion_per_1k=2.0))
    result = traces_step(recipe)
    served = server(oracle)
    again = traces_step(recipe)
    assert again.cached and server(oracle) == served  # nothing sent
    by_model = defaultdict(list)
    for batch in served["batches"]:  # in the order they finished: per model, round after round
        by_model[batch["model"]].append(batch)
    assert set(by_model) == {"flaky-a", "flaky-s"}
    for batches in by_model.values():
        assert len(batches) >= 3 and batches[0]["expired"] > 0 and sum(b["failed"] for b in batches) > 0
        for before, after in zip(batches, batches[1:]):
            assert after["lines"] == before["failed"] + before["expired"]  # exactly the errored and expired lines
        assert batches[-1]["failed"] == batches[-1]["expired"] == 0
    traces = pq.read_table(Path(result.ref.url) / TRACES_FILE).to_pylist()
    assert all(t["status"] == "ok" for t in traces)
    assert Counter(served["batch_ok_by_request_id"].values()) == {1: len(traces)}  # each answer paid once
    assert set(served["batch_ok_by_request_id"]) == {t["request_id"] for t in traces}
    for t in traces:  # half the online price
        assert t["cost_usd"] == pytest.approx((t["prompt_tokens"] * 1.0 + t["completion_tokens"] * 2.0) / 1000 * 0.5)
    assert min(t["attempts"] for t in traces) == 1 and max(t["attempts"] for t in traces) >= 2
    stats = json.loads((Path(result.ref.url) / "manifest.json").read_text())["stats"]["this_run"]
    assert stats["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in traces), rel=1e-6)


def test_input_files_keep_to_the_request_and_byte_limits(oracle):
    server(oracle, reset=True)
    recipe = load_recipe("smoke", batch_args(oracle, "plain", batch={**POLL, "max_requests": 30, "max_bytes": 20_000}))
    result = traces_step(recipe)
    batches = server(oracle)["batches"]
    assert all(b["lines"] <= 30 and b["input_bytes"] <= 20_000 for b in batches)
    assert any(b["lines"] == 30 for b in batches) and any(b["input_bytes"] > 15_000 for b in batches)
    assert sum(b["lines"] for b in batches) == result.rows["traces"]


_KILLED = textwrap.dedent("""
    import sys
    from pathlib import Path
    from orca_core import steps
    from orca_core.context import StepContext
    from orca_core.recipe import load_recipe
    from orca_core.store import ArtifactStore
    recipe = load_recipe("smoke", sys.argv[1:])
    store = ArtifactStore(recipe.store.root)
    ctx = StepContext(request_cache=Path(store.url("requests")))
    steps.run_step(store, steps.STRATEGIES, recipe, ctx=ctx)
    steps.run_step(store, steps.TRACES_ORCA2, recipe, ctx=ctx)
""")


def test_kill_9_while_polling_then_resume_pays_nothing_twice(oracle):
    """Two-call strategy: round 1 asks, round 2 follows up; the run is killed while round 1's batch is in progress."""
    server(oracle, reset=True)
    args = batch_args(oracle, "slow", "prompts.default_strategy=recall-then-generate", "prompts.strategies={}")
    records = oracle[1] / "requests" / "batches"
    before = {p.name for p in records.glob("*.json")}
    mine = lambda: [json.loads(p.read_text()) for p in records.glob("*.json") if p.name not in before]  # noqa: E731
    child = subprocess.Popen([sys.executable, "-c", _KILLED, *args], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(r["state"] == "submitted" for r in mine()):
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert server(oracle)["batches"] == []  # killed while its batch was in progress
    recipe = load_recipe("smoke", args)  # the resumed run
    store = ArtifactStore(recipe.store.root)
    steps.run_step(store, steps.STRATEGIES, recipe)
    result = traces_step(recipe, steps.TRACES_ORCA2)
    served = server(oracle)
    lines = [b["lines"] for b in served["batches"]]
    assert len(lines) == 2 and lines[0] == lines[1]  # round 1 asks, round 2 follows up: no new batch for round 1
    traces = pq.read_table(Path(result.ref.url) / TRACES_FILE).to_pylist()
    assert all(t["status"] == "ok" and len(t["call_ids"]) == 2 for t in traces)
    assert Counter(served["batch_ok_by_request_id"].values()) == {1: 2 * len(traces)}  # nothing paid twice
    assert Counter(r["state"] for r in mine()) == {"collected": 2}
    ids = {i for t in traces for i in t["call_ids"]}
    assert set(RequestCache(oracle[1] / "requests").load(ids)) == ids == set(served["batch_ok_by_request_id"])


def test_a_run_killed_between_create_and_record_finds_its_batch_by_submission_id(oracle, tmp_path):
    server(oracle, reset=True)
    endpoint = TeacherEndpoint(kind="openai", model="plain-a", base_url=oracle[0], rpm=1, mode="batch", batch=POLL,
                               api_key_env="ORCA_TEST_ORACLE_KEY")
    client = BatchClient("assistant", endpoint, oracle[0])
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([{"custom_id": rid, "method": "POST", "url": client.url,
                             "body": chat_body(endpoint, chat("", f"Spell {rid} backward."))} for rid in ("r1", "r2")]))
    records = BatchRecords(tmp_path / "requests" / "batches")
    for submission in ("created", "never"):  # both killed before the batch id was recorded
        records.write({"submission": submission, "role": "assistant", "model": "plain-a", "requests": 2,
                       "created_at": int(time.time()), "batch_id": None, "state": "submitting",
                       "input_file_id": client.upload(path)})
    client.create(records.open()[0]["input_file_id"], "created")
    cache = RequestCache(tmp_path / "requests")
    BatchExecutor({"assistant": client}, records, cache.writer("test"), tmp_path).resume(lambda stats: None)
    assert set(cache.load()) == {"r1", "r2"} and len(server(oracle)["batches"]) == 1
    assert {r["submission"]: r["state"] for r in records.all()} == {"created": "collected", "never": "never created"}


def test_a_refused_key_stops_the_run_at_once(oracle):
    recipe = load_recipe("smoke", batch_args(oracle, "locked", api_key_env="ORCA_TEST_WRONG_KEY"))
    started = time.monotonic()
    with pytest.raises(FatalTeacherError, match=r"ORCA_TEST_WRONG_KEY.*HTTP 401"):
        traces_step(recipe)
    assert time.monotonic() - started < 10


def test_batch_mode_needs_a_batch_api():
    with pytest.raises(ValueError, match="kind 'vllm' has none"):
        TeacherEndpoint(kind="vllm", model="m", base_url="http://127.0.0.1:1/v1", rpm=1, mode="batch")
