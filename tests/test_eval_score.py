"""Strict and flexible extraction per benchmark kind: golden values."""

from __future__ import annotations

import pytest

from orca_core.eval.benchmarks import Example
from orca_core.eval.score import letter_of, normalize_text, score


def ex(kind: str, gold: str, options: tuple[str, ...] = (), aliases: tuple[str, ...] = ()) -> Example:
    return Example(benchmark="b", task="t", id="1", prompt="q", gold=gold, kind=kind, options=options, aliases=aliases)


GSM = ex("number", "18")


@pytest.mark.parametrize("output, strict, flexible, ok_strict, ok_flexible", [
    ("She sells 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18", "18", True, True),
    ("9 * 2 = 18. The answer is 18.", "18", "18", True, True),
    ("The answer is $1,018.", "1,018", "1,018", False, False),
    ("She makes 9 * 2 = 18 dollars a day.", None, "18", False, True),  # strict fails, flexible finds it
    ("Answer: 18.0", "18.0", "18.0", True, True),
    ("I am not sure.", None, None, False, False),
    ("#### 17\nwait, 18", "17", "18", False, True),
])
def test_number_strict_reads_only_answer_statements_flexible_takes_the_last_number(output, strict, flexible, ok_strict, ok_flexible):
    got = score(GSM, output)
    assert (got.strict, got.flexible, got.correct_strict, got.correct_flexible) == (strict, flexible, ok_strict, ok_flexible)
    assert got.format_ok == (strict is not None)


MC = ex("mc", "B", options=("Paris", "Lyon", "Nice", "Lille"))


@pytest.mark.parametrize("output, strict, flexible", [
    ("B", "B", "B"),
    ("(B)", "B", "B"),
    ("The answer is (B).", "B", "B"),
    ("The answer is Lyon.", "B", "B"),
    ("Answer: b", None, None),  # lower case is not an option letter
    ("Lyon is in the south-east, so (B) it is.", None, "B"),
    ("I think Lyon.", None, "B"),  # flexible: the option's text
    ("Between A and B... hmm", None, "A"),  # no option named: AGIEval's first lone capital letter
    ("It must be B because C is wrong", None, "B"),
    ("(E)", None, None),  # out of range: not an option
    ("no idea", None, None),
])
def test_mc_answers_become_option_letters(output, strict, flexible):
    got = score(MC, output)
    assert (got.strict, got.flexible) == (strict, flexible)
    assert got.correct_strict == (strict == "B") and got.correct_flexible == (flexible == "B")


def test_mc_first_lone_capital_is_the_last_resort():
    got = score(ex("mc", "C", options=("x1", "x2", "x3")), "I pick C, final.")
    assert got.flexible == "C" and got.correct_flexible and got.strict is None


def test_letter_of_maps_text_and_letters():
    assert letter_of("(C) Nice", MC.options) == "C"
    assert letter_of("Nice", MC.options) == "C"
    assert letter_of("Marseille", MC.options) is None
    assert letter_of(None, MC.options) is None


def test_text_answers_compare_after_drop_normalization_and_aliases():
    drop = ex("text", "the Swedish", aliases=("swedes",))
    assert score(drop, "So the answer is Swedish.").correct_strict
    assert score(drop, "Swedes").correct_flexible and score(drop, "Swedes").strict is None
    assert not score(drop, "The answer is Germans.").correct_strict
    assert score(ex("text", "3"), "The answer is three, i.e. 3.0").correct_strict is False  # "three, i.e. 3.0" != 3
    assert score(ex("text", "3"), "The answer is 3.0.").correct_strict
    assert normalize_text("The  U.S.A.!") == "usa"


def test_bbh_free_form_targets():
    assert score(ex("text", "False"), "not True is False. So the answer is False.").correct_strict
    assert score(ex("text", "Yes"), "Fidel tells the truth.\nYes").correct_flexible


def test_procedural_rows_use_the_generator_scorer():
    row = Example(benchmark="procedural-heldout", task="basic_arithmetic", id="x", prompt="Calculate 3 + 4.", gold="7",
                  kind="procedural", generator="basic_arithmetic", metadata="{}", question="Calculate 3 + 4.")
    assert score(row, "3 + 4 = 7. The answer is 7.").correct_strict
    assert not score(row, "The answer is 8.").correct_strict


def test_an_unknown_kind_names_the_example():
    with pytest.raises(ValueError, match="b/1: unknown example kind 'essay'"):
        score(ex("essay", "x"), "y")
