"""The OpenAI-compatible client, against a real oracle on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from orca_core import steps
from orca_core.context import StepContext
from orca_core.traces import STRATEGIES_FILE
from orca_core.prompts import STRATEGIES, chat
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.sources.suite import SUITE
from orca_core.store import ArtifactStore
from orca_core.teacher.client import FatalTeacherError, TeacherClient
from orca_core.teacher.fanout import FanoutPlan, LocalExecutor, fan_out
from orca_core.teacher.gate import Gate
from orca_core.teacher.jobs import TraceJob, call_id
from orca_core.teacher.limiter import LeasedLimiter, gate_caller
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server
from orca_core.traces import RequestCache
from orca_oracle.server import start


# The limiter itself (leases, pacing, shares, pauses, budget): tests/test_fanout_flow.py.


# -- client ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("client")
    recipe = load_recipe("smoke", [f"store.root={tmp / 'store'}"])
    return Path(steps.run_step(ArtifactStore(recipe.store.root), steps.SOURCES, recipe).ref.url)


def _endpoint(url: str, **kw) -> TeacherEndpoint:
    return TeacherEndpoint(**{"kind": "vllm", "model": "oracle-strong", "base_url": url, "rpm": 60000,
                              "retry_base_s": 0.01, **kw})


def _calls(endpoint: TeacherEndpoint, *messages: list[dict]):
    """The calls one after another through one client and its own limiter: (results, limiter)."""
    async def go():
        limiter = LeasedLimiter(gate_caller(Gate({"strong": {"rpm": endpoint.rpm}})), "strong", "test")
        async with aiohttp.ClientSession() as session:
            client = TeacherClient(endpoint, endpoint.base_url, limiter, session)
            return [await client.call(m) for m in messages], limiter

    return asyncio.run(go())


def _call(endpoint: TeacherEndpoint, messages: list[dict]):
    return _calls(endpoint, messages)[0][0]


def test_429_retry_after_is_honoured_then_the_call_succeeds(sources):
    settings = TeacherEndpoint(kind="oracle", model="oracle-strong", rpm=1, oracle={"rpm_limit": 120, "rate_window_s": 1.0})  # 2 per second
    row = pq.read_table(sources / "train.parquet").to_pylist()[0]
    with oracle_server({"strong": settings}, [sources / "train.parquet"]) as urls:
        messages = chat(STRATEGIES["step-by-step"].instruction, row["inputs"])
        results, limiter = _calls(_endpoint(urls["strong"], max_attempts=3), messages, messages, messages)
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    assert results[2].attempts == 2 and limiter.counts["pause:rate_limited"] == 1  # waited out Retry-After, once
    assert results[2].latency_ms >= 900


def test_the_oracle_subprocess_removes_its_batch_files_when_stopped(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the subprocess's temp folders land here
    settings = TeacherEndpoint(kind="oracle", model="oracle-strong", rpm=60000)
    with oracle_server({"strong": settings}, [sources / "train.parquet"]) as urls:
        assert _call(_endpoint(urls["strong"]), chat("", "hi")).status == "ok"
        assert [p.name.startswith("orca-oracle-files-") for p in tmp_path.iterdir()] == [True]  # Batch API files
    assert list(tmp_path.iterdir()) == []  # SIGTERM ran the app's cleanup: nothing left behind a run


def test_a_wrong_key_is_fatal_and_never_echoed(sources, monkeypatch):
    monkeypatch.setenv("ORACLE_KEY", "sk-right-one")
    settings = TeacherEndpoint(kind="oracle", model="oracle-strong", rpm=1, api_key_env="ORACLE_KEY")
    with oracle_server({"strong": settings}, [sources / "train.parquet"]) as urls:
        monkeypatch.setenv("WRONG_KEY", "sk-wrong-one")
        with pytest.raises(FatalTeacherError) as err:
            _call(_endpoint(urls["strong"], api_key_env="WRONG_KEY"), chat("", "hi"))
        assert "401" in str(err.value) and "sk-wrong-one" not in str(err.value) and "WRONG_KEY" in str(err.value)
        ok = _call(_endpoint(urls["strong"], api_key_env="ORACLE_KEY"), chat("", "hi"))
        assert ok.status == "ok"
    with pytest.raises(FatalTeacherError, match="UNSET_KEY is not set"):
        _call(_endpoint("http://127.0.0.1:9/v1", api_key_env="UNSET_KEY"), chat("", "hi"))


def test_auto_strategy_selection_picks_the_strategy_that_suits_each_family(tmp_path):
    # The oracle errs whenever a strategy does not suit the family (penalty 1.0): the best is known.
    recipe = load_recipe("smoke", [f"store.root={tmp_path / 'store'}", "prompts.default_strategy=auto",
                                   "prompts.strategies={}", "prompts.selection_samples=12", "teachers.strong.oracle.strategy_penalty=1.0",
                                   "teachers.strong.oracle.error_rate=0.0"])
    store = ArtifactStore(recipe.store.root)
    steps.run_step(store, steps.SOURCES, recipe)
    ctx = StepContext(fanout=LocalFanoutRunner(recipe), request_cache=Path(store.url("requests")))
    result = steps.run_step(store, steps.STRATEGIES, recipe, ctx=ctx)
    table = pq.read_table(Path(result.ref.url) / STRATEGIES_FILE).to_pylist()
    chosen = {r["task_name"]: r["strategy"] for r in table if r["chosen"]}
    assert chosen == {task: SUITE[task].strategy for task in recipe.sources.procedural.families}
    assert all(r["n"] == 12 for r in table) and len(table) == 8 * len(STRATEGIES)
    assert {r["accuracy"] for r in table if r["chosen"]} == {1.0}


# -- which 400s end the run ------------------------------------------------------------------------
# What providers answer with HTTP 400, by the prompt that gets it from `answer_400` below.
BAD_REQUESTS = {
    "too-long-openai": {"message": "This model's maximum context length is 8192 tokens. However, your messages "
                        "resulted in 9000 tokens. Please reduce the length of the messages.",
                        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"},
    "too-long-vllm": {"message": "This model's maximum context length is 4096 tokens. However, you requested 5000 "
                      "tokens (4000 in the messages, 1000 in the completion). Please reduce the length of the "
                      "messages or completion.", "type": "BadRequestError", "param": None, "code": 400},
    "too-long-vllm-v1": {"message": "The decoder prompt (length 5000) is longer than the maximum model length of "
                         "4096. Make sure that `max_model_len` is no smaller than the number of text tokens.",
                         "type": "BadRequestError", "param": None, "code": 400},
    "flagged-openai": {"message": "Invalid prompt: your prompt was flagged as potentially violating our usage "
                       "policy.", "type": "invalid_request_error", "param": None, "code": "invalid_prompt"},
    "flagged-azure": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                      "management policy.", "type": None, "param": "prompt", "code": "content_filter",
                      "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation"}},
    "unknown-field": {"message": "Unrecognized request argument supplied: top_k", "type": "invalid_request_error",
                      "param": None, "code": None},
}
PER_REQUEST = {"too-long-openai": "failed:context_length", "too-long-vllm": "failed:context_length",
               "too-long-vllm-v1": "failed:context_length", "flagged-openai": "failed:content_filter",
               "flagged-azure": "failed:content_filter"}


@contextlib.contextmanager
def protocol_server() -> Iterator[tuple[str, Counter]]:
    """A chat-completions server on 127.0.0.1 (its own thread and loop): a prompt named in BAD_REQUESTS (or
    that name, `#` and a number) gets that 400, any other an answer. Yields the base URL and the requests
    served, by prompt name."""
    served: Counter[str] = Counter()

    async def answer_400(request: web.Request) -> web.Response:
        prompt = (await request.json())["messages"][-1]["content"].split("#")[0]
        served[prompt] += 1
        if prompt in BAD_REQUESTS:
            return web.json_response({"error": BAD_REQUESTS[prompt]}, status=400)
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": "4"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer_400)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start(app), loop).result(timeout=30)
    try:
        yield url, served
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _fan_out(tmp_path: Path, url: str, prompts: list[str], concurrency: int = 8):
    """Every prompt as an Orca 1 job of the assistant (a 1-call job) through the in-process fan-out:
    (the request cache's rows by prompt, the report). Transient errors would be retried (max_attempts 3)."""
    endpoint = _endpoint(url, model="m", max_attempts=3)
    jobs = [TraceJob(f"s{i}", "procedural", "t", "zs_opt", "cot", "orca1", "assistant", "", 1, "sys", "sys", p, "4")
            for i, p in enumerate(prompts)]
    plan = FanoutPlan(lambda: jobs, {"assistant": endpoint}, len(jobs))
    cache = RequestCache(tmp_path / "requests", index_dir=tmp_path / "index", compact=False)
    executor = LocalExecutor(plan.endpoints, {"assistant": url}, cache.folder, concurrency=concurrency)
    try:
        report = fan_out(plan, cache, executor, lambda done, total, line: None)
    finally:
        rows = cache.load()
        by_prompt = {j.user: rows.get(call_id(j, endpoint, [])) for j in jobs}
    return by_prompt, report


def test_a_400_about_one_prompt_is_its_failure_row_and_the_run_goes_on(tmp_path):
    prompts = [*PER_REQUEST, "2+2?", "3+1?"]
    with protocol_server() as (url, served):
        rows, report = _fan_out(tmp_path, url, prompts)
    assert {p: rows[p]["status"] for p in prompts} == {**PER_REQUEST, "2+2?": "ok", "3+1?": "ok"}
    assert [rows[p]["attempts"] for p in prompts] == [1] * len(prompts)  # permanent: never retried
    assert served == Counter(prompts)  # each sent once
    assert report.worker["failures"] == {"context_length": 3, "content_filter": 2}


def test_a_400_about_the_request_itself_ends_the_fan_out_at_once(tmp_path):
    prompts = ["2+2?", *(f"unknown-field#{i}" for i in range(200))]  # 200 requests the endpoint refuses alike
    with protocol_server() as (url, served):
        started = time.monotonic()
        with pytest.raises(FatalTeacherError) as err:
            _fan_out(tmp_path, url, prompts)
        elapsed = time.monotonic() - started
        port = url.split(":")[2].split("/")[0]
    message = str(err.value)
    for part in (f"teachers.assistant (vllm model 'm' at 127.0.0.1:{port}, no key", "HTTP 400",
                 "Unrecognized request argument supplied: top_k"):
        assert part in message, (part, message)
    assert elapsed < 5, elapsed
    assert served["unknown-field"] <= 8  # at most the jobs in flight (concurrency 8), none retried
    rows = RequestCache(tmp_path / "requests", index_dir=tmp_path / "index", compact=False).load()
    assert all(row["status"] == "ok" for row in rows.values())  # no failure row: a rerun sends them again
