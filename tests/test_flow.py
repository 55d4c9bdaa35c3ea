"""The pipeline flow on a real Prefect API: second run Cached, corruption rebuilt, retries with backoff."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import orca_pipeline
from orca_core.recipe import load_recipe, recipe_hash
from orca_core.steps import Step
from tasks.step import call_step, prefect_step


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_run_states(name_prefix: str) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name_prefix)))
    return [run.state.name for run in sorted(runs, key=lambda r: r.expected_start_time)]


FAKE_KEY = "sk-fake-orca-0123456789abcdef"
DAG = ["sources", "strategies", "traces-orca1", "traces-orca2", "filtered-orca1", "filtered-orca2", "tokenizer",
       "base-model", "dataset-flan", "train-flan", "dataset-orca1", "train-orca1", "dataset-orca2", "train-orca2",
       "eval-base", "eval-flan", "eval-orca1", "eval-orca2", "report"]


@pytest.fixture(scope="module")
def store(smoke_store) -> Path:
    return smoke_store


KEYED = ["teachers.assistant.api_key_env=ORCA_FAKE_TEACHER_KEY", "teachers.strong.api_key_env=ORCA_FAKE_TEACHER_KEY"]


def test_second_run_is_cached_corruption_is_rebuilt_and_the_key_stays_secret(store, monkeypatch, capfd):
    monkeypatch.setenv("ORCA_FAKE_TEACHER_KEY", FAKE_KEY)  # the oracle requires it; the client sends it
    tmp_path = store.parent
    overrides = [f"store.root={store}", *KEYED]
    first = orca_pipeline(recipe="smoke", overrides=overrides)
    second = orca_pipeline(recipe="smoke", overrides=overrides)
    n = len(DAG)
    assert [o["step"] for o in first] == DAG
    assert [o["state"] for o in first] == ["Completed"] * n and [o["state"] for o in second] == ["Cached"] * n
    assert [o["key"] for o in first] == [o["key"] for o in second]
    assert first[0]["rows"] == {"train": 160, "heldout": 40}
    assert first[2]["rows"]["traces"] > 160 and 0 < first[4]["rows"]["kept"] <= first[2]["rows"]["traces"]
    # Along the DAG, two at a time: both teachers' fan-outs overlap; a stage is scored once it is trained.
    ran = {o["step"]: o for o in first}
    assert _overlap(ran["strategies"], ran["traces-orca1"])
    assert all(ran[f"eval-{s}"]["start"] >= ran[f"train-{s}"]["end"] for s in ("flan", "orca1", "orca2"))
    assert all(ran[name]["start"] >= ran[up]["end"] for name, up in (("traces-orca2", "strategies"),
                                                                       ("tokenizer", "filtered-orca2"),
                                                                       ("report", "eval-orca2")))
    artifact = Path(first[0]["artifact"])
    assert (artifact / "train.parquet").is_file() and (artifact / "manifest.json").is_file()
    # Prefect's own records say the same (what the UI shows).
    assert _task_run_states(f"sources-{first[0]['key'][:12]}")[-2:] == ["Completed", "Cached"]
    # Prefect result records live in the store, next to the artifacts.
    assert any((tmp_path / "store" / ".prefect-results").iterdir())

    # The key never reaches a file of the store (Parquet, manifests, Prefect results) or a log.
    for path in (tmp_path / "store").rglob("*"):
        assert not path.is_file() or FAKE_KEY.encode() not in path.read_bytes(), path
    with get_client(sync_client=True) as client:
        logs = client.read_logs(limit=200)
    assert logs and not any(FAKE_KEY in log.message for log in logs)
    assert FAKE_KEY not in "".join(capfd.readouterr())

    # Corrupt the sources artifact: the Prefect record must not hand it out again, and what was built
    # from it is rebuilt (the teacher answers come back from the request cache, not the teacher).
    manifest = json.loads((artifact / "manifest.json").read_text())
    (artifact / "train.parquet").write_bytes(b"\0" * manifest["files"]["train.parquet"]["size"])
    third = orca_pipeline(recipe="smoke", overrides=overrides)
    assert third[0]["state"] == "Completed" and third[0]["key"] == first[0]["key"]
    assert len(list((tmp_path / "store" / ".corrupt").iterdir())) == 1
    assert [o["state"] for o in orca_pipeline(recipe="smoke", overrides=overrides)] == ["Cached"] * n
    # Three trained stages, each a loadable HF folder without the optimizer state (opt-in: train.keep_training_state).
    for o in first:
        if o["step"].startswith("train-"):
            assert (Path(o["artifact"]) / "model.safetensors").is_file()
            assert not (Path(o["artifact"]) / "training_state").exists()


def test_every_checkpoint_is_scored_and_the_report_is_written_and_published(store, monkeypatch):
    monkeypatch.setenv("ORCA_FAKE_TEACHER_KEY", FAKE_KEY)
    outcomes = {o["step"]: o for o in orca_pipeline(recipe="smoke", overrides=[f"store.root={store}", *KEYED])}
    for model in ("base", "flan", "orca1", "orca2"):  # 8 families x 5 held-out rows x 2 system messages
        assert outcomes[f"eval-{model}"]["rows"] == {"examples": 80}
        summary = pq.read_table(Path(outcomes[f"eval-{model}"]["artifact"]) / "summary.parquet").to_pandas()
        macro = summary[summary.task == "(all)"]
        assert sorted(macro.system_message) == ["cautious", "empty"] and set(macro.n) == {40}
        assert ((macro.low_flexible <= macro.accuracy_flexible) & (macro.accuracy_flexible <= macro.high_flexible)).all()
    report = Path(outcomes["report"]["artifact"])
    for name in ("report.md", "report.html", "accuracy.png", "loss.png", "summary.csv"):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    flexible = text[text.index("## Accuracy, flexible extraction"):]
    table = flexible[flexible.index("| model |"):].split("\n\n")[0].splitlines()
    assert table[0] == "| model | procedural-heldout · empty | procedural-heldout · cautious |"
    assert [row.split(" | ")[0] for row in table[2:]] == ["| base", "| flan", "| orca1", "| orca2"]
    # The same table and the report are Prefect artifacts (what the dashboard shows).
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    assert {"orca-eval-table", "orca-eval-report", "orca-eval-report-html"} <= set(artifacts)
    rows = json.loads(artifacts["orca-eval-table"].data)
    assert [r["model"] for r in rows] == ["base", "flan", "orca1", "orca2"]
    assert "procedural-heldout · cautious" in rows[0]


def test_the_report_states_the_findings_with_seed_recipe_hash_and_example_counts(store, monkeypatch):
    """The structure of the findings on the smoke run (the ordering itself needs the full tiny run)."""
    monkeypatch.setenv("ORCA_FAKE_TEACHER_KEY", FAKE_KEY)
    outcomes = {o["step"]: o for o in orca_pipeline(recipe="smoke", overrides=[f"store.root={store}", *KEYED])}
    recipe = load_recipe("smoke", [f"store.root={store}", *KEYED])
    report = Path(outcomes["report"]["artifact"])
    found = json.loads((report / "findings.json").read_text())
    assert found["seed"] == recipe.seed and found["recipe_hash"] == recipe_hash(recipe)
    assert found["headline_system_message"] == recipe.eval.headline_system_message
    assert [r["model"] for r in found["curriculum"]] == ["flan", "orca1", "orca2"]
    assert all(r["n"] == 40 and r["tasks"] == 8 and r["low"] <= r["accuracy"] <= r["high"] for r in found["curriculum"])
    assert [r["vs_previous"] for r in found["curriculum"]][0] == ""
    assert all(r["vs_previous"] in ("above", "no difference", "below") for r in found["curriculum"][1:])
    assert found["ordering_holds"] == all(r["vs_previous"] == "above" for r in found["curriculum"][1:])
    for prev, r in zip(found["curriculum"], found["curriculum"][1:]):  # paired: the difference of the same items
        assert r["difference_low"] <= r["difference"] <= r["difference_high"]
        assert abs(r["difference"] - (r["accuracy"] - prev["accuracy"])) < 1e-9
    usage = found["strategy_usage"]
    assert usage["model"] == "orca2" and usage["families"] == 8 and usage["n"] == 40
    assert 0 <= usage["follows"] <= 1 and 1 <= usage["student_strategies"] <= 6
    assert (report / "findings.png").stat().st_size > 10_000
    text = (report / "report.md").read_text()
    one = text[text.index("## Finding 1"):text.index("## Finding 2")]
    assert ("**Holds**" in one) == found["ordering_holds"] and ("**Does not hold**" in one) != found["ordering_holds"]
    assert f"Seed {recipe.seed}, recipe smoke (hash {recipe_hash(recipe)[:12]})" in one
    assert "40 held-out examples per stage over 8 tasks" in one
    table = one[one.index("| model |"):].split("\n\n")[0].splitlines()
    assert table[0] == ("| model | accuracy % [95% CI] | examples | tasks | difference vs previous, pts [95% CI] "
                        "| vs previous |")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| base", "| flan", "| orca1", "| orca2"]
    assert all(row.split(" | ")[2:4] == ["40", "8"] for row in table[2:])
    two = text[text.index("## Finding 2"):text.index("## Finding 3")]
    assert "orca compare smoke " in two and "control" not in found  # smoke names no control
    three = text[text.index("## Finding 3"):]
    assert ("**Holds**" in three) == usage["holds"] == (usage["families_following"] == usage["families"])
    families = three[three.index("| task family |"):].split("\n\n")[0].splitlines()[2:]
    assert len(families) == 8 and all(row.endswith("| 5 |") for row in families)
    assert [v["number"] for v in found["verdicts"]] == [1, 3]
    html = (report / "report.html").read_text()
    assert "Finding 1: each curriculum stage improves on the last" in html and "findings.png" in html


def test_a_control_trains_beside_the_recipe_and_the_report_calls_all_three_findings(store, monkeypatch):
    """smoke with tiny's answers-only control: the control's own steps run as DAG nodes beside smoke's (the
    steps it shares are smoke's, Cached), and the report calls finding 2 on both arms' tokens."""
    monkeypatch.setenv("ORCA_FAKE_TEACHER_KEY", FAKE_KEY)
    overrides = [f"store.root={store}", *KEYED, "control=tiny-answers-only"]
    outcomes = {o["step"]: o for o in orca_pipeline(recipe="smoke", overrides=overrides)}
    control = ["control/dataset-orca1", "control/train-orca1", "control/dataset-orca2", "control/train-orca2",
               "control/eval-orca2"]
    assert list(outcomes) == [*DAG[:-1], *control, "report"]  # shared: sources ... train-flan, eval-flan
    assert all(outcomes[s]["state"] == "Completed" for s in control)
    assert outcomes["control/train-orca1"]["start"] >= outcomes["train-orca2"]["end"]  # one training at a time
    assert "/train-orca2/" in outcomes["control/train-orca2"]["artifact"]  # stored as the control's own step
    report = Path(outcomes["report"]["artifact"])
    found = json.loads((report / "findings.json").read_text())
    result = found["control"]
    assert result["main"] == "orca2" and result["control"] == "tiny-answers-only/orca2" and result["pairs"] == 40
    assert len(result["by_task"]) == 8 and all(t["n"] == 5 for t in result["by_task"])
    assert result["difference_low"] <= result["difference"] <= result["difference_high"]
    budget = result["budget"]
    for arm, prefix in (("main", ""), ("control", "control/")):  # both arms' tokens: their metrics, summed
        for stage in ("flan", "orca1", "orca2"):
            node = outcomes.get(f"{prefix}train-{stage}") or outcomes[f"train-{stage}"]  # train-flan: shared
            metrics = pq.read_table(Path(node["artifact"]) / "metrics.parquet").to_pandas()
            row = next(r for r in budget["stages"] if r["arm"] == arm and r["stage"] == stage)
            assert row == {"arm": arm, "stage": stage, "steps": len(metrics), "tokens": int(metrics["tokens"].sum()),
                           "label_tokens": int(metrics["label_tokens"].sum())}
    flan = [r for r in budget["stages"] if r["stage"] == "flan"]
    assert flan[0] | {"arm": ""} == flan[1] | {"arm": ""}  # the same train-flan artifact
    main, answers = budget["main"], budget["control"]
    assert budget["difference"] == pytest.approx(answers["tokens"] / main["tokens"] - 1)
    assert answers["label_tokens"] < main["label_tokens"]  # answers only: far fewer tokens to learn from
    # smoke trains one epoch a stage: the arms' budgets differ, and the finding must say so
    assert budget["matched"] == (abs(budget["difference"]) <= 0.02) is False
    assert [v["number"] for v in found["verdicts"]] == [1, 2, 3]
    assert found["verdicts"][1]["holds"] == result["holds"] == (result["vs"] == "above" and budget["difference"] > 0)
    text = (report / "report.md").read_text()
    two = text[text.index("## Finding 2"):text.index("## Finding 3")]
    assert "the budgets differ by more than 2%" in two and f"{main['tokens']:,} (explanations)" in two
    assert "| all (macro) | 40 |" in two and two.count("| main |") == two.count("| control |") == 4  # 3 stages + total


def test_a_changed_field_reruns_only_the_steps_that_read_it(store, monkeypatch):
    monkeypatch.setenv("ORCA_FAKE_TEACHER_KEY", FAKE_KEY)
    overrides = [f"store.root={store}", *KEYED]
    base = orca_pipeline(recipe="smoke", overrides=overrides)  # cached by the test above
    longer = {o["step"]: o for o in orca_pipeline(recipe="smoke", overrides=[*overrides, "curriculum.stages[2].epochs=2"])}
    unrelated = orca_pipeline(recipe="smoke", overrides=[*overrides, "eval.batch_size=7", "train.checkpoint_every=7"])
    # Only the last stage reads its epochs: it, its evaluation and the report rerun; the rest is Cached.
    rerun = {"train-orca2", "eval-orca2", "report"}
    assert {name for name, o in longer.items() if o["state"] == "Completed"} == rerun
    assert all(o["state"] == "Cached" for name, o in longer.items() if name not in rerun)
    assert longer["train-orca2"]["rows"]["steps"] > {o["step"]: o for o in base}["train-orca2"]["rows"]["steps"]
    assert [o["state"] for o in unrelated] == ["Cached"] * len(DAG)


def test_failing_step_retries_with_backoff_then_succeeds(tmp_path):
    marker = tmp_path / "attempts.txt"

    def flaky_build(recipe, upstream, out, ctx):
        attempts = int(marker.read_text()) + 1 if marker.exists() else 1
        marker.write_text(str(attempts))
        if attempts < 3:
            raise ConnectionError(f"transient failure {attempts}")
        (out / "ok.txt").write_text("done")
        return {"ok": 1}, {"attempts": attempts}

    step = Step("flaky", version=1, reads=lambda r: {"seed": r.seed, "store": "flaky-test"}, build=flaky_build)
    flaky_task = prefect_step(step)
    recipe = load_recipe("smoke", [f"store.root={tmp_path / 'store'}", "prefect.retries=2",
                                   "prefect.retry_delay_s=0.5", "prefect.retry_jitter=0"])

    @flow
    def run_flaky():
        return call_step(flaky_task, step, recipe)

    outcome = run_flaky()
    assert outcome.state == "Completed" and outcome.rows == {"ok": 1} and marker.read_text() == "3"
    with get_client(sync_client=True) as client:
        run = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="flaky-")))[0]
        history = client.read_task_run_states(run.id)
    names = [s.name for s in history]
    assert names.count("AwaitingRetry") == 2 and names[-1] == "Completed", names
    assert run.run_count == 3
    # Exponential backoff from the recipe: 0.5 s, then 1.0 s.
    delays = [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in history if s.name == "AwaitingRetry"]
    assert delays == pytest.approx([0.5, 1.0], abs=0.05)


def test_lineage_walks_from_the_report_to_the_sources_and_names_the_recipe_that_rebuilds_it(store, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from orca_core.steps import plan_key, steps_for

    monkeypatch.setenv("ORCA_FAKE_TEACHER_KEY", FAKE_KEY)
    outcomes = {o["step"]: o for o in orca_pipeline(recipe="smoke", overrides=[f"store.root={store}", *KEYED])}
    shown = CliRunner().invoke(app, ["lineage", outcomes["report"]["artifact"]])
    assert shown.exit_code == 0, shown.output
    text = shown.output
    for step in ("report", "eval-orca2", "train-orca2", "train-orca1", "train-flan", "base-model", "dataset-orca2",
                 "filtered-orca2", "traces-orca2", "traces-orca1", "strategies", "tokenizer", "sources"):
        assert f"{step}/{outcomes[step]['key'][:12]}" in text, step
    assert "strong teacher: oracle:oracle-strong" in text and "assistant teacher: oracle:oracle-assistant" in text
    assert "prompt set: " in text and "recipe: smoke " in text and "code: " in text
    # The saved recipe plans the very same keys: key.json + that recipe rebuild any artifact of the run.
    recipe_file = text.split("rebuild: orca run --recipe ")[1].split()[0]
    saved = load_recipe(recipe_file)
    assert all(plan_key(step, saved) == outcomes[name]["key"] for name, step in steps_for(saved).items())
    # By key prefix too; a bad reference is a clear error.
    by_key = CliRunner().invoke(app, ["lineage", outcomes["train-flan"]["key"][:10], "--store", str(store)])
    assert by_key.exit_code == 0 and by_key.output.startswith(f"train-flan/{outcomes['train-flan']['key'][:12]}")
    bad = CliRunner().invoke(app, ["lineage", "zz", "--store", str(store)])
    assert bad.exit_code == 2 and "key prefix of at least 8 hex digits" in bad.output


# -- steps along the DAG: independent ones overlap (prefect.max_concurrent_steps), dependents wait ----------------
def _sleeper(name: str, seconds: float, calls: Path, error: Exception | None = None) -> Step:
    """A step that sleeps, counts its calls in `calls/<name>`, then raises `error` or publishes one file."""

    def build(recipe, upstream, out, ctx):
        marker = calls / name
        marker.write_text(str(int(marker.read_text()) + 1 if marker.exists() else 1))
        time.sleep(seconds)
        if error is not None:
            raise error
        (out / "done.txt").write_text(name)
        return {"done": 1}, {}

    return Step(name, version=1, reads=lambda r: {"seed": r.seed, "test": f"dag-{name}"}, build=build)


def _run_dag(tmp_path: Path, steps: list[Step], needs: dict[str, tuple[str, ...]], *settings: str):
    from flows.steps import run_dag

    recipe = load_recipe("smoke", [f"store.root={tmp_path / 'store'}", "prefect.retry_delay_s=0.2",
                                   "prefect.retry_jitter=0", *settings])

    @flow
    def dag():
        return run_dag(recipe, steps, needs, summary_key="dag-summary")

    return dag()


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_independent_steps_overlap_dependents_wait_and_a_second_run_is_all_cached(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    # a and b are independent; c reads b (as an evaluation reads its stage); d reads a and c. Two at a time.
    steps = [_sleeper("a", 2.0, calls), _sleeper("b", 1.0, calls), _sleeper("c", 1.0, calls), _sleeper("d", 0.2, calls)]
    needs = {"a": (), "b": (), "c": ("b",), "d": ("a", "c")}
    rows = {r["step"]: r for r in _run_dag(tmp_path, steps, needs, "prefect.max_concurrent_steps=2")}
    assert [r["state"] for r in rows.values()] == ["Completed"] * 4
    assert _overlap(rows["a"], rows["b"]) and _overlap(rows["a"], rows["c"])  # c starts in b's slot while a runs
    assert rows["c"]["start"] >= rows["b"]["end"] and rows["d"]["start"] >= max(rows["a"]["end"], rows["c"]["end"])
    wall = rows["d"]["end"]
    assert wall < sum(r["seconds"] for r in rows.values()) - 1.5  # b and c ran beside a
    with get_client(sync_client=True) as client:
        summary = next(a for a in client.read_latest_artifacts() if a.key == "dag-summary").data
    assert "| a | Completed |" in summary and "wall " in summary and "s in steps" in summary
    assert summary.count("|#") + summary.count(" #") >= 4  # one bar per step

    again = _run_dag(tmp_path, steps, needs, "prefect.max_concurrent_steps=2")
    assert [r["state"] for r in again] == ["Cached"] * 4
    assert sorted(p.name for p in calls.iterdir()) == ["a", "b", "c", "d"]
    assert all((calls / n).read_text() == "1" for n in "abcd")  # built once each

    # One at a time: the run order, one step after the other.
    serial = {r["step"]: r for r in _run_dag(tmp_path / "serial", steps, needs, "prefect.max_concurrent_steps=1")}
    ends = [serial[n]["end"] for n in "abcd"]
    assert all(serial[n]["start"] >= prev for n, prev in zip("bcd", ends))


def test_a_failed_step_lets_independent_steps_finish_and_its_dependents_never_run(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    steps = [_sleeper("a", 0.1, calls, ValueError("a broke")), _sleeper("b", 1.0, calls), _sleeper("c", 0.1, calls),
             _sleeper("after-b", 0.1, calls)]
    needs = {"a": (), "b": (), "c": ("a",), "after-b": ("b",)}
    with pytest.raises(ValueError, match="a broke"):
        _run_dag(tmp_path, steps, needs, "prefect.retries=1")
    assert (calls / "a").read_text() == "2"  # retried once, as before
    assert (calls / "b").read_text() == "1" and (calls / "after-b").read_text() == "1"
    assert not (calls / "c").exists()
    with get_client(sync_client=True) as client:
        summary = next(a for a in client.read_latest_artifacts() if a.key == "dag-summary").data
    assert "| a | Failed | ValueError: a broke |" in summary
    assert "| c | NotReady | upstream a did not complete |" in summary and "| after-b | Completed |" in summary


def test_an_error_no_retry_can_fix_starts_nothing_more(tmp_path):
    from orca_core.teacher.client import FatalTeacherError

    calls = tmp_path / "calls"
    calls.mkdir()
    steps = [_sleeper("a", 0.1, calls, FatalTeacherError("key refused")), _sleeper("b", 1.0, calls),
             _sleeper("c", 0.1, calls), _sleeper("d", 0.1, calls)]
    needs = {"a": (), "b": (), "c": (), "d": ("b",)}
    with pytest.raises(FatalTeacherError, match="key refused"):
        _run_dag(tmp_path, steps, needs, "prefect.retries=2")
    assert (calls / "a").read_text() == "1"  # not retried
    assert (calls / "b").read_text() == "1"  # it was running: it ends (a thread cannot be stopped)
    assert not (calls / "c").exists() and not (calls / "d").exists()  # nothing starts after the error


def test_fanouts_to_a_real_endpoint_take_turns(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    steps = [_sleeper("strategies", 0.5, calls), _sleeper("traces-orca1", 0.5, calls), _sleeper("other", 0.5, calls)]
    endpoint = '{kind: vllm, base_url: "http://127.0.0.1:9/v1", model: m, rpm: 100}'
    rows = {r["step"]: r for r in _run_dag(tmp_path, steps, {s.name: () for s in steps},
                                           f"teachers.strong={endpoint}", "prefect.max_concurrent_steps=3")}
    # Each fan-out's gate holds the endpoint's limits on its own: never two at once; other steps still overlap.
    assert not _overlap(rows["strategies"], rows["traces-orca1"])
    assert _overlap(rows["strategies"], rows["other"])
