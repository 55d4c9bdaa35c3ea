"""Reading the strategy off an answer: on the oracle's own renders, and the per-task usage table."""

from __future__ import annotations

import pandas as pd
import pytest

from orca_core.eval.strategy_usage import SHAPES, distinct_strategies, strategy_of, usage
from orca_core.prompts import STRATEGIES, followup_messages, join_turns
from orca_core.recipe.models import OracleSettings
from orca_core.sources.procedural import generate_suite
from orca_oracle.solver import OracleBook, respond

FAMILIES = ["basic_arithmetic", "needle_haystack", "syllogism", "leg_counting", "spell_backward"]


@pytest.fixture(scope="module")
def rows():
    train, _, _ = generate_suite(FAMILIES, 6, 0, seed=0)
    return train


def teacher_answer(book: OracleBook, row: dict, strategy: str) -> str:
    """What the oracle teacher writes under a strategy (every call of a multi-call one, joined)."""
    spec, turns = STRATEGIES[strategy], []
    for _ in range(1 + len(spec.followups)):
        turns.append(respond(book, "oracle-strong", OracleSettings(error_rate=0.0), followup_messages(spec, row["inputs"], turns)))
    return join_turns(turns)


def test_every_strategy_of_the_oracle_is_recognised_on_tasks_whose_steps_do_not_quote(rows):
    book = OracleBook(rows)
    for row in rows:
        if row["task_name"] in ("needle_haystack",):  # its steps quote the text: see the next test
            continue
        for strategy in SHAPES:
            assert strategy_of(teacher_answer(book, row, strategy)) == strategy, (row["task_name"], strategy)


def test_the_student_is_compared_with_the_teachers_shape_per_task(rows):
    book = OracleBook(rows)
    told = {"basic_arithmetic": "step-by-step", "needle_haystack": "extract-generate", "syllogism": "explain-then-answer",
            "leg_counting": "recall-reason-generate", "spell_backward": "direct-answer"}
    traces = pd.DataFrame([{"task_name": r["task_name"], "strategy": told[r["task_name"]],
                            "response": teacher_answer(book, r, told[r["task_name"]])} for r in rows])
    # A student that copies the teacher under the generic message, and answers tersely with an empty one.
    examples = pd.DataFrame(
        [{"task": r["task_name"], "system_message": "cautious", "output": teacher_answer(book, r, told[r["task_name"]])} for r in rows]
        + [{"task": r["task_name"], "system_message": "empty", "output": "42"} for r in rows])
    table = usage(examples, traces)
    cautious = table[table.system_message == "cautious"].set_index("task")
    assert (cautious.follows == 1.0).all() and list(cautious.instructed) == [told[t] for t in cautious.index]
    assert distinct_strategies(table, "cautious") == 5 and distinct_strategies(table, "empty") == 1
    empty = table[table.system_message == "empty"].set_index("task")
    assert empty.loc["spell_backward", "follows"] == 1.0 and empty.loc["syllogism", "follows"] == 0.0
    assert set(table.n) == {6}
