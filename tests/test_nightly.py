"""nightly-eval: history per run, and a drop below the previous night's CI ends the run Failed, named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file, save_file

from flows.nightly import nightly_eval
from orca_core.nightly import history, newest_checkpoints
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
