"""Evaluating a checkpoint: results keyed by content (never by path), resumed per benchmark, and after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from orca_core.eval.backends import GenerationSettings
from orca_core.eval.benchmarks import BenchmarkSpec
from orca_core.eval.evaluate import EXAMPLES_FILE, RESULTS_STEP, checkpoint_digest, evaluate_checkpoint, plan_jobs
from orca_core.store import ArtifactStore

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
HF = GenerationSettings(backend="hf", max_new_tokens=24, batch_size=8)


def specs() -> list[BenchmarkSpec]:
    return [BenchmarkSpec(name="gsm8k", path=str(FIXTURES / "gsm8k")),
            BenchmarkSpec(name="arc-challenge", path=str(FIXTURES / "arc"))]


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _perturb(folder: Path) -> None:
    """New weights, same everything else: one embedding row changes."""
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "embed" in k)
    weights[name][0, 0] += 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_digest_follows_the_weights_not_the_path(tiny_checkpoint, tmp_path):
    a = _copy(tiny_checkpoint, tmp_path / "a")
    b = _copy(tiny_checkpoint, tmp_path / "elsewhere" / "b")
    (b / "training_state").mkdir()
    (b / "training_state" / "optim.pt").write_bytes(b"resume state does not change outputs")
    assert checkpoint_digest(a) == checkpoint_digest(b)
    _perturb(b)
    assert checkpoint_digest(a) != checkpoint_digest(b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        checkpoint_digest(tmp_path / "empty")


def test_results_are_keyed_by_content_and_resume_per_benchmark(tiny_checkpoint, tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    jobs = plan_jobs(specs(), ["empty", "cautious"])
    assert [j.name for j in jobs] == ["gsm8k.empty", "gsm8k.cautious", "arc-challenge.empty", "arc-challenge.cautious"]
    at = tmp_path / "ckpt"
    _copy(tiny_checkpoint, at)
    generated: list[str] = []
    progress = lambda job, done, total: generated.append(job)  # noqa: E731

    first = evaluate_checkpoint(store, at, jobs[:2], HF, tmp_path / "work", progress=progress)
    assert [r.cached for r in first] == [False, False] and generated == ["gsm8k.empty", "gsm8k.cautious"]
    # One more benchmark: the finished ones are found, only the new one is generated.
    generated.clear()
    second = evaluate_checkpoint(store, at, jobs, HF, tmp_path / "work", progress=progress)
    assert [r.cached for r in second] == [True, True, False, False]
    assert generated == ["arc-challenge.empty", "arc-challenge.cautious"]
    assert [r.key for r in second[:2]] == [r.key for r in first]
    # The same weights at another path share the results.
    moved = _copy(at, tmp_path / "moved")
    assert all(r.cached for r in evaluate_checkpoint(store, moved, jobs, HF, tmp_path / "work"))
    # Other weights at the SAME path never do.
    _perturb(at)
    generated.clear()
    third = evaluate_checkpoint(store, at, jobs, HF, tmp_path / "work", progress=progress)
    assert not any(r.cached for r in third) and len(generated) == 4
    assert {r.key for r in third}.isdisjoint(r.key for r in second)
    # Settings that change outputs change the key; batching does not.
    longer = evaluate_checkpoint(store, moved, jobs[:1], GenerationSettings(backend="hf", max_new_tokens=25), tmp_path / "w")
    rebatched = evaluate_checkpoint(store, moved, jobs[:1], GenerationSettings(backend="hf", max_new_tokens=24, batch_size=2), tmp_path / "w")
    assert not longer[0].cached and rebatched[0].cached

    table = pq.read_table(Path(second[0].ref.url) / EXAMPLES_FILE).to_pandas()
    assert len(table) == len(jobs[0].examples) and set(table.system_message) == {"empty"}
    assert {"prompt", "output", "strict", "flexible", "gold", "correct_strict", "correct_flexible", "format_ok"} <= set(table.columns)
    assert (table.format_ok == table.strict.notna()).all()
    key = json.loads((Path(second[0].ref.url) / "key.json").read_text())
    assert str(at) not in json.dumps(key)  # never a path
    assert key["config"]["generation"]["backend_version"].startswith("transformers-")


KILLED_RUN = """
import sys
from pathlib import Path
from orca_core.eval.backends import GenerationSettings
from orca_core.eval.benchmarks import BenchmarkSpec
from orca_core.eval.evaluate import evaluate_checkpoint, plan_jobs
from orca_core.store import ArtifactStore

