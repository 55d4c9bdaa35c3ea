"""nightly-eval: history per run, and a paired drop from the previous night (CI below 0) ends the run Failed, named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file, save_file

from flows.nightly import nightly_eval
from orca_core.eval.evaluate import EXAMPLES_FILE, RESULTS_STEP
from orca_core.eval.metrics import summarize
from orca_core.nightly import history, newest_checkpoints, record, regressions, results_examples
from orca_core.store import ArtifactStore


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _benchmark_of_its_answers(checkpoint: Path, folder: Path, n: int = 40) -> Path:
    """A GSM8K-schema benchmark whose gold is the checkpoint's own greedy answer to each question.

    The tiny checkpoint has the answer format but not the arithmetic; scored against its own answers it
    is at 100 %, so any change in what it generates shows as a drop: what a nightly check is for.
    """
    from orca_core.eval.backends import GenerationSettings, chat_prompts, generate_jobs
    from orca_core.eval.score import _number
    from orca_core.prompts import chat

    questions = [f"What is {7 * i % 100} + {13 * i % 100}?" for i in range(n)]
    prompts = chat_prompts(checkpoint, [chat("", q) for q in questions])
    outputs = generate_jobs(checkpoint, {"q": prompts}, folder.parent / "work", GenerationSettings(backend="hf", max_new_tokens=24))["q"]
    rows = [{"question": q, "answer": f"#### {strict}"} for q, o in zip(questions, outputs)
            if (strict := _number(o.text)[0]) is not None]
    assert len(rows) >= n // 2
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _broken(src: Path, dst: Path) -> Path:
    """The same model with its attention output projections zeroed: the kind of export bug a nightly catches."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name in weights:
        if "o_proj" in name or "down_proj" in name:
            weights[name].zero_()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nightly_keeps_history_and_fails_on_a_regression_naming_it(tiny_checkpoint, tmp_path):
    overrides = [f"store.root={tmp_path / 'store'}", "eval.backend=hf", "eval.system_messages=[empty]",
                 "eval.max_new_tokens=24", "eval.limit=null", "eval.suite=custom",
                 f"eval.benchmarks=[{{name: gsm8k, path: {_benchmark_of_its_answers(tiny_checkpoint, tmp_path / 'answers')}}}]"]
    good = nightly_eval(recipe="smoke", overrides=overrides, checkpoints=[f"orca2={tiny_checkpoint}"], return_state=True)
    assert good.is_completed(), good.message
    rows = good.result()
    assert [(r["model"], r["benchmark"], r["system_message"]) for r in rows] == [("orca2", "gsm8k", "empty")]
    assert rows[0]["n"] >= 20 and rows[0]["accuracy"] == 1.0
    # The same weights again: no regression (and the evaluation itself comes from the store).
    again = nightly_eval(recipe="smoke", overrides=overrides, checkpoints=[f"orca2={tiny_checkpoint}"], return_state=True)
    assert again.is_completed() and again.result()[0]["accuracy"] == rows[0]["accuracy"]

    broken = _broken(tiny_checkpoint, tmp_path / "exports" / "orca2-broken")
    bad = nightly_eval(recipe="smoke", overrides=overrides, checkpoints=[f"orca2={broken}"], return_state=True)
    assert bad.is_failed()
    assert "1 regression(s): orca2/gsm8k/empty" in bad.message
    store = ArtifactStore(str(tmp_path / "store"))
    records = history(store)
    assert len(records) == 3 and records[-1]["results"][0]["accuracy"] < rows[0]["low"]
    # Each record names its per-example artifact: the same weights scored again share it, the broken ones do not.
    keys = [rec["results"][0]["results_key"] for rec in records]
    assert keys[0] == keys[1] != keys[2] and all(store.check(RESULTS_STEP, key) == "ok" for key in keys)
    assert "(paired difference -" in bad.message
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    report = artifacts["nightly-eval-regressions"].data
    assert str(broken) in report and "gsm8k" in report and "orca2" in report
    assert f"{100 * rows[0]['accuracy']:.1f}%" in report and f"{100 * records[-1]['results'][0]['accuracy']:.1f}%" in report


def test_newest_checkpoints_are_the_latest_artifact_of_each_stage(smoke, tmp_path):
    store = ArtifactStore(smoke.store.root)
    assert newest_checkpoints(store) == {}
    for stage, keys in (("flan", ["a" * 64, "b" * 64]), ("orca2", ["c" * 64])):
        for i, key in enumerate(keys):
            with store.staging(f"train-{stage}", key) as staged:
                (staged / "model.safetensors").write_bytes(b"w")
                store.publish(f"train-{stage}", key, {"step": f"train-{stage}"}, staged)
            manifest = Path(store.url(f"train-{stage}", key, "manifest.json"))
            data = json.loads(manifest.read_text())
            data["created_at"] = f"2026-11-2{i}T00:00:00+00:00"
            manifest.write_text(json.dumps(data))
    assert newest_checkpoints(store) == {"flan": Path(store.url("train-flan", "b" * 64)),
                                         "orca2": Path(store.url("train-orca2", "c" * 64))}


