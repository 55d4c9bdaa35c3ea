"""`orca plan` and the flows' dry run: what a run will do and cost, before it sends or builds anything."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from orca_core.generate import orca1_fanout
from orca_core.plan import make_plan, markdown
from orca_core.plan_teachers import ESTIMATED, ESTIMATED_STRATEGIES
from orca_core.recipe import load_recipe
from orca_core.steps import SOURCES, run_step
from orca_core.store import ArtifactStore
from orca_core.teacher.jobs import call_id
from orca_core.traces import RequestCache, now_iso

runner = CliRunner()
# The assistant teacher as a priced OpenAI endpoint: nothing is sent, the plan only counts.
PRICED = ["teachers.assistant.kind=openai", "teachers.assistant.model=gpt-3.5-turbo",
          "teachers.assistant.price_prompt_per_1k=0.0015", "teachers.assistant.price_completion_per_1k=0.002",
          "teachers.assistant.max_tokens=100"]
FAKE_KEY = "sk-fake-orca-0123456789abcdef"  # the oracle teachers require a key (as in test_flow)
KEYED = ["teachers.assistant.api_key_env=ORCA_FAKE_TEACHER_KEY", "teachers.strong.api_key_env=ORCA_FAKE_TEACHER_KEY"]
EVALS = {"eval-base", "eval-flan", "eval-orca1", "eval-orca2"}


def _by_step(plan) -> dict:
    return {s.step: s for s in plan.steps}


def test_a_fresh_store_misses_every_step_and_estimates_the_fanout_from_the_recipe(smoke):
    plan = make_plan(smoke)
    steps = _by_step(plan)
    assert len(steps) == 19 and all(s.status == "miss" and s.why == "no artifact yet" for s in plan.steps)
    # 8 families x 20 rows: every row for the assistant, half for the strong teacher; 4 auto families x 8 samples
    # x 8 calls over the six candidate strategies; Orca 2: the 4 hand-mapped families take 1+2+1+1 calls a row,
    # the 4 auto ones the longest strategy (2 calls).
    requests = {(t.step, t.role): t.requests for t in plan.teachers}
    assert requests == {("strategies", "strong"): 256, ("traces-orca1", "assistant"): 160,
                        ("traces-orca1", "strong"): 80, ("traces-orca2", "strong"): 260}
    assert all(t.note == ESTIMATED and t.prompt_basis == "assumed 256 a call" for t in plan.teachers)
    assert all(t.completion_basis == "max_tokens (upper bound)" and t.usd == 0 for t in plan.teachers)
    # At most one example per packed row: 160 examples / (4 rows x 2 workers) per step; orca2 replays 25 % more.
    assert [steps[f"train-{s}"].training.optimizer_steps for s in ("flan", "orca1", "orca2")] == [20, 20, 25]
    assert steps["train-flan"].training.tokens == 20 * 8 * 256
    assert {steps[e].evaluation.prompts for e in EVALS} == {80}  # 8 families x 5 held-out x 2 system messages
    assert not Path(smoke.store.root).exists()  # the plan wrote nothing


@pytest.fixture
def sources_only(tmp_path) -> tuple:
    """A store with only the sources artifact, and the priced recipe."""
    recipe = load_recipe("smoke", [f"store.root={tmp_path / 'store'}", *PRICED])
    store = ArtifactStore(recipe.store.root)
    return recipe, store, store.local_dir(run_step(store, SOURCES, recipe).ref)


def _cache_an_answer(recipe, cache_url: str, sources: Path) -> None:
    """The first assistant job's answer in the request cache at `cache_url`: 32 prompt and 40 completion tokens."""
    job = next(iter(orca1_fanout(recipe, sources).jobs()))
    writer = RequestCache(cache_url).writer("test")
    writer.add({"request_id": call_id(job, recipe.teachers.assistant, []), "teacher_model": "gpt-3.5-turbo",
                "response": "It is 4.", "finish_reason": "stop", "prompt_tokens": 32, "completion_tokens": 40,
                "cost_usd": 0.0, "latency_ms": 500.0, "attempts": 1, "status": "ok", "created_at": now_iso()})
    writer.flush()