checkpoint, store, work, fixtures = map(Path, sys.argv[1:5])
jobs = plan_jobs([BenchmarkSpec(name="gsm8k", path=str(fixtures / "gsm8k")),
                  BenchmarkSpec(name="arc-challenge", path=str(fixtures / "arc"))], ["empty", "cautious"])
evaluate_checkpoint(ArtifactStore(str(store)), checkpoint, jobs, GenerationSettings(backend="hf", max_new_tokens=24, batch_size=8),
                    work, progress=lambda job, done, total: (print("DONE", job, flush=True), __import__("time").sleep(30)))
"""


def test_a_killed_evaluation_resumes_without_regenerating_finished_benchmarks(tiny_checkpoint, tmp_path):
    store_dir, work = tmp_path / "store", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tiny_checkpoint), str(store_dir), str(work), str(FIXTURES)],
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()  # the first job's file is written, then the run sleeps: kill it there
        assert line.startswith("DONE gsm8k.empty"), line
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not ArtifactStore(str(store_dir)).keys(RESULTS_STEP)  # nothing was published...
    assert len(list(work.rglob("gsm8k.empty.jsonl"))) == 1  # ...but the finished generations are kept

    store = ArtifactStore(str(store_dir))
    jobs = plan_jobs(specs(), ["empty", "cautious"])
    generated: list[str] = []
    started = time.perf_counter()
    resumed = evaluate_checkpoint(store, tiny_checkpoint, jobs, HF, work, progress=lambda job, d, t: generated.append(job))
    assert time.perf_counter() - started < 60
    assert generated == ["gsm8k.cautious", "arc-challenge.empty", "arc-challenge.cautious"]  # not gsm8k.empty again
    fresh = evaluate_checkpoint(ArtifactStore(str(tmp_path / "fresh")), tiny_checkpoint, jobs, HF, tmp_path / "work2")
    for a, b in zip(resumed, fresh):
        assert a.key == b.key
        assert pq.read_table(Path(a.ref.url) / EXAMPLES_FILE).equals(pq.read_table(Path(b.ref.url) / EXAMPLES_FILE))


REAL_OFFLINE_TASKS = {"gsm8k": 1, "bbh": 27, "mmlu": 57, "drop": 1, "crass": 1, "arc-challenge": 1}


def test_orca_eval_runs_the_real_offline_suite_on_one_checkpoint_with_vllm(tiny_checkpoint, tmp_path):
    """`make bench-data` + `orca eval CKPT --set eval.suite=real-offline`: every benchmark, both system messages."""
    data = Path(__file__).resolve().parents[1] / "bench-data"
    if not (data / "SOURCES.json").is_file():
        pytest.fail("bench-data/ is missing: run `make bench-data` (make test does)")
    store = tmp_path / "store"
    orca = [str(Path(sys.executable).with_name("orca")), "eval", str(tiny_checkpoint), "--recipe", "smoke",
            "--set", f"store.root={store}", "--set", "eval.suite=real-offline", "--set", f"eval.data_dir={data}",
            "--set", "eval.limit=1", "--set", "eval.max_new_tokens=16", "--set", "eval.backend=vllm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    first = subprocess.run([*orca, "--name", "tiny"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Completed: 12 benchmark result(s) generated, 0 found in the store" in first.stdout
    report = next((store / "eval-checkpoint").iterdir())
    summary = pq.read_table(report / "summary.parquet").to_pandas()
    macro = summary[summary.task == "(all)"]
    assert sorted(set(macro.benchmark)) == sorted(REAL_OFFLINE_TASKS)
    for benchmark, tasks in REAL_OFFLINE_TASKS.items():  # eval.limit=1: one example per task
        rows = macro[macro.benchmark == benchmark]
        assert sorted(rows.system_message) == ["cautious", "empty"] and set(rows.n) == {tasks}, benchmark
    assert (report / "report.html").is_file() and (report / "accuracy.png").stat().st_size > 0
    # The same weights under another name and path: every benchmark result comes from the store.
    moved = _copy(tiny_checkpoint, tmp_path / "nightly" / "export")
    second = subprocess.run([*orca[:2], str(moved), *orca[3:], "--name", "nightly"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Completed: 0 benchmark result(s) generated, 12 found in the store" in second.stdout
    third = subprocess.run([*orca[:2], str(moved), *orca[3:], "--name", "nightly"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert third.returncode == 0 and "Cached: this checkpoint was already scored" in third.stdout


def test_native_prompts_each_stage_as_it_was_trained_and_equal_prompts_are_generated_once(tiny_checkpoint, tmp_path):
    from orca_core.eval.native import native_prompter, stage_data_of
    from orca_core.prompts import orca1_allowed_ids, orca1_system_message
    from orca_core.recipe.models import ORCA2_CAUTIOUS_SYSTEM_MESSAGE

    examples = plan_jobs(specs()[:1], ["empty"])[0].examples
    assert {native_prompter(None, "G")(e) for e in examples} == {""}  # base
    assert {native_prompter("flan", "G")(e) for e in examples} == {""}
    assert {native_prompter("orca2", ORCA2_CAUTIOUS_SYSTEM_MESSAGE)(e) for e in examples} == {ORCA2_CAUTIOUS_SYSTEM_MESSAGE}
    orca1 = [native_prompter("orca1", "G")(e) for e in examples]  # gsm8k counts as CoT: Orca 1's {6, 11, 16}
    assert set(orca1) <= {orca1_system_message(i) for i in orca1_allowed_ids("cot", False)} and len(set(orca1)) > 1
    with pytest.raises(ValueError, match="unknown stage data 'dpo'"):
        native_prompter("dpo", "G")
    with pytest.raises(ValueError, match="needs to know how the checkpoint was trained"):
        plan_jobs(specs(), ["native"])
    # A stage's export says what it trained on; a folder without recipe.json is a base model.
    at = _copy(tiny_checkpoint, tmp_path / "ckpt")
    assert stage_data_of(at) is None
    (at / "recipe.json").write_text(json.dumps({"stage": {"name": "orca1", "data": "orca1"}}))
    assert stage_data_of(at) == "orca1"
    # Native == empty for a FLAN stage: one generation serves both columns, and each has its own key.
    jobs = plan_jobs(specs()[:1], ["native", "empty"], native=native_prompter("flan", ""))
    store, generated = ArtifactStore(str(tmp_path / "store")), []
    results = evaluate_checkpoint(store, at, jobs, HF, tmp_path / "work",
                                  progress=lambda job, done, total: generated.append(job))
    assert set(generated) == {"gsm8k.native"} and len({r.key for r in results}) == 2
    native_rows, empty_rows = (pq.read_table(Path(r.ref.url) / EXAMPLES_FILE).to_pandas() for r in results)
    assert list(native_rows.output) == list(empty_rows.output) and set(native_rows.system_message) == {"native"}
    # Under Orca 1 messages the prompts differ: generated on their own, keyed apart from the flan-style native.
    orca1_jobs = plan_jobs(specs()[:1], ["native"], native=native_prompter("orca1", ""))
    generated.clear()
    again = evaluate_checkpoint(store, at, orca1_jobs, HF, tmp_path / "work",
                                progress=lambda job, done, total: generated.append(job))
    assert generated and again[0].key != results[0].key