def _answers(right: list[bool], benchmark: str = "gsm8k", system: str = "empty") -> pd.DataFrame:
    return pd.DataFrame({"benchmark": benchmark, "task": benchmark, "id": [str(i) for i in range(len(right))],
                         "system_message": system, "correct_flexible": right})


def _row(model: str, key: str | None, right: list[bool], checkpoint: str) -> dict:
    accuracy = sum(right) / len(right)
    return {"model": model, "checkpoint": checkpoint, "benchmark": "gsm8k", "system_message": "empty",
            "n": len(right), "accuracy": accuracy, "low": accuracy - 0.1, "high": accuracy + 0.1, "results_key": key}


def test_a_regression_is_a_paired_difference_with_a_ci_below_zero():
    last_night = [True] * 60 + [False] * 40
    answers = {
        "flan-old": last_night,
        "flan-new": [True] * 55 + [False] * 45,  # 55% is inside last night's 60% CI; on the same items, 5 lost, none won
        "orca1-old": last_night, "orca1-new": [False] * 60 + [True] * 20 + [False] * 20,  # 20%, other items: a drop
        "orca2-old": last_night, "orca2-new": [True] * 58 + [False, True] + [False] * 40,  # one lost, one won
        "orca3-new": last_night[:90],  # ten items fewer: paired on the 90 both answered
        "orca3-old": last_night,
    }
    loaded = {key: _answers(right) for key, right in answers.items()}

    def examples(key: str) -> pd.DataFrame:
        if key not in loaded:
            raise LookupError(f"{RESULTS_STEP}/{key} is missing")
        return loaded[key]

    earlier = [{"results": [_row(m, f"{m}-old", last_night, f"/exports/{m}-1") for m in ("flan", "orca1", "orca2", "orca3")]
                + [_row("base", None, last_night, "/exports/base-1"), _row("orca4", "gone", last_night, "/x")]}]
    current = [_row(m, f"{m}-new", answers[f"{m}-new"], f"/exports/{m}-2") for m in ("flan", "orca1", "orca2", "orca3")]
    current += [_row("base", "base-new", last_night, "/exports/base-2"), _row("orca4", "orca3-old", last_night, "/y"),
                _row("orca5", "orca3-old", last_night, "/z")]  # orca5: no earlier result, nothing to compare
    found, notes = regressions(current, earlier, examples, samples=1000, seed=0)
    assert [r.model for r in found] == ["flan", "orca1"]
    flan = found[0]
    assert (flan.previous, flan.now, flan.pairs, flan.checkpoint, flan.previous_checkpoint) == (
        0.6, 0.55, 100, "/exports/flan-2", "/exports/flan-1")
    assert [flan.difference, flan.low, flan.high] == pytest.approx([-0.05, -0.1, -0.01])  # golden, seed 0
    assert flan.now >= earlier[0]["results"][0]["low"]  # inside last night's CI: comparing intervals would miss it
    assert found[1].difference == pytest.approx(-0.4) and found[1].high < 0
    assert notes == [
        "orca3/gsm8k/empty: paired on the 90 items both answered (0 only now, 10 only in the previous result)",
        "base/gsm8k/empty: the previous record has no per-example results key (written by an older version): not compared",
        f"orca4/gsm8k/empty: not compared: {RESULTS_STEP}/gone is missing"]
    assert flan.line() == ("| flan | gsm8k | empty | `/exports/flan-2` | 60.0% (`/exports/flan-1`) | 55.0% | "
                           "-5.0 [-10.0, -1.0] | 100 |")


def test_history_rows_name_their_results_and_the_results_are_verified_on_load(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    frame = _answers([True, False, True])
    rows = pd.DataFrame({**{c: frame[c] for c in frame.columns}, "correct_strict": frame["correct_flexible"],
                         "format_ok": True, "finish_reason": "stop", "output_tokens": 3})
    summary = summarize(rows, samples=100)
    with pytest.raises(ValueError, match=r"no eval-results artifact for gsm8k.empty; it has \['gsm8k.cautious'\]"):
        record(summary, "orca2", "/exports/orca2", "d" * 64, {"gsm8k.cautious": "k"})
    assert record(summary, "orca2", "/exports/orca2", "d" * 64, {"gsm8k.empty": "e" * 64})[0]["results_key"] == "e" * 64
    key = "e" * 64
    with store.staging(RESULTS_STEP, key) as staged:
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), staged / EXAMPLES_FILE)
        store.publish(RESULTS_STEP, key, {"step": RESULTS_STEP}, staged)
    loaded = results_examples(store, key)
    assert loaded["correct_flexible"].tolist() == [True, False, True] and "output_tokens" not in loaded
    path = Path(store.url(RESULTS_STEP, key, EXAMPLES_FILE))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(LookupError, match=f"{RESULTS_STEP}/{key} is missing .* or failed verification"):
        results_examples(store, key)