def test_priced_dollars_follow_the_token_counts_net_of_the_request_cache(sources_only):
    recipe, store, sources = sources_only
    plan = make_plan(recipe, ["traces-orca1", "traces-orca2"])
    assistant = plan.teachers[0]
    assert (assistant.role, assistant.requests, assistant.cached) == ("assistant", 160, 0)
    assert assistant.prompt_basis == "tiktoken cl100k_base" and assistant.prompt_tokens == 12_563
    assert assistant.completion_basis == "max_tokens (upper bound)" and assistant.completion_tokens == 160 * 100
    assert assistant.usd == pytest.approx(12_563 / 1000 * 0.0015 + 16_000 / 1000 * 0.002)  # $0.0508445
    strong = plan.teachers[1]  # the oracle: its own token count, free
    assert (strong.role, strong.requests, strong.prompt_tokens, strong.usd) == ("strong", 78, 5_318, 0.0)
    assert plan.teachers[2].note == ESTIMATED_STRATEGIES  # sources built, strategies not

    # One answer in the request cache: that request costs nothing, and its length replaces max_tokens.
    _cache_an_answer(recipe, store.url("requests"), sources)
    assistant = make_plan(recipe, ["traces-orca1"]).teachers[0]
    assert (assistant.requests, assistant.cached, assistant.prompt_tokens) == (159, 1, 12_563 - 32)
    assert assistant.completion_basis == "mean of 1 cached answers" and assistant.completion_tokens == 159 * 40
    assert assistant.usd == pytest.approx(12_531 / 1000 * 0.0015 + 6_360 / 1000 * 0.002)  # $0.0315165
    assert assistant.hours == pytest.approx(159 * 0.5 / 64 / 3600)  # latency-bound: 64 in flight


def test_a_store_on_s3_plans_as_the_same_store_on_disk(sources_only, s3_root):
    recipe, store, sources = sources_only
    remote = load_recipe("smoke", [f"store.root={s3_root}", *PRICED])
    s3 = ArtifactStore(s3_root)
    for r, st in ((recipe, store), (remote, s3)):
        _cache_an_answer(r, st.url("requests"), sources)
    # Sources not built on S3 yet: the estimate takes its token means from the cached answer.
    assistant = make_plan(remote, ["traces-orca1"]).teachers[0]
    assert (assistant.note, assistant.requests, assistant.prompt_tokens, assistant.completion_tokens) == (
        ESTIMATED, 160, 160 * 32, 160 * 40)
    assert (assistant.prompt_basis, assistant.completion_basis) == ("mean prompt of 1 cached answers",
                                                                    "mean of 1 cached answers")
    # Sources built: the fan-out's own jobs, resolved against the cache on S3, as on disk.
    run_step(s3, SOURCES, remote)
    local, on_s3 = (make_plan(r, ["traces-orca1", "traces-orca2"]) for r in (recipe, remote))
    assert (on_s3.teachers[0].requests, on_s3.teachers[0].cached) == (159, 1)
    assert [dataclasses.asdict(t) for t in on_s3.teachers] == [dataclasses.asdict(t) for t in local.teachers]
    assert (on_s3.requests, on_s3.usd) == (local.requests, local.usd)


# One model serves both roles: the strong teacher is the assistant's endpoint (same kind, model, host and settings).
ONE_MODEL = ["prompts.strong_fraction=1.0", "teachers.strong.kind=openai", "teachers.strong.model=gpt-3.5-turbo",
             "teachers.strong.price_prompt_per_1k=0.0015", "teachers.strong.price_completion_per_1k=0.002",
             "teachers.strong.max_tokens=100", "teachers.strong.temperature=0.7", "teachers.strong.top_p=0.95"]


