"""The filter step: every row gets a verdict, each reason fires exactly where it should."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from orca_core.filters import EvalText, filter_traces, label_set_tasks
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


def test_gold_check_uses_source_options_generator_and_numbers():
    sources = [source("mc", "Thursday", ["Monday", "Thursday"]),
               source("gen", "05:02", generator="time_intervals", metadata='{"task_type": "time"}')]
    rows = [
        trace(user="1", source_id="mc", reference="Thursday", response="Counting on, it is (B)."),
        trace(user="2", source_id="mc", reference="Thursday", response="So the answer is Monday."),
        trace(user="4", source_id="gen", reference="05:02", response="So the answer is 05:02."),
        trace(user="5", source_id="gen", reference="05:02", response="So the answer is 05:03."),  # its scorer says no
        trace(user="6", reference=None, response="So the answer is 7."),
        trace(user="7", reference="1000", response="That is 999 + 1 = 1,000"),
        trace(user="8", reference="1000", response="That is 999 + 2 = 1,001"),
    ]
    verdicts, stats, _ = run(rows, sources)
    assert verdicts == ["kept", "dropped:wrong_answer", "kept", "dropped:wrong_answer", "kept", "kept",
                        "dropped:wrong_answer"]
    assert stats["dropped"] == {"wrong_answer": 3} and stats["unchecked"] == 0


def test_free_form_golds_are_kept_unchecked_and_counted():
    """A FLAN title or translation is not gradable by equality: a correct paraphrase would be dropped."""
    titles = [source(f"title{i}", f"Title number {i} of the news", task_name="gigaword_title") for i in range(12)]
    rows = [
        trace(user="1", source_id="title0", reference="Title number 0 of the news", task_name="gigaword_title",
              response="A good title:\nNews item zero"),
        trace(user="2", source_id="title1", reference="Title number 1 of the news", task_name="gigaword_title",
              response="So the answer is Title number 1 of the news.", stage="orca1", teacher_role="assistant"),
        trace(user="3", reference="a b c d e f", response="Something else entirely.", task_name="free"),
        trace(user="4", source_id="title2", reference="Title number 2 of the news", task_name="gigaword_title",
              status="failed:http"),  # dropped for another reason: not counted
    ]
    verdicts, stats, _ = run(rows, titles)
    assert verdicts == ["kept", "kept", "kept", "dropped:failed"]
    assert stats["unchecked"] == 3
    assert stats["unchecked_by_task"] == {"free": 1, "gigaword_title": 2}
    assert stats["by_stage_role"]["orca2/strong"]["unchecked"] == 2
    assert stats["by_stage_role"]["orca1/assistant"]["unchecked"] == 1


def test_label_set_tasks_and_closed_labels_are_graded():
    labels = ["positive", "negative"]
    sentiment = [source(f"s{i}", labels[i % 2], task_name="sentiment") for i in range(10)]  # 2 labels x 5 rows
    few = [source(f"f{i}", labels[i % 2], task_name="few") for i in range(9)]  # 9 rows < 5 per label: not a set
    upbeat = "The tone is upbeat.\nSo the answer is positive."
    rows = [
        trace(user="1", source_id="s0", reference="positive", response=upbeat),
        trace(user="2", source_id="s1", reference="negative", response=upbeat),
        trace(user="3", source_id="f1", reference="negative", response=upbeat, task_name="few"),
        trace(user="4", reference="Yes", response="It rained, so the ground is wet.\nSo the answer is no."),
        trace(user="5", reference="(C)", response="So the answer is (B)."),
    ]
    verdicts, stats, _ = run(rows, sentiment + few)
    assert verdicts == ["kept", "dropped:wrong_answer", "kept", "dropped:wrong_answer", "dropped:wrong_answer"]
    assert stats["unchecked_by_task"] == {"few": 1}
    assert label_set_tasks(to_table(sentiment + few)) == {"sentiment"}
    many = [source(f"m{i}", f"class {i % 21}", task_name="many") for i in range(210)]  # 21 labels: too many
    assert label_set_tasks(to_table(sentiment + many + [source("m", "class 0", task_name="many")])) == {"sentiment"}
    twenty = [source(f"m{i}", f"class {i % 20}", task_name="many") for i in range(100)]  # 20 labels x 5 rows
    assert label_set_tasks(to_table(twenty)) == {"many"}


def test_procedural_rows_are_graded_by_their_generator(procedural):
    """Right answers in the generator's own format pass; a neighbour's answer is dropped."""
    rows = [r for task in ("caesar_cipher", "needle_haystack") for r in procedural if r["task_name"] == task][::10]
    assert len(rows) == 20 and all(r["generator"] and not r["options"] for r in rows)  # free text but gradable
    traces = [trace(user=r["inputs"], response=f"Working.\nSo the answer is {answer}.", source_id=r["id"],
                    reference=r["answer"], task_name=r["task_name"])
              for r, answer in zip(rows, [r["answer"] for r in rows[1:] + rows[:1]])]
    traces += [trace(user=r["inputs"] + " (again)", response=f"So the answer is {r['answer']}.", source_id=r["id"],
                     reference=r["answer"], task_name=r["task_name"]) for r in rows]
    verdicts, stats, _ = run(traces, [dict(r) for r in procedural])
    wrong = [a["answer"] != b["answer"] for a, b in zip(rows, rows[1:] + rows[:1])]
    assert verdicts[:len(rows)] == ["dropped:wrong_answer" if w else "kept" for w in wrong]
    assert verdicts[len(rows):] == ["kept"] * len(rows) and stats["unchecked"] == 0


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
    assert stats["by_stage_role"]["orca2/strong"] == {"total": 1, "kept": 1, "dropped": {}, "unchecked": 0}


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


def test_a_passage_shared_by_many_questions_contaminates_but_a_task_template_does_not():
    """Frequency counts distinct passages: one passage asked about 4 times is content, an instruction is template."""
    template = "Answer the following question using only the passage given below it, in one word."
    passage = "The river Tamsin rises in the northern hills and flows past seven old mills before reaching the sea."
    others = [f"Passage {i}: a story about {i} merchants who sailed east and came home rich." for i in range(3)]
    evaluation = [EvalText(f"{template}\n{passage}\nQuestion {q}?", "drop/drop", passage) for q in "ABCD"]
    evaluation += [EvalText(f"{template}\n{p}\nQuestion?", "drop/drop", p) for p in others]
    rows = [trace(user=f"Summarise: {passage}"), trace(user=f"{template} What is 2 + 2?")]
    verdicts, _, _ = run(rows, contamination=evaluation, contamination_ngram=8)
    assert verdicts == ["dropped:contaminated", "kept"]
    bare = [t.text for t in evaluation]  # without passages every question is its own text: 4 texts make template
    assert run(rows, contamination=bare, contamination_ngram=8)[0] == ["kept", "kept"]


def test_an_ngram_shared_by_two_tasks_is_template_and_by_two_texts_of_one_task_is_content():
    phrase = "which of the following statements best describes the main idea here"
    texts = [f"History: {phrase} about kings?", f"Biology: {phrase} about cells?"]
    rows = [trace(user=f"Chemistry: {phrase} about atoms?")]
    across = [EvalText(texts[0], "mmlu/history"), EvalText(texts[1], "mmlu/biology")]
    within = [EvalText(texts[0], "mmlu/history"), EvalText(texts[1], "mmlu/history")]
    assert run(rows, contamination=across, contamination_ngram=8)[0] == ["kept"]
    assert run(rows, contamination=within, contamination_ngram=8)[0] == ["dropped:contaminated"]


def test_real_drop_passages_shared_by_several_questions_contaminate(smoke):
    """Real DROP rows through the filter step's own eval texts (`contamination_texts`)."""
    from orca_core.eval.benchmarks import BenchmarkSpec
    from orca_core.eval.specs import contamination_texts
    from orca_core.recipe.models import EvalConfig

    drop = Path(__file__).resolve().parents[1] / "bench-data" / "drop" / "validation.jsonl"
    if not drop.is_file():
        pytest.skip("bench-data/ is missing: run `make bench-data`")
    rows = [json.loads(line) for line in drop.read_text().splitlines()]
    passage, asked = Counter(r["passage"] for r in rows).most_common(1)[0]
    question = "Which age group is smaller: under the age of 18 or 18 to 24?"  # asked of 6 census passages
    assert asked == 14 and sum(r["question"] == question for r in rows) == 6
    recipe = smoke.model_copy(update={"eval": EvalConfig(suite="custom", benchmarks=[
        BenchmarkSpec(name="drop", path=str(drop))])})
    texts = contamination_texts(recipe)
    assert len(texts) == 1000 and {t.group for t in texts} == {"drop/drop"} and texts[0].passage == rows[0]["passage"]
    census = "In 2010 the town had 4,512 residents; 21% were under the age of 18 and 9% were 18 to 24."
    traces = [trace(user=f"Read the text and list three facts.\n{passage}"),
              trace(user=f"Passage: {census}\nQuestion: {question}")]
    verdicts, _, _ = run(traces, contamination=texts, contamination_ngram=13)
    assert verdicts == ["dropped:contaminated", "kept"]
    prompts = [t.text for t in texts]  # counted per prompt, as before: the 14 questions made the passage template
    assert run(traces, contamination=prompts, contamination_ngram=13)[0] == ["kept", "kept"]


