"""The filter step: every row gets a verdict, each reason fires exactly where it should."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest

from orca_core.filters import filter_traces
from orca_core.recipe.models import FiltersConfig
from orca_core.sources.procedural import generate_suite
from orca_core.sources.schema import to_table
from orca_core.traces import TRACE_SCHEMA

LONG = " ".join(f"Step {i}: we look at part {i} of the problem and note what it tells us." for i in range(20))


def trace(user: str = "What is 2 + 2?", response: str = "2 + 2 = 4.\nSo the answer is 4.", **fields: Any) -> dict:
    row = {
        "request_id": "r", "call_ids": ["r"], "source_id": "s-none", "source": "flan", "task_name": "t",
        "template_type": "zs_noopt", "sub_collection": "cot", "stage": "orca2", "teacher_role": "strong",
        "teacher_model": "gpt", "strategy": "step-by-step", "system_message_id": 0, "teacher_system": "Think.",
        "student_system": "You are a helpful assistant.", "user": user, "reference": None, "response": response,
        "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 10, "cost_usd": 0.0, "latency_ms": 1.0,
        "attempts": 1, "status": "ok", "verdict": None, "created_at": "2024-01-01", "schema_version": 1,
    }
    return {**row, **fields}


def source(id: str, answer: str, options: list[str] | None = None, generator: str = "", **fields: Any) -> dict:
    row = {
        "id": id, "inputs": "q", "targets": answer, "task_source": "CoT", "task_name": "t", "template_type": "zs_noopt",
        "sub_collection": "cot", "split": "train", "answer": answer, "options": options or [],
        "multiple_choice": bool(options), "source": "flan", "generator": generator, "metadata": "{}",
    }
    return {**row, **fields}


def run(rows: list[dict], sources: list[dict] = (), contamination: list[str] = (), **cfg: Any):
    table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
    config = FiltersConfig(**{"contamination_ngram": None, "near_dup_threshold": None, **cfg})
    out, stats = filter_traces(table, config, to_table(list(sources)), contamination)
    return out["verdict"].to_pylist(), stats, out


def unique(n: int) -> list[dict]:
    """n rows that pass every check."""
    return [trace(f"Question number {i}: add {i} and {i}?", f"{i} + {i} = {2 * i}.\nSo the answer is {2 * i}.")
            for i in range(n)]


def test_each_reason_fires_in_order_with_exact_counts():
    rows = unique(3) + [
        trace(status="failed:timeout", response=""),  # failed beats empty
        trace(user="e1", response="   \n"),
        trace(user="t1", finish_reason="length"),
        trace(user="r1", response="I'm sorry, but I can't help with that request."),
        trace(user="r2", response="As an AI language model, I cannot browse the web."),
        trace(user="s1", response="ok"),
        trace(user="l1", response="x" * 101),
        trace(user="w1", response="So the answer is 5.", reference="4"),
    ]
    verdicts, stats, out = run(rows, min_response_chars=3, max_response_chars=100)
    assert verdicts == ["kept"] * 3 + ["dropped:failed", "dropped:empty", "dropped:truncated", "dropped:refusal",
                                       "dropped:refusal", "dropped:too_short", "dropped:too_long",
                                       "dropped:wrong_answer"]
    assert out.schema == TRACE_SCHEMA and out["user"].to_pylist() == [r["user"] for r in rows]
    assert stats["total"] == 11 and stats["kept"] == 3
    assert stats["dropped"] == {"failed": 1, "empty": 1, "truncated": 1, "refusal": 2, "too_short": 1,
                                "too_long": 1, "wrong_answer": 1}
    json.dumps(stats)


def test_switches_turn_checks_off():
    rows = [trace(user="t", finish_reason="length"), trace(user="r", response="I am unable to do that."),
            trace(user="w", reference="5"), trace(user="d"), trace(user="d")]
    verdicts, _, _ = run(rows, drop_truncated=False, drop_refusals=False, gold_check=False, exact_dedup=False)
    assert verdicts == ["kept"] * 5


def test_refusal_only_near_the_start():
    late = LONG + " I cannot help noticing that 2 + 2 = 4.\nSo the answer is 4."
    verdicts, _, _ = run([trace(response=late), trace(user="b", response="I’m unable to answer that.")])
    assert verdicts == ["kept", "dropped:refusal"]


def test_gold_check_uses_source_options_generator_and_short_gold():
    sources = [source("mc", "Thursday", ["Monday", "Thursday"]), source("long", "a b c d e f"),
               source("gen", "05:02", generator="time_intervals", metadata='{"task_type": "time"}')]
    rows = [
        trace(user="1", source_id="mc", reference="Thursday", response="Counting on, it is (B)."),
        trace(user="2", source_id="mc", reference="Thursday", response="So the answer is Monday."),
        trace(user="3", source_id="long", reference="a b c d e f", response="Something else entirely."),
        trace(user="4", source_id="gen", reference="05:02", response="So the answer is 05:02."),
        trace(user="5", source_id="gen", reference="05:02", response="So the answer is 05:03."),
        trace(user="6", reference=None, response="So the answer is 7."),
        trace(user="7", reference="1000", response="That is 999 + 1 = 1,000"),
    ]
    verdicts, stats, _ = run(rows, sources)
    assert verdicts == ["kept", "dropped:wrong_answer", "kept", "kept", "dropped:wrong_answer", "kept", "kept"]
    assert stats["dropped"] == {"wrong_answer": 2}


def test_first_of_a_duplicate_pair_is_kept():
    rows = unique(2) + [trace(user="Question number 0:  ADD 0 and 0?", response=unique(1)[0]["response"])]
    verdicts, stats, _ = run(rows)
    assert verdicts == ["kept", "kept", "dropped:duplicate"]
    assert stats["dropped"] == {"duplicate": 1}


def test_same_prompt_by_two_roles_or_stages_is_not_a_duplicate():
    rows = [trace(teacher_role="strong"), trace(teacher_role="assistant"), trace(stage="orca1")]
    verdicts, stats, _ = run(rows, near_dup_threshold=0.9)
    assert verdicts == ["kept"] * 3
    assert set(stats["by_stage_role"]) == {"orca2/strong", "orca2/assistant", "orca1/strong"}
    assert stats["by_stage_role"]["orca2/strong"] == {"total": 1, "kept": 1, "dropped": {}}


def test_a_duplicate_of_a_dropped_row_is_judged_on_its_own():
    rows = [trace(status="failed:http"), trace()]
    assert run(rows)[0] == ["dropped:failed", "kept"]


def test_contamination_by_ngram_and_by_exact_short_prompt():
    evaluation = ["The quick brown fox jumps over the lazy dog near the river bank today.", "What is 7 + 5?"]
    rows = [
        trace(user="Context: the quick brown fox jumps over the lazy dog near the river bank. Why?"),
        trace(user="what is  7 + 5?"),
        trace(user="What is 7 + 6?"),
        trace(user="The quick brown fox jumps over a lazy dog."),  # 7 shared words only
    ]
    verdicts, stats, _ = run(rows, contamination=evaluation, contamination_ngram=8)
    assert verdicts == ["dropped:contaminated", "dropped:contaminated", "kept", "kept"]
    assert stats["dropped"] == {"contaminated": 2}


def test_template_ngrams_shared_by_many_evaluation_texts_do_not_contaminate():
    template = "Your task is to count how many legs there are in total when given a list of animals."
    evaluation = [f"{template} Now, {i} ducks and {i + 1} cows and {i + 2} ants?" for i in range(5)]
    rows = [trace(user=f"{template} Now, 9 spiders?"), trace(user=evaluation[2])]
    verdicts, _, _ = run(rows, contamination=evaluation, contamination_ngram=8)
    assert verdicts == ["kept", "dropped:contaminated"]


def test_near_duplicate_one_word_changed_in_a_long_text():
    edited = LONG.replace("part 7 of", "piece 7 of")
    rows = [trace(response=LONG), trace(user="Other question", response=LONG[:200]), trace(response=edited),
            trace(response=edited, teacher_role="assistant")]
    verdicts, stats, _ = run(rows, near_dup_threshold=0.9)
    assert verdicts == ["kept", "kept", "dropped:near_duplicate", "kept"]
    assert stats["dropped"] == {"near_duplicate": 1}


@pytest.fixture(scope="module")
def procedural():
    train, _, _ = generate_suite(None, 100, 0, seed=0)
    return train


def test_distinct_procedural_problems_are_not_near_duplicates(procedural):
    rows = [trace(user=r["inputs"], response=f"Step...\nSo the answer is {r['answer']}.", source_id=r["id"],
                  reference=r["answer"], task_name=r["task_name"]) for r in procedural]
    verdicts, stats, _ = run(rows, [dict(r) for r in procedural], near_dup_threshold=0.9)
    assert stats["total"] == 1200
    assert stats["dropped"].get("near_duplicate", 0) <= 3  # templates with one differing number, only
    assert "wrong_answer" not in stats["dropped"] and "duplicate" not in stats["dropped"]
    assert Counter(verdicts)["kept"] == stats["kept"]


def test_empty_table():
    verdicts, stats, out = run([])
    assert verdicts == [] and out.schema == TRACE_SCHEMA
    assert stats == {"total": 0, "kept": 0, "dropped": {}, "by_stage_role": {}}


def test_exact_texts_match_by_equality_only():
    from orca_core.recipe.models import FiltersConfig
    from orca_core.filters import filter_traces
    import pyarrow as pa
    from orca_core.traces import TRACE_SCHEMA

    template = "Your task is to count how many legs there are in total when given a list of animals. "
    rows = [
        {name: None for name in TRACE_SCHEMA.names} | {
            "request_id": str(i), "call_ids": [str(i)], "source_id": f"s{i}", "stage": "orca1", "teacher_role": "assistant",
            "student_system": "", "user": template + question, "response": f"Counting.\nSo the answer is {i}.",
            "finish_reason": "stop", "status": "ok", "attempts": 1, "prompt_tokens": 1, "completion_tokens": 1,
            "cost_usd": 0.0, "latency_ms": 1.0, "system_message_id": 1, "schema_version": 1}
        for i, question in enumerate(["How many legs do 3 cats have?", "How many legs do 2 dogs have?"])
    ]
    cfg = FiltersConfig(gold_check=False, near_dup_threshold=None, contamination_ngram=13)
    held = [template + "How many legs do 3 cats have?", template + "How many legs do 5 ants have?"]
    table, stats = filter_traces(pa.Table.from_pylist(rows, schema=TRACE_SCHEMA), cfg, pa.table({"id": ["x"]}), exact_texts=held)
    assert table["verdict"].to_pylist() == ["dropped:contaminated", "kept"]  # the shared template alone is not leakage


def test_the_filter_steps_drop_traces_that_overlap_the_real_eval_benchmarks(smoke, tmp_path):
    """With a real eval suite, the filter steps decontaminate against its items (and key on its files)."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from orca_core.eval.benchmarks import BenchmarkSpec
    from orca_core.generate import StepContext
    from orca_core.recipe.models import EvalConfig
    from orca_core.steps import FILTERED_ORCA1, SOURCES, plan_key, run_step
    from orca_core.store import ArtifactStore

    gsm8k = Path(__file__).parent / "fixtures" / "benchmarks" / "gsm8k"
    question = json.loads((gsm8k / "test.jsonl").read_text().splitlines()[0])["question"]
    real = smoke.model_copy(update={"eval": EvalConfig(suite="custom", benchmarks=[BenchmarkSpec(name="gsm8k", path=str(gsm8k))])})
    assert plan_key(FILTERED_ORCA1, real) != plan_key(FILTERED_ORCA1, smoke)
    sources = run_step(ArtifactStore(smoke.store.root), SOURCES, smoke).ref.url
    traces = tmp_path / "traces"
    traces.mkdir()
    rows = [trace(f"Solve this: {question}", "So the answer is 18."), *unique(2)]
    pq.write_table(pa.Table.from_pylist(rows, schema=TRACE_SCHEMA), traces / "traces.parquet")
    for recipe, expected in ((real, ["dropped:contaminated", "kept", "kept"]), (smoke, ["kept", "kept", "kept"])):
        out = tmp_path / recipe.eval.suite
        out.mkdir()
        config = recipe.model_copy(update={"filters": recipe.filters.model_copy(update={"gold_check": False})})
        FILTERED_ORCA1.build(config, {"sources": Path(sources), "traces-orca1": traces}, out, StepContext())
        assert pq.read_table(out / "traces.parquet")["verdict"].to_pylist() == expected