def test_a_request_both_roles_share_is_planned_once(tmp_path):
    recipe = load_recipe("smoke", [f"store.root={tmp_path / 'store'}", *PRICED, *ONE_MODEL])
    # Every Orca 1 row goes to both roles with the same request: the fan-out sends it once (the assistant's).
    estimated = make_plan(recipe, ["traces-orca1"])
    assert [(t.role, t.requests, t.shared) for t in estimated.teachers] == [("assistant", 160, 0), ("strong", 0, 160)]
    assert estimated.requests == 160 and estimated.teachers[1].usd == 0
    store = ArtifactStore(recipe.store.root)
    run_step(store, SOURCES, recipe)
    plan = make_plan(recipe, ["traces-orca1"])
    assert [(t.role, t.requests, t.shared) for t in plan.teachers] == [("assistant", 160, 0), ("strong", 0, 160)]
    assert plan.requests == 160 and plan.teachers[0].prompt_tokens == 12_563 and plan.teachers[1].prompt_tokens == 0
    assert plan.usd == pytest.approx(12_563 / 1000 * 0.0015 + 16_000 / 1000 * 0.002)  # as with the assistant alone
    assert "| traces-orca1 | strong | gpt-3.5-turbo | 0 | 0 (+160 shared) |" in markdown(plan)


def test_a_budget_below_the_plan_is_named_and_the_run_refuses_to_start(sources_only):
    recipe, store, _ = sources_only
    over = ["--recipe", "smoke", "--set", f"store.root={recipe.store.root}", *(a for s in PRICED for a in ("--set", s)),
            "--set", "teachers.max_cost_usd=0.01"]
    planned = runner.invoke(app, ["plan", *over])
    assert planned.exit_code == 1, planned.output
    assert "over budget" in planned.stderr and "teachers.max_cost_usd = $0.01" in planned.stderr
    assert "assistant: 160 requests, $0.05" in planned.stdout
    refused = runner.invoke(app, ["run", *over])
    assert refused.exit_code == 1 and "refused" in refused.output and "teachers.max_cost_usd" in refused.output
    assert [p.name for p in Path(recipe.store.root).iterdir() if not p.name.startswith(".")] == ["sources"]
    enough = runner.invoke(app, ["plan", *over[:-1], "teachers.max_cost_usd=1", "--json"])
    assert enough.exit_code == 0 and json.loads(enough.stdout)["totals"]["over_budget"] is False