def test_near_duplicate_one_word_changed_in_a_long_text():
    edited = LONG.replace("part 7 of", "piece 7 of")
    rows = [trace(response=LONG), trace(user="Other question", response=LONG[:200]), trace(response=edited),
            trace(response=edited, teacher_role="assistant")]
    verdicts, stats, _ = run(rows, near_dup_threshold=0.9)
    assert verdicts == ["kept", "kept", "dropped:near_duplicate", "kept"]
    assert stats["dropped"] == {"near_duplicate": 1}


@pytest.fixture(scope="module")
def procedural():
    # reasoning-gym's families; serial.py's are templates over a few letters, near duplicates by
    # shingles, and the recipe that trains them (tiny) turns the near-duplicate filter off
    from orca_core.sources.serial import GENERATORS
    from orca_core.sources.suite import SUITE

    train, _, _ = generate_suite([n for n, f in SUITE.items() if f.generator not in GENERATORS], 100, 0, seed=0)
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
    assert stats == {"total": 0, "kept": 0, "dropped": {}, "unchecked": 0, "by_stage_role": {}, "unchecked_by_task": {}}


def test_exact_texts_match_by_equality_only():
    from orca_core.recipe.models import FiltersConfig
    from orca_core.filters import EvalText, filter_traces, label_set_tasks
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
    from orca_core.context import StepContext
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
