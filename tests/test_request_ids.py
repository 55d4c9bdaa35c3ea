"""Request ids carry who answers; samples; identical requests sent once; a fatal error ends the run at once.

One oracle subprocess (with an API key) serves the whole module; recipes point at it as an external
OpenAI-compatible endpoint (kind `vllm`), so the production client path runs and the oracle's `/stats`
counts what was paid for (per X-Client-Request-Id, the cache's request id).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from orca_core import steps
from orca_core.context import StepContext
from orca_core.recipe import load_recipe
from orca_core.recipe.models import TeacherEndpoint
from orca_core.store import ArtifactStore
from orca_core.teacher.client import FatalTeacherError
from orca_core.teacher.identity import endpoint_identity, host_of, identity_digest
from orca_core.teacher.jobs import RecentIds, TraceJob, call_id
from orca_core.teacher.runner import LocalFanoutRunner, oracle_server
from orca_core.traces import TRACES_FILE, request_id

FAMILIES = "[basic_arithmetic, spell_backward]"
SOURCES = [f"sources.procedural.families={FAMILIES}", "sources.procedural.train_per_family=10",
           "sources.procedural.heldout_per_family=1"]
RIGHT_KEY, WRONG_KEY = "sk-ids-right-0123456789", "sk-ids-wrong-9876543210"


# -- the identity, without a server ------------------------------------------------------------
def vllm(**fields) -> TeacherEndpoint:
    return TeacherEndpoint(**{"kind": "vllm", "model": "m", "base_url": "http://gpu-1.example:8000/v1", "rpm": 10,
                              **fields})


def an_id(endpoint: TeacherEndpoint, sample: int = 0) -> str:
    return request_id(identity_digest(endpoint), [{"role": "user", "content": "2+2?"}], endpoint.temperature,
                      endpoint.top_p, endpoint.max_tokens, sample)


def test_the_id_covers_who_answers_and_nothing_else():
    base = an_id(vllm())
    assert base == "32c8cc9c9b4ac34a3ace6fa5426185cdefc65d1cc6fc64c3c122bd2c56e276e6"  # the canonical form is pinned
    # How a request is sent or billed never changes what comes back: same id.
    for unrelated in ({"rpm": 99}, {"tpm": 5}, {"max_concurrency": 1}, {"timeout_s": 1}, {"max_attempts": 1},
                      {"api_key_env": "OTHER_KEY"}, {"price_prompt_per_1k": 3.0}, {"retry_base_s": 9},
                      {"base_url": "https://GPU-1.example:8000/other/path?token=secret"},
                      {"base_url": "http://user:sk-inline@gpu-1.example:8000/v1"}):
        assert an_id(vllm(**unrelated)) == base, unrelated
    assert host_of("https://API.openai.com:443/v1") == "api.openai.com" == host_of("http://api.openai.com/v1")
    assert host_of("http://[::1]:8000/v1") == "[::1]:8000"
    # Who answers: every one of these re-asks.
    changed = [vllm(kind="openai"), vllm(model="m2"), vllm(base_url="http://gpu-2.example:8000/v1"),
               vllm(base_url="http://gpu-1.example:8001/v1"), vllm(revision="r1"), vllm(temperature=0.1),
               vllm(kind="azure", api_version="2024-06-01"), vllm(kind="azure", api_version="2024-10-21")]
    ids = [an_id(e) for e in changed]
    assert base not in ids and len(set(ids)) == len(ids)
    # With a revision the host is out of the id: a server move keeps the answers, a new revision does not.
    moved = vllm(revision="r1", base_url="http://gpu-9.example/v1")
    assert an_id(moved) == an_id(vllm(revision="r1")) != an_id(vllm(revision="r2"))
    assert "host" not in endpoint_identity(moved) and endpoint_identity(vllm())["host"] == "gpu-1.example:8000"
    # Samples: distinct ids; sample 0 is the plain id.
    assert an_id(vllm(), sample=0) == base and len({an_id(vllm(), s) for s in range(3)}) == 3


def test_the_oracle_identity_is_its_answer_settings_and_its_code():
    oracle = TeacherEndpoint(kind="oracle", model="o", rpm=1)
    identity = endpoint_identity(oracle)
    assert len(identity["oracle_code"]) == 64 and "host" not in identity
    assert an_id(oracle) == an_id(TeacherEndpoint(kind="oracle", model="o", rpm=1, oracle={}))  # defaults either way
    for same in ({"latency_ms": 1}, {"rpm_limit": 5}, {"faults": {"http_500": 0.5}}, {"timeout_sleep_s": 1}):
        assert an_id(TeacherEndpoint(kind="oracle", model="o", rpm=1, oracle=same)) == an_id(oracle), same
    for other in ({"error_rate": 0.3}, {"explain_depth": 0.5}, {"strategy_penalty": 0.1}, {"seed": 1},
                  {"context_window": 100}, {"trace_lines": "bare"}):
        assert an_id(TeacherEndpoint(kind="oracle", model="o", rpm=1, oracle=other)) != an_id(oracle), other


def test_bad_base_urls_are_refused_naming_the_field():
    for bad in ("localhost:8000/v1", "ftp://host/v1", "http:///v1", "http://host:port/v1"):
        with pytest.raises(ValidationError, match="base_url") as err:
            vllm(base_url=bad)
        assert "http(s) URL" in str(err.value) or "port" in str(err.value), bad
    with pytest.raises(ValidationError, match="revision"):
        vllm(revision="")
    with pytest.raises(ValidationError, match="frozen"):
        vllm().rpm = 5  # type: ignore[misc]  # identities are cached per endpoint object


# -- against the oracle ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """One keyed oracle for the module, answering from a small sources artifact: its base URL."""
    root = tmp_path_factory.mktemp("ids-oracle")
    recipe = load_recipe("smoke", [f"store.root={root}", *SOURCES])
    ref = steps.run_step(ArtifactStore(recipe.store.root), steps.SOURCES, recipe).ref
    served = {role: TeacherEndpoint(kind="oracle", model=f"oracle-{role}", rpm=1, api_key_env="ORCA_IDS_ORACLE_KEY")
              for role in ("assistant", "strong")}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ORCA_IDS_ORACLE_KEY", RIGHT_KEY)
        with oracle_server(served, [Path(ref.url) / "train.parquet"]) as urls:
            yield urls["strong"]


def stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


def teacher(url: str, **fields) -> str:
    fields = {"kind": "vllm", "base_url": url, "rpm": 60000, "max_concurrency": 32,
              "api_key_env": "ORCA_IDS_KEY", "retry_base_s": 0.01, **fields}
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"


def recipe_for(store: Path, url: str, *extra: str, assistant: dict | None = None, strong: dict | None = None):
    return load_recipe("smoke", [f"store.root={store}", *SOURCES, "prompts.strong_fraction=0.5",
                                 f"teachers.assistant={teacher(url, **{'model': 'oracle-assistant', **(assistant or {})})}",
                                 f"teachers.strong={teacher(url, **{'model': 'oracle-strong', **(strong or {})})}",
                                 *extra])


def build_traces(recipe, rebuild: bool = False):
    """The Orca 1 traces step (rebuild: the artifact is deleted first; the request cache stays)."""
    store = ArtifactStore(recipe.store.root)
    steps.run_step(store, steps.SOURCES, recipe)
    if rebuild:
        for key in store.keys("traces-orca1"):
            store.supersede("traces-orca1", key)
    ctx = StepContext(fanout=LocalFanoutRunner(recipe), request_cache=Path(store.url("requests")))
    result = steps.run_step(store, steps.TRACES_ORCA1, recipe, ctx=ctx)
    return result, pq.read_table(Path(result.ref.url) / TRACES_FILE).to_pylist()


def sent(url: str, since: dict) -> Counter:
    """ok answers per request id since the `since` snapshot of /stats."""
    return Counter(stats(url)["ok_by_request_id"]) - Counter(since["ok_by_request_id"])


def test_a_new_revision_reasks_each_request_once_and_nothing_else_reasks(tmp_path, oracle, monkeypatch):
    monkeypatch.setenv("ORCA_IDS_KEY", RIGHT_KEY)
    store = tmp_path / "store"
    before = stats(oracle)
    first, traces = build_traces(recipe_for(store, oracle))
    n = len(traces)
    paid = sent(oracle, before)
    assert n == first.rows["traces"] > 20 and set(paid) == {t["request_id"] for t in traces}
    assert set(paid.values()) == {1}

    def rebuild(**changes):
        snapshot = stats(oracle)
        result, rows = build_traces(recipe_for(store, oracle, assistant=changes, strong=changes), rebuild=True)
        return result, rows, sent(oracle, snapshot)

    # Limits, key variable and prices: the same ids, nothing re-asked.
    _, rows, paid = rebuild(rpm=999, max_concurrency=3, price_prompt_per_1k=1.0)
    assert not paid and [r["request_id"] for r in rows] == [t["request_id"] for t in traces]
    # A host change (the same server, another name for it) re-asks everything ...
    local = oracle.replace("127.0.0.1", "localhost")
    _, rows, paid = rebuild(base_url=local)
    assert len(paid) == n and set(paid.values()) == {1} and not set(paid) & {t["request_id"] for t in traces}
    # ... a revision re-asks each request exactly once ...
    _, revised, paid = rebuild(revision="deploy-1")
    assert len(paid) == n and set(paid.values()) == {1} and set(paid) == {r["request_id"] for r in revised}
    # ... and with the revision kept, moving the server re-asks nothing.
    moved, rows, paid = rebuild(revision="deploy-1", base_url=local)
    assert not paid and not moved.cached and [r["request_id"] for r in rows] == [r["request_id"] for r in revised]


def test_samples_give_distinct_ids_and_one_trace_each(tmp_path, oracle, monkeypatch):
    monkeypatch.setenv("ORCA_IDS_KEY", RIGHT_KEY)
    before = stats(oracle)
    _, traces = build_traces(recipe_for(tmp_path / "store", oracle, assistant={"samples": 3}))
    by_role = Counter(t["teacher_role"] for t in traces)
    prompts = by_role["assistant"] // 3
    assert by_role["assistant"] == 3 * prompts == 60 and 0 < by_role["strong"] < prompts
    ids = [t["request_id"] for t in traces]
    assert len(set(ids)) == len(ids) and set(sent(oracle, before)) == set(ids)
    per_prompt = Counter(t["source_id"] for t in traces if t["teacher_role"] == "assistant")
    assert set(per_prompt.values()) == {3}


def test_one_model_in_both_roles_sends_each_request_once(tmp_path, oracle, monkeypatch):
    monkeypatch.setenv("ORCA_IDS_KEY", RIGHT_KEY)
    before = stats(oracle)
    result, traces = build_traces(recipe_for(tmp_path / "store", oracle, assistant={"model": "oracle-strong"}))
    paid = sent(oracle, before)
    by_role = {role: {t["source_id"]: t["request_id"] for t in traces if t["teacher_role"] == role}
               for role in ("assistant", "strong")}
    assert len(by_role["assistant"]) == 20 and 0 < len(by_role["strong"]) < 20
    assert all(by_role["assistant"][s] == rid for s, rid in by_role["strong"].items())  # the same request
    assert set(paid) == set(by_role["assistant"].values()) and set(paid.values()) == {1}  # sent once each
    assert all(t["status"] == "ok" and t["response"] for t in traces)  # both jobs got the answer
    this_run = ArtifactStore(tmp_path / "store").manifest(result.ref)["stats"]["this_run"]
    assert this_run["shared_jobs"] == len(by_role["strong"]) and this_run["requests"] == len(paid)


def test_a_jobs_call_ids_follow_its_sample():
    job = TraceJob("s1", "procedural", "t", "zs_opt", "cot", "orca1", "assistant", "", 1, "sys", "sys", "2+2?", "4")
    endpoint = vllm()
    plain = request_id(identity_digest(endpoint), job.messages([]), 0.7, 0.95, 1024)
    ids = [call_id(replace(job, sample=s), endpoint, []) for s in range(4)]
    assert ids[0] == plain and len(set(ids)) == 4


# -- a fatal error ends the run at once ------------------------------------------------------------------
def test_a_wrong_key_fails_the_run_within_seconds_without_retries(tmp_path, oracle, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import orca_generate
    from tasks.ray_runtime import ensure_ray

    import ray

    # Actors read the key from their environment, which a Ray runtime takes when it starts: one started by
    # an earlier test would not have it, and the run would fail on a missing key instead of a refused one.
    ray.shutdown()
    monkeypatch.setenv("ORCA_IDS_KEY", WRONG_KEY)
    overrides = [f"store.root={tmp_path / 'store'}", *SOURCES, "prompts.strong_fraction=0.5",
                 f"teachers.assistant={teacher(oracle, model='oracle-assistant')}",
                 f"teachers.strong={teacher(oracle, model='oracle-strong')}",
                 "prefect.retries=2", "prefect.retry_delay_s=1"]  # the flow retries after 30 s
    recipe = load_recipe("smoke", overrides)
    steps.run_step(ArtifactStore(recipe.store.root), steps.SOURCES, recipe)
    ensure_ray(recipe)  # started before the clock: the run's own start-up is not what is measured
    with prefect_test_harness(server_startup_timeout=120):
        started = time.monotonic()
        with pytest.raises(FatalTeacherError) as err:
            orca_generate(recipe="smoke", overrides=overrides)
        elapsed = time.monotonic() - started
        with get_client(sync_client=True) as client:
            flow_runs = client.read_flow_runs()
            task_runs = client.read_task_runs()
    message = str(err.value)
    # The first step that asks a teacher is the Orca 1 traces (these families' strategies are set by hand);
    # whichever role's request came back first names its endpoint.
    port = oracle.split(":")[2].split("/")[0]
    role = "assistant" if "teachers.assistant" in message else "strong"
    for part in (f"teachers.{role} (vllm model 'oracle-{role}' at 127.0.0.1:{port}, the key in $ORCA_IDS_KEY)",
                 "HTTP 401"):
        assert part in message, (part, message)
    assert WRONG_KEY not in message and RIGHT_KEY not in message
    assert elapsed < 15, elapsed
    assert [(r.state.name, r.run_count) for r in flow_runs] == [("Failed", 1)]
    traces = [r for r in task_runs if r.name.startswith("traces-orca1-")]
    assert [(r.state.name, r.run_count) for r in traces] == [("Failed", 1)]


def test_request_id_fast_path_writes_canonical_json_byte_for_byte():
    """request_id writes the usual request's JSON by hand; it must be canonical_json's text exactly (escapes, float
    repr, key order, the sample field), and anything unusual takes the general path."""
    import math
    import random

    from orca_core.keys import canonical_json, sha256_text
    from orca_core.traces import _canonical_request

    rng = random.Random(0)
    alphabet = 'ab "\\\n\t\r\x00\x1f\x7f é漢😀\u2028/<>&\'\x08\x0c'

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))

    for _ in range(3000):
        messages = [{"role": rng.choice(["system", "user", "assistant"]), "content": text()}
                    for _ in range(rng.randint(0, 4))]
        temperature, top_p = rng.choice([0.0, 0.7, 1, 1e-7, 2.5e20, 0.1 + 0.2]), rng.choice([1.0, 0.95, 1])
        max_tokens, sample, teacher = rng.randint(1, 4096), rng.choice([0, 0, 1, 7]), text()
        request = {"teacher": teacher, "messages": messages, "temperature": temperature, "top_p": top_p,
                   "max_tokens": max_tokens, **({"sample": sample} if sample else {})}
        assert _canonical_request(teacher, messages, temperature, top_p, max_tokens, sample) == canonical_json(request)
        assert request_id(teacher, messages, temperature, top_p, max_tokens, sample) == sha256_text(canonical_json(request))
    # Not the usual shape: the general path (which refuses NaN as canonical_json does).
    assert _canonical_request("t", [{"role": "user", "content": "x", "name": "n"}], 0.0, 1.0, 8, 0) is None
    assert _canonical_request("t", [], True, 1.0, 8, 0) is None
    assert _canonical_request("t", [], math.nan, 1.0, 8, 0) is None
    with pytest.raises(ValueError):
        request_id("t", [], math.nan, 1.0, 8)


def test_recent_ids_flag_repeats_within_a_chunk_and_across_chunks_until_the_window_passes():
    ids = [f"{n:016x}" + "0" * 48 for n in range(10)]
    sent = RecentIds(window=4)
    assert sent.fresh([ids[0], ids[1], ids[0], ids[2]]) == [True, True, False, True]  # the repeat in the chunk
    assert sent.fresh([ids[1], ids[3]]) == [False, True]  # ids[1]: an earlier chunk sent it
    assert sent.fresh([ids[4], ids[5], ids[6]]) == [True, True, True]  # the ring wraps: 0..2 leave the window
    assert sent.fresh([ids[0], ids[6], ids[3]]) == [True, False, False]  # 0 left the window; 3 and 6 are in it
    assert sent.fresh([]) == []
    big = RecentIds(window=3)  # a chunk longer than the window keeps its newest ids
    assert big.fresh(ids[:5]) == [True] * 5
    assert big.fresh([ids[1], ids[2], ids[4]]) == [True, False, False]
    top = "f" * 64  # keys use all 64 bits
    assert big.fresh([top, top]) == [True, False]
