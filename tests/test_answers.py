"""Answer extraction and correctness, including the real gold answers of every procedural family."""

from __future__ import annotations

import pytest

from orca_core.answers import extract, is_correct, normalize
from orca_core.sources.procedural import generate_suite
from orca_core.sources.suite import SUITE


@pytest.fixture(scope="module")
def suite_rows():
    train, _, _ = generate_suite(None, 10, 0, seed=0)
    return train


def _check(row, answer: str | None) -> bool:
    return is_correct(answer, row["answer"], options=row["options"], generator=row["generator"],
                      metadata=row["metadata"], question=row["inputs"])


def _wrong(row) -> str:
    if row["options"]:
        return next(o for o in row["options"] if o != row["answer"])
    return str(int(row["answer"]) + 1) if row["answer"].isdigit() else row["answer"] + "xq"


def test_every_family_gold_round_trips(suite_rows):
    assert {r["task_name"] for r in suite_rows} == set(SUITE)
    for row in suite_rows:
        got = extract(f"Some reasoning.\nSo the answer is {row['answer']}.", row["options"])
        assert got.format_ok, row["task_name"]
        assert _check(row, got.strict), (row["task_name"], row["answer"], got)
        assert _check(row, got.flexible), (row["task_name"], row["answer"], got)


def test_every_family_wrong_answer_is_wrong(suite_rows):
    for row in suite_rows:
        got = extract(f"Some reasoning.\nSo the answer is {_wrong(row)}.", row["options"])
        assert not _check(row, got.flexible), (row["task_name"], row["answer"], got)


def test_direct_answer_is_flexible_only(suite_rows):
    for row in suite_rows:
        got = extract(row["answer"], row["options"])
        assert got.strict is None and not got.format_ok
        assert _check(row, got.flexible), (row["task_name"], row["answer"], got)


@pytest.mark.parametrize("text, strict", [
    ("Step 1: 2 + 2 = 4.\nSo the answer is 4.", "4"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("Hence $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("Therefore the final answer is \\boxed{12}.", "12"),
    ("**Answer:** Paris", "Paris"),
    ("**Answer**: `Paris`", "Paris"),
    ("Answer: \"Paris\".", "Paris"),
    ("The answer is 3.5.", "3.5"),
    ("So the answer is 42. I hope this helps!", "42"),
    ("The answer is 3. Wait, I misread.\nThe answer is 4.", "4"),
    ("Answer: 7\nOn reflection, the answer is 8.", "8"),
])
def test_strict_statements(text, strict):
    got = extract(text)
    assert got.strict == strict and got.flexible == strict


@pytest.mark.parametrize("text", ["I worked it out on paper.", "", "The sum is 12", "answers vary"])
def test_no_statement_means_no_strict(text):
    assert extract(text).strict is None


@pytest.mark.parametrize("text, flexible", [
    ("Adding them gives 3 + 4 = 7 apples", "7"),
    ("First 12.\nThen 1,200 in total", "1,200"),
    ("The trip takes 05:02", "05:02"),
    ("e7", "e7"),  # a bare answer stays whole even with a digit in it
    ("lemraC", "lemraC"),
    ("Paris.\n\n", "Paris"),
])
def test_flexible_fallback(text, flexible):
    assert extract(text).flexible == flexible


OPTIONS = ["Monday", "Tuesday", "Thursday", "Sunday"]


@pytest.mark.parametrize("text", [
    "So the answer is (C).", "The answer is C.", "Answer: C)", "(C)", "**Answer:** C",
    "So the answer is Thursday.", "The answer is (C) Thursday.", "The answer is thursday",
    "So the answer is: it falls on a Thursday.",
])
def test_multiple_choice_maps_to_the_option(text):
    assert extract(text, OPTIONS).strict == "Thursday"


@pytest.mark.parametrize("text, strict, flexible", [
    ("(A)", "Monday", "Monday"),
    ("The answer is A.", "Monday", "Monday"),
    ("Answer: I'd go with option C.", "Thursday", "Thursday"),  # the statement names one option
    ("Counting on from the start.\nC", None, "Thursday"),
    ("A day after Wednesday is what we need.", None, None),  # the article is no option
    ("A change of one day.\nA: it falls later.", None, None),  # a last line naming none gives no option
    ("The answer is A change of plans.", "A change of plans", "A change of plans"),  # stays text, unmapped
    ("What the answer is to part 8?\nSo I pick option C.", "to part 8?", "Thursday"),  # a statement naming none
])
def test_multiple_choice_letters_need_answer_context(text, strict, flexible):
    got = extract(text, OPTIONS)
    assert (got.strict, got.flexible) == (strict, flexible)


def test_multiple_choice_flexible_takes_the_last_option_mentioned():
    text = "It is not Monday, since the offset is 3; not Sunday either. It must be Thursday"
    got = extract(text, OPTIONS)
    assert got.strict is None and got.flexible == "Thursday"


def test_multiple_choice_prefers_the_longest_option():
    options = ["mother", "mother-in-law", "grandmother"]
    assert extract("She is his mother-in-law.", options).flexible == "mother-in-law"
    assert extract("So the answer is his grandmother.", options).strict == "grandmother"


def test_ambiguous_text_stays_unmapped():
    assert extract("The answer is Monday or Sunday.", OPTIONS).strict == "Monday or Sunday"


def test_normalize():
    assert normalize("  **The  Answer**. ") == "the answer"
    assert normalize("'Paris'") == normalize("paris.")


@pytest.mark.parametrize("answer, gold", [
    ("3.0", "3"), ("1,000", "1000"), ("$1,000", "1000"), ("-2", "-2.00"), ("62 legs", "62"), ("x = 3 + 4 = 7", "7"),
])
def test_numeric_equality(answer, gold):
    assert is_correct(answer, gold)


@pytest.mark.parametrize("answer, gold", [(None, "3"), ("4", "3"), ("Lyon", "Paris"), ("", "Paris"), ("05:02", "5")])
def test_wrong_or_missing(answer, gold):
    assert not is_correct(answer, gold)


def test_text_equality_ignores_case_and_wrappers():
    assert is_correct("**paris**", "Paris")


def test_multiple_choice_correctness_by_letter_or_text():
    assert is_correct("C", "Thursday", options=OPTIONS)
    assert is_correct("thursday", "Thursday", options=OPTIONS)
    assert not is_correct("B", "Thursday", options=OPTIONS)


def test_generator_scorer_and_numeric_fallback(suite_rows):
    row = next(r for r in suite_rows if r["task_name"] == "basic_arithmetic" and len(r["answer"]) >= 4)
    assert _check(row, f"{int(row['answer']):,}")  # the scorer alone rejects "2,120"
    assert _check(row, f"{row['answer']}.0") and _check(row, f"{row['answer']} in total")
    assert not _check(row, "not a number")
    cipher = next(r for r in suite_rows if r["task_name"] == "caesar_cipher")
    assert _check(cipher, cipher["answer"]) and not _check(cipher, cipher["answer"].lower())


def test_scorer_errors_count_as_wrong():
    assert not is_correct("12:xx", "05:02", generator="time_intervals", metadata='{"task_type": "time"}')
    assert not is_correct("5", "5x", generator="no_such_generator")
