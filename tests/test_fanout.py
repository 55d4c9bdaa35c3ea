"""The teacher fan-out against a real oracle server on 127.0.0.1: resume, faults, budget, retries.

The oracle runs as a subprocess, as the flow runs it; recipes point at it as an
external OpenAI-compatible endpoint (kind `vllm`), so the production client path
is what runs. They use the in-process executor (fast); the Ray executor under a
SIGKILL and on a multi-node cluster: tests/test_fanout_flow.py.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orca_core import steps
from orca_core.context import StepContext
from orca_core.traces import TRACES_FILE
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.store import ArtifactStore
from orca_core.teacher import fanout
from orca_core.teacher.fanout import FanoutIncomplete
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server
from orca_core.traces import RequestCache

FAMILIES = "[basic_arithmetic, spell_backward, calendar_weekday_mc, needle_haystack]"


@pytest.fixture
def sources(tmp_path):
    """A small sources artifact (the oracle's answer book) in a fresh store."""
    recipe = load_recipe("smoke", [f"store.root={tmp_path / 'store'}", f"sources.procedural.families={FAMILIES}",
                                   "sources.procedural.train_per_family=25"])
    store = ArtifactStore(recipe.store.root)
    ref = steps.run_step(store, steps.SOURCES, recipe).ref
    return Path(ref.url)


def start_oracle(sources: Path, **settings):
    """An oracle subprocess serving `oracle-assistant` and `oracle-strong`; yields its base URL."""
    endpoint = lambda model: TeacherEndpoint(kind="oracle", model=model, rpm=1, oracle=settings)  # noqa: E731
    return oracle_server({"assistant": endpoint("oracle-assistant"), "strong": endpoint("oracle-strong")},
                         [sources / "train.parquet", sources / "heldout.parquet"])


def stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


def recipe_for(tmp_path, url: str, *extra: str, rpm: int = 60000, **teacher):
    fields = {"kind": "vllm", "base_url": url, "rpm": rpm, "max_concurrency": 32, "retry_base_s": 0.01,
              "retry_max_s": 0.05, **teacher}
    flow = ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    return load_recipe("smoke", [
        f"store.root={tmp_path / 'store'}", f"sources.procedural.families={FAMILIES}",
        "sources.procedural.train_per_family=25",
        f"teachers.assistant={{model: oracle-assistant, {flow}}}",
        f"teachers.strong={{model: oracle-strong, {flow}}}", *extra])


def run_traces(recipe, retry_failed: bool = False):
    store = ArtifactStore(recipe.store.root)
    ctx = StepContext(fanout=LocalFanoutRunner(recipe), request_cache=Path(store.url("requests")), retry_failed=retry_failed)
    return steps.run_step(store, steps.TRACES_ORCA1, recipe, ctx=ctx, force=retry_failed), store


def test_second_build_sends_nothing_and_traces_carry_both_teachers(tmp_path, sources):
    with start_oracle(sources) as urls:
        url = urls["assistant"]
        recipe = recipe_for(tmp_path, url)
        first, store = run_traces(recipe)
        sent = stats(url)["ok"]
        traces = pq.read_table(Path(first.ref.url) / TRACES_FILE).to_pylist()
        assert len(traces) == first.rows["traces"] == sent  # one call per Orca 1 trace
        roles = Counter(t["teacher_role"] for t in traces)
        assert roles["assistant"] == 100 and 0 < roles["strong"] < 100  # strong answers a subset
        assert all(t["status"] == "ok" and t["student_system"] == t["teacher_system"] for t in traces)
        assert {t["system_message_id"] for t in traces if t["task_name"] == "basic_arithmetic"} <= {6, 11, 16}  # CoT set
        # Rebuild from scratch (artifact deleted): every answer comes from the request cache, in one pass that
        # starts no teacher (no fan-out runner is given: asking for one would raise).
        store.supersede("traces-orca1", first.ref.key)
        ctx = StepContext(fanout=None, request_cache=Path(store.url("requests")))
        again = steps.run_step(store, steps.TRACES_ORCA1, recipe, ctx=ctx)
        assert not again.cached and stats(url)["ok"] == sent
        assert store.manifest(again.ref)["stats"]["this_run"]["found_in_cache"] == len(traces)
        assert pq.read_table(Path(again.ref.url) / TRACES_FILE).equals(pq.read_table(Path(first.ref.url) / TRACES_FILE))


def test_injected_faults_end_as_ok_or_failure_rows_with_reasons(tmp_path, sources):
    faults = {"http_500": 0.02, "http_503": 0.02, "timeout": 0.01, "drop": 0.01, "malformed": 0.02,
              "empty": 0.01, "content_filter": 0.01}  # 10 % in all
    with start_oracle(sources, faults=faults, timeout_sleep_s=2.0) as urls:
        recipe = recipe_for(tmp_path, urls["assistant"], max_attempts=2, timeout_s=0.5)
        result, _ = run_traces(recipe)
        server = stats(urls["assistant"])
    traces = pq.read_table(Path(result.ref.url) / TRACES_FILE).to_pylist()
    assert len(traces) == result.rows["traces"] and len({t["source_id"] + t["teacher_role"] for t in traces}) == len(traces)
    statuses = Counter(t["status"] for t in traces)
    allowed = {"ok", "failed:http_500", "failed:http_503", "failed:timeout", "failed:connection", "failed:malformed",
               "failed:empty", "failed:content_filter"}
    assert set(statuses) <= allowed and statuses["ok"] >= 0.85 * len(traces)
    assert sum(server["faults"].values()) > 0  # faults really happened, and were survived
    failed = [t for t in traces if t["status"] != "ok"]
    assert all(t["response"] == "" for t in failed)
    assert all(1 <= t["attempts"] <= 2 for t in traces)  # bounded by max_attempts


def test_budget_cap_stops_sending_and_a_later_run_resumes(tmp_path, sources):
    with start_oracle(sources) as urls:
        url = urls["assistant"]
        priced = {"price_prompt_per_1k": 0.5, "price_completion_per_1k": 1.0}
        capped = recipe_for(tmp_path, url, "teachers.max_cost_usd=1.0", max_concurrency=4, **priced)
        with pytest.raises(FanoutIncomplete, match="budget"):
            run_traces(capped)
        store = ArtifactStore(capped.store.root)
        assert store.keys("traces-orca1") == []  # nothing published
        paid = RequestCache(Path(store.url("requests"))).load()
        spent = sum(r["cost_usd"] for r in paid.values())
        assert 0 < len(paid) < 150 and 1.0 <= spent < 1.0 + 4 * 0.2  # stops at the cap (in-flight may overshoot)
        sent_before = stats(url)["ok"]
        done, _ = run_traces(recipe_for(tmp_path, url, "teachers.max_cost_usd=1000", **priced))
        assert stats(url)["ok"] - sent_before == done.rows["traces"] - len(paid)  # only the missing ones


def test_long_answers_are_written_in_row_groups_bounded_by_bytes(tmp_path, sources, monkeypatch):
    """The trace table buffers at most ROW_GROUP_BYTES: a row group closes early when long answers fill it."""
    monkeypatch.setattr(fanout, "CHUNK_JOBS", 16)
    monkeypatch.setattr(fanout, "ROW_GROUP_BYTES", 1)  # any chunk's traces fill it
    with start_oracle(sources) as urls:
        done, _ = run_traces(recipe_for(tmp_path, urls["assistant"], "prompts.strong_fraction=0"))
    written = pq.ParquetFile(Path(done.ref.url) / TRACES_FILE)
    rows = written.metadata.num_rows
    assert rows > 16 and written.num_row_groups == -(-rows // 16)  # one group per chunk, not one for all


def test_a_resumed_fan_out_writes_the_traces_in_job_order(tmp_path, sources, monkeypatch):
    """Chunks the cache answers whole are written while surveying, the rest after the fan-out: the table of a
    resumed run is the table of a fully cached one, row for row (training sees the same data either way)."""
    monkeypatch.setattr(fanout, "CHUNK_JOBS", 16)  # ~10 chunks: some whole in the cache, some not
    monkeypatch.setattr(fanout, "ROW_GROUP_ROWS", 40)  # and several row groups
    one_role = ["prompts.strong_fraction=0"]  # (the budget run answers the assistant's jobs in order)
    with start_oracle(sources) as urls:
        priced = {"price_prompt_per_1k": 0.5, "price_completion_per_1k": 1.0, "max_concurrency": 4}
        with pytest.raises(FanoutIncomplete, match="budget"):
            run_traces(recipe_for(tmp_path, urls["assistant"], "teachers.max_cost_usd=4.0", *one_role, **priced))
        resumed, store = run_traces(recipe_for(tmp_path, urls["assistant"], "teachers.max_cost_usd=1000", *one_role, **priced))
        table = pq.read_table(Path(resumed.ref.url) / TRACES_FILE)
        this_run = store.manifest(resumed.ref)["stats"]["this_run"]
        assert 16 <= this_run["written_while_surveying"] < len(table) and this_run["sent_jobs"] > 0
        store.supersede("traces-orca1", resumed.ref.key)
        cached, _ = run_traces(recipe_for(tmp_path, urls["assistant"], "teachers.max_cost_usd=1000", *one_role, **priced))
    assert store.manifest(cached.ref)["stats"]["this_run"]["written_while_surveying"] == len(table)
    again = pq.read_table(Path(cached.ref.url) / TRACES_FILE)
    assert again.equals(table) and pq.ParquetFile(Path(cached.ref.url) / TRACES_FILE).num_row_groups == -(-len(table) // 40)


def test_retry_failed_resends_only_failures_and_refreshes_downstream(tmp_path, sources):
    with start_oracle(sources, faults={"content_filter": 0.2}) as urls:
        url = urls["assistant"]
        recipe = recipe_for(tmp_path, url)
        first, store = run_traces(recipe)
        failed = [t for t in pq.read_table(Path(first.ref.url) / TRACES_FILE).to_pylist() if t["status"] != "ok"]
        assert failed and all(t["status"] == "failed:content_filter" for t in failed)
        filtered = steps.run_step(store, steps.FILTERED_ORCA1, recipe)
        before = stats(url)["requests"]
        retried, _ = run_traces(recipe, retry_failed=True)
        assert stats(url)["requests"] - before == len(failed)  # content_filter is not retried inside a run
        assert retried.ref.key == first.ref.key
        after = steps.run_step(store, steps.FILTERED_ORCA1, recipe)
        assert not after.cached and after.ref.key == filtered.ref.key  # rebuilt: its upstream changed


def test_context_limit_becomes_a_failure_row_without_a_request(tmp_path, sources):
    with start_oracle(sources) as urls:
        recipe = recipe_for(tmp_path, urls["assistant"], context_window=60, max_tokens=40)
        result, _ = run_traces(recipe)
        server = stats(urls["assistant"])
    statuses = Counter(t["status"] for t in pq.read_table(Path(result.ref.url) / TRACES_FILE).to_pylist())
    assert statuses["failed:context_length"] > 0
    assert server["requests"] == result.rows["traces"] - statuses["failed:context_length"]
