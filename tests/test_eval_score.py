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
    ("Between A and B... hmm", None, None),  # letters without answer context name no option
    ("It must be B because C is wrong", None, "B"),
    ("(E)", None, None),  # out of range: not an option
    ("no idea", None, None),
])
def test_mc_answers_become_option_letters(output, strict, flexible):
    got = score(MC, output)
    assert (got.strict, got.flexible) == (strict, flexible)
    assert got.correct_strict == (strict == "B") and got.correct_flexible == (flexible == "B")


def test_mc_a_picked_letter_is_flexible_only():
    got = score(ex("mc", "C", options=("x1", "x2", "x3")), "I pick C, final.")
    assert got.flexible == "C" and got.correct_flexible and got.strict is None


TEN = ex("mc", "I", options=tuple(f"x{i}" for i in range(10)))  # letters A-J: "I" is an option too


@pytest.mark.parametrize("output, letter", [
    ("I", "I"), ("B.", "B"), ("(B)", "B"), ("**B**", "B"), ("Answer: (B)", "B"),
    ("Let me think it through.\nI", "I"),  # a lone letter as the last line
    ("Let me think it through.\n**(D).**", "D"),
    ("The answer is A.", "A"), ("The answer is B because C is wrong.", "B"), ("answer: B", "B"),
    ("Final answer - G", "G"), ("The correct option is (B), not (C).", "C"),  # the last option named
    ("B) x1 fits best.", "B"), ("I'd go with option B.", "B"), ("Option (C) fits.", "C"), ("choice B", "B"),
    ("I choose H, since the rest fail.", "H"), ("The best one is **E** here.", "E"), ("J is correct.", "J"),
    ("I think it is (C)", "C"), ("It must be B because C is wrong", "B"),
])
def test_mc_letters_in_answer_context(output, letter):
    assert score(TEN, output).flexible == letter


@pytest.mark.parametrize("output", [
    "A change is physical when the substance stays the same.",
    "I think the question is tricky.\nI am not sure.",
    "A careful reading helps.\nA question like this needs care.",
    "Answer: A change of state.",  # the statement's text starts with the article
    "The answer is I think unclear.", "Between A and B... hmm", "Plan B would fail. Vitamin C helps. H2O boils.",
    "A: the first speaker says hello.", "It is a fact that I am here.",
])
def test_mc_sentence_openers_are_not_option_letters(output):
    got = score(TEN, output)
    assert (got.strict, got.flexible) == (None, None)


def test_a_letter_keeps_naming_its_own_option_when_two_read_the_same():
    twins = ex("mc", "C", options=("Up", "Down", "Up"))  # as in MMLU's high_school_macroeconomics-183
    assert score(twins, "The answer is C because the rest fail.").correct_strict
    assert letter_of("C) Up", twins.options) == "C" and letter_of("Up", twins.options) == "A"


def test_bbh_letters_reach_r_without_the_pronoun():
    bbh = ex("mc", "R", options=tuple(f"o{i}" for i in range(18)))  # (A)-(R), as in BBH's geometric tasks
    assert score(bbh, "So the answer is (R).").correct_strict
    assert score(bbh, "I count the sides first. I get R.").flexible is None  # "get R" is no answer context
    assert score(bbh, "I count the sides first.\nR").flexible == "R"


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
