"""Benchmark loaders on tiny fixtures in the public schemas, their errors, and the real offline data.

The real-data tests read ./bench-data (made by `make bench-data`, which `make test` runs first).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from orca_core.eval import bbh_sources, bench_data
from orca_core.eval.benchmarks import (
    BBH_TASKS,
    BenchmarkDataError,
    BenchmarkSpec,
    Example,
    examples_digest,
    load_benchmark,
    suite_specs,
)

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
REPO = Path(__file__).resolve().parents[1]


def load(name: str, path: Path | str, **fields) -> list[Example]:
    return load_benchmark(BenchmarkSpec(name=name, path=str(path), **fields))


# -- loaders on fixtures ---------------------------------------------------------


def test_gsm8k_gold_is_the_number_after_hashes_without_commas():
    examples = load("gsm8k", FIXTURES / "gsm8k" / "test.jsonl")
    assert [e.gold for e in examples] == ["18", "3", "2125"]
    first = examples[0]
    assert (first.benchmark, first.task, first.id, first.kind) == ("gsm8k", "gsm8k", "gsm8k-0", "number")
    assert first.prompt.startswith("Janet’s ducks lay 16 eggs per day.") and "####" not in first.prompt
    assert first.options == () and first.aliases == ()


def test_bbh_task_files_mc_text_and_number_targets():
    examples = load("bbh", FIXTURES / "bbh")
    assert [e.task for e in examples] == ["boolean_expressions"] * 2 + ["date_understanding"] * 2 + \
        ["multistep_arithmetic_two"] * 2 + ["sports_understanding"] * 2
    boolean, date, arithmetic, sports = examples[0], examples[3], examples[4], examples[6]
    assert (boolean.kind, boolean.gold, boolean.prompt) == ("text", "True", "not True and False or True or False is")
    assert date.kind == "mc" and date.gold == "F" and date.id == "date_understanding-1"
    assert date.options == ("05/02/1960", "04/29/2021", "05/01/2021", "03/14/2021", "04/11/2021", "05/02/2021")
    assert date.prompt.endswith("Options:\n(A) 05/02/1960\n(B) 04/29/2021\n(C) 05/01/2021\n(D) 03/14/2021\n"
                                "(E) 04/11/2021\n(F) 05/02/2021")
    assert (arithmetic.kind, arithmetic.gold) == ("number", "-4")
    assert (sports.kind, sports.gold) == ("text", "no")


def test_bbh_rows_with_a_task_column():
    web, words, hyperbaton = load("bbh", FIXTURES / "bbh_rows.jsonl")
    assert (web.task, web.kind, web.gold, web.id) == ("web_of_lies", "text", "No", "web_of_lies-0")
    assert web.prompt.startswith("Question: Antwan tells the truth.")
    assert (words.task, words.gold) == ("word_sorting", "oft viscount")
    assert (hyperbaton.kind, hyperbaton.gold) == ("mc", "B")
    assert hyperbaton.options == ("Brazilian gray little lead wonderful surfboard",
                                  "wonderful little gray Brazilian lead surfboard")


def test_agieval_task_is_the_file_stem_options_lose_their_letters():
    examples = load("agieval", FIXTURES / "agieval")
    assert [(e.task, e.id, e.gold) for e in examples] == [
        ("aqua-rat", "aqua-rat-0", "A"), ("aqua-rat", "aqua-rat-1", "B"), ("sat-en", "sat-en-0", "B")]
    assert examples[1].options == ("270", "300", "280", "320", "315")
    assert examples[1].prompt == ("A trader sold an article at a profit of 20% for Rs.360. What is the cost price of "
                                  "the article?\nOptions:\n(A) 270\n(B) 300\n(C) 280\n(D) 320\n(E) 315")
    assert examples[2].prompt.startswith("The lighthouse keeper climbed")  # the passage comes first
    assert "\n\nThe passage mainly suggests that the keeper is\nOptions:\n(A) careless\n(B) dedicated" in examples[2].prompt


def test_drop_processed_rows_first_answer_is_gold_others_are_aliases():
    simple, two, multi = load("drop", FIXTURES / "drop" / "processed.jsonl")
    assert (simple.id, simple.gold, simple.aliases, simple.kind) == (
        "50ad1ec3-d7b5-4ffc-82db-af0e31f4bdf7", "swedish", (), "text")
    assert (two.gold, two.aliases) == ("1507", ("1477",))
    assert multi.gold == "Spain, Italy, the Netherlands"
    assert multi.aliases == ("Germany, France, United Kingdom", "Spain, Italy, Netherlands")
    assert simple.prompt.startswith("Passage: As of the census of 2000,")
    assert simple.prompt.endswith("\nQuestion: Which ancestral group is larger: swedish or united states?")


def test_drop_hf_schema_answers_spans():
    single, multi = load("drop", FIXTURES / "drop_hf")
    assert (single.id, single.gold, single.aliases) == ("f16c0ee7-f131-4a8b-a6ac-4d275ea68066", "swedish", ())
    assert multi.gold == "Spain, Italy, the Netherlands"


def test_crass_options_in_file_order_gold_is_the_scored_one():
    examples = load("crass", FIXTURES / "crass" / "task.json")
    assert [e.gold for e in examples] == ["C", "B", "A"]
    first = examples[0]
    assert first.options == ("The treasure chest would have been open.", "That is not possible.",
                             "The treasure chest would have remained closed.", "I don't know.")
    assert first.prompt == ("A woman opens a treasure chest. What would have happened if the woman had not opened "
                            "the treasure chest?\nOptions:\n(A) The treasure chest would have been open.\n"
                            "(B) That is not possible.\n(C) The treasure chest would have remained closed.\n"
                            "(D) I don't know.")


def test_race_parquet_article_first_ids_count_questions_per_article():
    examples = load("race", FIXTURES / "race" / "test.parquet")
    assert [(e.id, e.gold) for e in examples] == [
        ("middle1001.txt-0", "B"), ("middle1001.txt-1", "D"), ("high2002.txt-0", "A")]
    assert examples[1].prompt.startswith("Tom has a small dog named Max.")
    assert examples[1].prompt.endswith("\n\nWhen does Max bark happily?\nOptions:\n(A) At night\n(B) In the morning\n"
                                       "(C) At lunch\n(D) When Tom comes back")


def test_mmlu_task_is_the_subject_answer_index_is_a_letter():
    examples = load("mmlu", FIXTURES / "mmlu")
    assert [(e.task, e.id, e.gold) for e in examples] == [
        ("abstract_algebra", "abstract_algebra-0", "B"), ("abstract_algebra", "abstract_algebra-1", "C"),
        ("virology", "virology-0", "A")]
    assert examples[0].options == ("0", "4", "2", "6")
    assert examples[0].prompt == ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
                                  "\nOptions:\n(A) 0\n(B) 4\n(C) 2\n(D) 6")


def test_arc_numeric_labels_map_to_letters():
    examples = load("arc-challenge", FIXTURES / "arc" / "validation.jsonl")
    assert [(e.id, e.gold, len(e.options)) for e in examples] == [
        ("Mercury_SC_407695", "D", 4), ("NYSEDREGENTS_2014_8_20", "B", 4), ("NYSEDREGENTS_2014_4_4", "A", 3)]
    assert examples[1].prompt.endswith("(A) greater than the total mass of the products\n"
                                       "(B) equal to the total mass of the products\n(C) equal to the mass of AgCl\n"
                                       "(D) less than the mass of AgCl")


def test_save_to_disk_folders_and_splits(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "mmlu" / "test.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert load("mmlu", tmp_path / "single") == load("mmlu", FIXTURES / "mmlu")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows),
                          "dev": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load("mmlu", tmp_path / "dict", split="dev")) == 1
    with pytest.raises(BenchmarkDataError, match=r"has splits \['dev', 'test'\]; set `split:`"):
        load("mmlu", tmp_path / "dict")


def test_folders_read_every_data_file_split_picks_by_name(tmp_path):
    """A hub snapshot layout: <config>/<split>-00000-of-00001.jsonl; hidden folders (caches) are skipped."""
    rows = (FIXTURES / "mmlu" / "test.jsonl").read_text().splitlines()
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "test-00000-of-00001.jsonl").write_text("\n".join(rows[:2]) + "\n")
    (tmp_path / "all" / "dev-00000-of-00001.jsonl").write_text(rows[2] + "\n")
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads" / "junk.json").write_text("not json")
    assert [e.task for e in load("mmlu", tmp_path)] == ["virology", "abstract_algebra", "abstract_algebra"]
    assert [e.id for e in load("mmlu", tmp_path, split="test")] == ["abstract_algebra-0", "abstract_algebra-1"]
    with pytest.raises(BenchmarkDataError, match="for split 'validation'"):
        load("mmlu", tmp_path, split="validation")


def test_procedural_heldout_reads_the_sources_artifact(tmp_path):
    from orca_core.sources.schema import to_table, write_table

    row = {"id": "abc", "inputs": "What is 2 + 3?", "targets": "5", "task_source": "CoT", "task_name": "arithmetic",
           "template_type": "zs_opt", "sub_collection": "cot", "split": "heldout", "answer": "5", "options": [],
           "multiple_choice": False, "source": "procedural", "generator": "basic_arithmetic", "metadata": '{"x": 1}'}
    write_table(to_table([row, {**row, "id": "def", "task_name": "weekday", "options": ["Monday", "Tuesday"],
                                "answer": "Monday", "generator": "", "metadata": "{}"}]), tmp_path / "heldout.parquet")
    first, second = load_benchmark(BenchmarkSpec(name="procedural-heldout"), tmp_path)
    assert first == Example("procedural-heldout", "arithmetic", "abc", "What is 2 + 3?", "5", "procedural",
                            generator="basic_arithmetic", metadata='{"x": 1}', question="What is 2 + 3?")
    assert (second.task, second.options, second.gold) == ("weekday", ("Monday", "Tuesday"), "Monday")
    with pytest.raises(BenchmarkDataError, match="sources_dir"):
        load_benchmark(BenchmarkSpec(name="procedural-heldout"))


def test_tasks_and_limit_take_the_first_n_per_task():
    spec = {"tasks": ["date_understanding", "sports_understanding"], "limit": 1}
    examples = load("bbh", FIXTURES / "bbh", **spec)
    assert [e.id for e in examples] == ["date_understanding-0", "sports_understanding-0"]
    assert [e.id for e in load("bbh", FIXTURES / "bbh", limit=1)] == [f"{t}-0" for t in (
        "boolean_expressions", "date_understanding", "multistep_arithmetic_two", "sports_understanding")]
    with pytest.raises(BenchmarkDataError, match=r"tasks \['navigate'\] are not in the data .*date_understanding"):
        load("bbh", FIXTURES / "bbh", tasks=["navigate"])


def test_digest_covers_every_field():
    examples = load("drop", FIXTURES / "drop" / "processed.jsonl")
    digest = examples_digest(examples)
    assert digest == examples_digest(load("drop", FIXTURES / "drop" / "processed.jsonl"))
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    changed = [examples[0], examples[1], Example(**{**examples[2].__dict__, "aliases": examples[2].aliases[:1]})]
    assert examples_digest(changed) != digest
    assert examples_digest(examples[:2]) != digest


# -- specs and suites ------------------------------------------------------------


def test_spec_validation():
    BenchmarkSpec(name="gsm8k", dataset="openai/gsm8k", subset="main", split="test")
    for bad in ({"name": "gsm8k"}, {"name": "gsm8k", "path": "a", "dataset": "b"},
                {"name": "procedural-heldout", "path": "a"}, {"name": "mmlu", "path": "a", "limit": 0},
                {"name": "mmlu", "path": "a", "subset": "x"}, {"name": "mmlu", "path": "a", "lmit": 3},
                {"name": "hellaswag", "path": "a"}):
        with pytest.raises(ValidationError):
            BenchmarkSpec(**bad)


def test_suite_specs(tmp_path):
    assert suite_specs("procedural-heldout", tmp_path) == [BenchmarkSpec(name="procedural-heldout")]
    specs = suite_specs("real-offline", tmp_path)
    assert [(s.name, Path(s.path).relative_to(tmp_path).as_posix()) for s in specs] == [
        ("gsm8k", "gsm8k/test.jsonl"), ("bbh", "bbh"), ("drop", "drop/validation.jsonl"),
        ("crass", "crass/task.json"), ("mmlu", "mmlu"), ("arc-challenge", "arc-challenge")]
    with pytest.raises(ValueError, match=r"unknown eval suite 'real'.*procedural-heldout, real-offline"):
        suite_specs("real", tmp_path)


# -- errors ----------------------------------------------------------------------


def test_missing_field_names_file_line_and_field():
    path = FIXTURES / "bad" / "gsm8k_missing_answer.jsonl"
    with pytest.raises(BenchmarkDataError, match=rf"^{re.escape(str(path))}:2: missing field 'answer'"):
        load("gsm8k", path)


@pytest.mark.parametrize("name, content, message", [
    ("gsm8k", '{"question": "q", "answer": "#### 1"}\n{"question": \n', r"bad\.jsonl:2: invalid JSON"),
    ("gsm8k", '{"question": "q", "answer": "it is 4"}\n', r"bad\.jsonl:1: field 'answer' has no final '#### <number>'"),
    ("bbh", '{"input": "Q?\\nOptions:\\n(A) x\\n(B) y", "target": "(C)", "task": "snarks"}\n',
     r"bad\.jsonl:1: field 'target' should name one of 2 options"),
    ("bbh", '{"input": "Q?", "target": "x"}\n', r"bad\.jsonl:1: BBH task 'bad' is unknown"),
    ("arc-challenge", '{"id": "a", "question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, '
                      '"answerKey": "E"}\n', r"bad\.jsonl:1: field 'answerKey' is not one of the labels"),
    ("mmlu", '{"question": "q", "subject": "s", "choices": ["x", "y"], "answer": 7}\n',
     r"bad\.jsonl:1: field 'answer' should name one of 2 options"),
    ("race", '{"example_id": "e", "article": "a", "question": "q", "options": "x", "answer": "A"}\n',
     r"bad\.jsonl:1: field 'options' should be list, got str"),
    ("drop", '{"query_id": "q1", "passage": "p", "question": "q"}\n',
     r"bad\.jsonl:1: missing field 'answers_spans' \(ucinlp/drop\) or 'answers'"),
    ("drop", '{"query_id": "q1", "passage": "p", "question": "q", "answers": [["a"]]}\n'
             '{"query_id": "q1", "passage": "p", "question": "q", "answers": [["b"]]}\n',
     r"bad\.jsonl:2: duplicate drop id 'q1' \(first at .*bad\.jsonl:1\)"),
])
def test_bad_rows_fail_with_file_row_and_field(tmp_path, name, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(BenchmarkDataError, match=message):
        load(name, tmp_path / "bad.jsonl")


def test_bad_paths(tmp_path):
    with pytest.raises(BenchmarkDataError, match=r"benchmark mmlu: .*nowhere does not exist"):
        load("mmlu", tmp_path / "nowhere")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(BenchmarkDataError, match=r"data\.csv: unsupported file type"):
        load("mmlu", tmp_path / "data.csv")
    with pytest.raises(BenchmarkDataError, match=r"holds no .*\.parquet files or saved datasets"):
        load("mmlu", tmp_path)
    (tmp_path / "task.json").write_text('{"name": "x"}')
    with pytest.raises(BenchmarkDataError, match=r"task\.json: expected \{\"examples\": \[...\]\}"):
        load("crass", tmp_path / "task.json")


def test_hub_dataset_offline_gives_a_clear_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = BenchmarkSpec(name="gsm8k", dataset="openai/gsm8k", subset="main", split="test")
    with pytest.raises(BenchmarkDataError) as caught:
        load_benchmark(spec)
    message = str(caught.value)
    assert "benchmark gsm8k: cannot load dataset 'openai/gsm8k' (main)" in message
    assert "`path:`" in message and "make bench-data" in message


# -- the BBH generators ported from BIG-bench -------------------------------------


def test_bbh_generated_tasks_are_right_and_reproducible(monkeypatch):
    import random

    booleans = bbh_sources.boolean_expressions(random.Random(1))
    assert len(booleans) == len({b["input"] for b in booleans}) == 250
    assert booleans == bbh_sources.boolean_expressions(random.Random(1))
    for example in booleans:
        tokens = example["input"].removesuffix(" is").split()
        assert len(tokens) == 8 and set(tokens) <= {"True", "False", "and", "or", "not", "(", ")"}
    monkeypatch.setattr(bbh_sources, "CAP", 10**6)  # every expression of the grammar
    every = {e["input"]: e["target"] for e in bbh_sources.boolean_expressions(random.Random(1))}
    assert every["not ( True ) and ( True ) is"] == "False"  # BBH's own first example
    assert every["True and not not ( not False ) is"] == "True"
    monkeypatch.undo()
    for example in bbh_sources.multistep_arithmetic_two(random.Random(2)):
        assert re.fullmatch(r"\(\((-?\d [-+*] ){3}-?\d\) [-+*] \((-?\d [-+*] ){3}-?\d\)\) =", example["input"])
        assert int(example["target"]) == _arithmetic(example["input"].removesuffix(" ="))
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus"]
    for example in bbh_sources.web_of_lies(random.Random(3), names):
        assert example["target"] == _resolve_web_of_lies(example["input"])


def _arithmetic(text: str) -> int:
    """Evaluate + - * with precedence, without eval (an independent check)."""
    while "(" in text:
        text = re.sub(r"\(([^()]*)\)", lambda m: str(_arithmetic(m.group(1))), text)
    terms, sign = [], 1
    for chunk in re.split(r" ([-+]) ", text):
        if chunk in "+-":
            sign = 1 if chunk == "+" else -1
            continue
        product = 1
        for factor in chunk.split(" * "):
            product *= int(factor)
        terms.append(sign * product)
    return sum(terms)


def _resolve_web_of_lies(text: str) -> str:
    truthful: dict[str, bool] = {}
    for sentence in text.removeprefix("Question: ").split(". "):
        if m := re.fullmatch(r"(\w+) (tells the truth|lies)\.?", sentence):
            truthful[m.group(1)] = m.group(2) == "tells the truth"
        elif m := re.fullmatch(r"(\w+) says (\w+) (tells the truth|lies)\.?", sentence):
            truthful[m.group(1)] = truthful[m.group(2)] == (m.group(3) == "tells the truth")
    last = re.search(r"Does (\w+) tell the truth\?", text).group(1)
    return "Yes" if truthful[last] else "No"


def test_bbh_lettered_options_keep_one_right_answer():
    example = {"target_scores": {"circle": 1, "kite": 0, "ellipse": 1}, "target": "circle"}
    assert bbh_sources._lettered("draws a ", example) == ("draws a\nOptions:\n(A) circle\n(B) kite", "(A)")
    counts = {"target_scores": {"0": 0, "zero": 0, "1": 1, "one": 1, "2": 0, "two": 0}}
    assert bbh_sources._lettered("How many?", counts) == ("How many?\nOptions:\n(A) zero\n(B) one\n(C) two", "(B)")


# -- the real offline data (bench-data/, made by `make bench-data`) ---------------


@pytest.fixture(scope="module")
def bench_dir() -> Path:
    folder = REPO / "bench-data"
    if not (folder / "SOURCES.json").exists():
        pytest.fail(f"{folder} is missing: run `make bench-data` (python -m orca_core.eval.bench_data)")
    return folder


@pytest.fixture(scope="module")
def real(bench_dir) -> dict[str, list[Example]]:
    return {spec.name: load_benchmark(spec) for spec in suite_specs("real-offline", bench_dir)}


def test_real_counts(real):
    assert {name: len(examples) for name, examples in real.items()} == {
        "gsm8k": 1319, "bbh": 6518, "drop": 1000, "crass": 44, "mmlu": 14042, "arc-challenge": 299}
    assert len({e.task for e in real["mmlu"]}) == 57
    bbh_tasks = {e.task for e in real["bbh"]}
    assert bbh_tasks == set(BBH_TASKS) and len(bbh_tasks) == 27
    per_task = {t: sum(e.task == t for e in real["bbh"]) for t in bbh_tasks}
    assert max(per_task.values()) == 250
    assert (per_task["causal_judgement"], per_task["penguins_in_a_table"], per_task["snarks"]) == (188, 149, 181)
    assert sum(bool(e.aliases) for e in real["drop"]) == 348  # 349 rows list alternatives; one repeats its gold


def test_real_examples_are_well_formed(real):
    for name, examples in real.items():
        assert len({e.id for e in examples}) == len(examples), name
        for e in examples:
            assert e.benchmark == name and e.prompt.strip() and e.gold.strip(), (name, e.id)
            if e.kind == "mc":
                assert 2 <= len(e.options) <= 26 and e.gold in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(e.options)], e.id
                block = "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(e.options))
                assert e.prompt.endswith("Options:\n" + block), e.id
            elif e.kind == "number":
                assert re.fullmatch(r"-?\d+(\.\d+)?", e.gold), e.id
            else:
                assert e.kind == "text" and name in ("bbh", "drop"), e.id
    kinds = {name: {e.kind for e in examples} for name, examples in real.items()}
    assert kinds == {"gsm8k": {"number"}, "bbh": {"mc", "text", "number"}, "drop": {"text"}, "crass": {"mc"},
                     "mmlu": {"mc"}, "arc-challenge": {"mc"}}


def test_real_bbh_gold_answers_are_spread(real):
    """No lettered BBH task may keep BIG-bench's 'correct option first' order."""
    for task in {e.task for e in real["bbh"] if e.kind == "mc"}:
        golds = [e.gold for e in real["bbh"] if e.task == task]
        assert max(golds.count(letter) for letter in set(golds)) / len(golds) < 0.6, task


def test_real_sources_json_matches_and_rerun_is_a_no_op(bench_dir, monkeypatch):
    sources = json.loads((bench_dir / "SOURCES.json").read_text())
    assert sources["config"] == bench_data.config()
    assert sources["counts"]["gsm8k"] == 1319 and sources["counts"]["mmlu_subjects"] == 57
    assert sources["counts"]["crass"] == 44 and len(sources["counts"]["bbh"]) == 27
    assert bench_data.up_to_date(bench_dir)

    def no_download(*args, **kwargs):
        raise AssertionError("an up-to-date folder must not download")
    monkeypatch.setattr(bench_data, "fetch_olmo", no_download)
    monkeypatch.setattr(bench_data, "fetch_bigbench", no_download)
    assert bench_data.build(bench_dir) == sources


def test_a_changed_file_is_not_up_to_date(bench_dir, tmp_path):
    copy = tmp_path / "bench-data"
    shutil.copytree(bench_dir, copy, ignore=shutil.ignore_patterns(".downloads", ".staging"))
    assert bench_data.up_to_date(copy)
    with open(copy / "gsm8k" / "test.jsonl", "a") as handle:
        handle.write("\n")
    assert not bench_data.up_to_date(copy)
