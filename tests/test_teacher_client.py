"""The OpenAI-compatible client, against a real oracle on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
import pytest

from orca_core import steps
from orca_core.context import StepContext
from orca_core.traces import STRATEGIES_FILE
from orca_core.prompts import STRATEGIES, chat
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.sources.suite import SUITE
from orca_core.store import ArtifactStore
from orca_core.teacher.client import FatalTeacherError, TeacherClient
from orca_core.teacher.gate import Gate
from orca_core.teacher.limiter import LeasedLimiter, gate_caller
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server


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