# -- on a store where the smoke pipeline has run -----------------------------------------------------
@pytest.fixture(scope="module")
def warm(smoke_store):
    """The session's smoke store after a pipeline run (test_flow's run: all Cached here), inside a Prefect API."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import orca_pipeline

    overrides = [f"store.root={smoke_store}", *KEYED]
    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCA_FAKE_TEACHER_KEY", FAKE_KEY)
        orca_pipeline(recipe="smoke", overrides=overrides)
        yield overrides


def test_after_a_run_every_step_hits_and_nothing_is_planned(warm):
    plan = make_plan(load_recipe("smoke", warm))
    assert [s.status for s in plan.steps] == ["hit"] * 19
    assert plan.requests == 0 and plan.usd == 0 and not plan.teachers
    shown = runner.invoke(app, ["plan", "--recipe", "smoke", *(a for s in warm for a in ("--set", s)), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["totals"] == {
        "misses": 0, "requests": 0, "usd": 0.0, "teacher_hours": 0.0, "over_budget": False}


def test_a_changed_eval_setting_misses_only_the_evaluations(warm):
    plan = make_plan(load_recipe("smoke", [*warm, "eval.max_new_tokens=32"]))
    misses = {s.step: s for s in plan.steps if s.status == "miss"}
    assert set(misses) == EVALS | {"report"}
    assert misses["eval-orca2"].why == "changed: eval.max_new_tokens"
    assert {misses[e].evaluation.prompts for e in EVALS} == {80} and plan.requests == 0


def test_a_dry_run_publishes_the_plan_and_builds_nothing(warm, smoke_store):
    from prefect.client.orchestration import get_client

    from flows.pipeline import orca_evaluate, orca_pipeline

    before = sorted(p.relative_to(smoke_store) for p in smoke_store.rglob("manifest.json"))
    planned = orca_pipeline(recipe="smoke", overrides=[*warm, "eval.max_new_tokens=32"], dry_run=True)
    part = orca_evaluate(recipe="smoke", overrides=[*warm, "eval.max_new_tokens=32"], dry_run=True)
    assert sorted(p.relative_to(smoke_store) for p in smoke_store.rglob("manifest.json")) == before
    assert {s["step"] for s in planned["steps"] if s["status"] == "miss"} == EVALS | {"report"}
    assert [s["step"] for s in part["steps"]] == ["eval-base", "eval-flan", "eval-orca1", "eval-orca2", "report"]
    json.dumps(planned)  # what the flow returns is plain JSON
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    page = artifacts["orca-pipeline-plan"].data
    assert "| eval-orca2 | MISS | changed: eval.max_new_tokens |" in page and "| sources | HIT |" in page
    assert "orca-evaluate-plan" in artifacts


def test_a_flow_over_budget_is_cancelled_before_its_first_step(warm, smoke_store):
    from flows.pipeline import orca_generate

    before = sorted(p.relative_to(smoke_store) for p in smoke_store.rglob("manifest.json"))
    state = orca_generate(recipe="smoke", overrides=[*warm, *PRICED, "teachers.max_cost_usd=0.01"], return_state=True)
    assert state.is_cancelled() and "over teachers.max_cost_usd = $0.01" in state.message  # not retried
    assert sorted(p.relative_to(smoke_store) for p in smoke_store.rglob("manifest.json")) == before


def test_prompt_counters_by_endpoint_kind_never_download():
    from orca_core.recipe.models import TeacherEndpoint
    from orca_core.teacher.tokens import prompt_counter

    hello = [{"role": "user", "content": "hello world"}]
    openai = prompt_counter(TeacherEndpoint(kind="openai", model="gpt-4", rpm=10))
    assert openai.basis == "tiktoken cl100k_base" and openai.count(hello) == 3 + 1 + 2 + 3  # cookbook: per message, role, text, reply
    azure = prompt_counter(TeacherEndpoint(kind="azure", model="my-deployment", base_url="http://127.0.0.1:9",
                                           api_version="2024-06-01", rpm=10))
    assert azure.basis.startswith("tiktoken cl100k_base (approximately o200k_base") and azure.count(hello) == 9
    vllm = prompt_counter(TeacherEndpoint(kind="vllm", model="m", base_url="http://127.0.0.1:9/v1", rpm=10))
    assert vllm.basis == "chars/4 estimate" and vllm.count(hello) == 3 + 4  # ceil(11 / 4) + 4 a message


def test_a_control_is_planned_as_its_own_steps_keyed_as_the_control_recipe_runs_them(tmp_path):
    tiny = load_recipe("tiny", [f"store.root={tmp_path}"])
    steps = _by_step(make_plan(tiny))
    control = [name for name in steps if name.startswith("control/")]
    assert control == ["control/dataset-orca1", "control/train-orca1", "control/dataset-orca2", "control/train-orca2",
                       "control/eval-orca2"]  # what differs from tiny's own steps; list(steps)[-1] is the report
    assert list(steps)[-1] == "report" and all(steps[name].status == "miss" for name in control)
    budgets = [s.steps for s in tiny.curriculum.stages[1:]]
    assert [steps[f"{arm}train-{s}"].training.optimizer_steps for arm in ("", "control/") for s in ("orca1", "orca2")] \
        == budgets * 2  # the same step budgets in both arms
    twin = _by_step(make_plan(load_recipe("tiny-answers-only", [f"store.root={tmp_path}"])))
    assert {name: steps[name].key for name in control} == {f"control/{n}": twin[n].key for n in
                                                           ("dataset-orca1", "train-orca1", "dataset-orca2",
                                                            "train-orca2", "eval-orca2")}
    assert steps["train-flan"].key == twin["train-flan"].key and steps["train-orca1"].key != twin["train-orca1"].key
    listed = runner.invoke(app, ["plan", "--recipe", "tiny", "--set", f"store.root={tmp_path}"])
    assert listed.exit_code == 0 and "control/train-orca2" in listed.output
    with pytest.raises(ValueError, match=r"control: recipe tiny-answers-only's stages \['flan', 'orca1', 'orca2'\] "
                                         r"differ from tiny's \['flan', 'orca2'\]"):
        make_plan(load_recipe("tiny", [f"store.root={tmp_path}", "eval.models=[flan]",
                                       "curriculum.stages=[{name: flan, data: flan, steps: 1}, {name: orca2, data: orca2, steps: 1}]"]))
