"""The findings: stage ordering with separate CIs, the verdict line, comparisons, and the findings plot."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from orca_core.eval import findings
from orca_core.eval.metrics import summarize
from orca_core.eval.strategy_usage import usage

MODELS = ["base", "flan", "orca1", "orca2"]


def _examples(right_of_100: int, system: str, tasks=("t1", "t2")) -> pd.DataFrame:
    """100 examples per task, the first `right_of_100` answered right."""
    return pd.DataFrame([
        {"benchmark": "procedural-heldout", "task": task, "id": f"{task}-{i}", "system_message": system,
         "prompt": "q", "output": "o", "strict": None, "flexible": None, "gold": "a", "correct_strict": i < right_of_100,
         "correct_flexible": i < right_of_100, "format_ok": True, "finish_reason": "stop", "output_tokens": 5}
        for task in tasks for i in range(100)])


def _summary(rights: dict[str, int]) -> pd.DataFrame:
    frames = []
    for model, right in rights.items():
        for system in ("empty", "cautious"):
            s = summarize(_examples(right if system == "empty" else 0, system), samples=300, seed=0)
            frames.append(s.assign(model=model)[["model", *s.columns]])
    return pd.concat(frames, ignore_index=True)


def test_each_stage_is_compared_with_the_one_before_and_the_verdict_says_whether_all_are_separate():
    summary = _summary({"base": 0, "flan": 10, "orca1": 30, "orca2": 33})
    rows = findings.curriculum(summary, MODELS, "empty")
    assert [r["model"] for r in rows] == MODELS
    assert [r["accuracy"] for r in rows] == pytest.approx([0.0, 0.10, 0.30, 0.33])
    assert all(r["n"] == 200 and r["tasks"] == 2 for r in rows)
    assert [r["vs_previous"] for r in rows] == ["", "separate", "separate", "overlap"]
    assert rows[2]["delta"] == pytest.approx(0.20)
    assert not findings.ordering_holds(rows) and findings.ordering_holds(rows[:3])
    assert findings.verdict(rows) == ("**Does not hold** (orca2 > orca1 > flan > base expected): "
                                      "orca1 -> orca2 (overlap).")
    assert findings.verdict(rows[:3]).startswith("**Holds**: orca1 > flan > base")
    header, body = findings.curriculum_table(rows)
    assert header == ["model", "accuracy % [95% CI]", "examples", "tasks", "vs previous"]
    assert body[2][0] == "orca1" and body[2][2:] == ["200", "2", "+20.0 pts, CIs separate"]
    # A stage that got worse is "below"; the other system message is judged on its own rows.
    worse = findings.curriculum(_summary({"flan": 30, "orca1": 10}), ["flan", "orca1"], "empty")
    assert worse[1]["vs_previous"] == "below"
    assert [r["accuracy"] for r in findings.curriculum(summary, MODELS, "cautious")] == [0.0] * 4


def test_comparing_two_final_stages_uses_their_cis():
    a = findings.final_stage(_summary({"orca2": 40}), "orca2", "empty")
    b = findings.final_stage(_summary({"orca2": 20}), "orca2", "empty")
    assert findings.compare(a, b) == "separate" and findings.compare(b, a) == "below"
    assert findings.compare(a, a) == "overlap"
    with pytest.raises(ValueError, match="no 'empty' results for model 'orca9'"):
        findings.final_stage(_summary({"orca2": 40}), "orca9", "empty")


def test_strategy_summary_and_the_findings_plot(tmp_path):
    examples = pd.DataFrame({
        "task": ["arith"] * 4 + ["needle"] * 4, "system_message": ["cautious"] * 8,
        "output": ["1 + 1 = 2\n2 + 1 = 3\nSo the answer is 3."] * 3 + ["3"]
                  + ['"Jo likes tea."\nSo the answer is Jo.'] * 3 + ["Jo"]})
    traces = pd.DataFrame({"task_name": ["arith", "needle"], "strategy": ["step-by-step", "extract-generate"],
                           "response": ["1 + 1 = 2\n2 + 1 = 3\nSo the answer is 3.", '"Jo likes tea."\nSo the answer is Jo.']})
    table = usage(examples, traces)
    got = findings.strategy_summary(table, "cautious")
    assert got == {"families": 2, "student_strategies": 2, "teacher_strategies": 2, "follows": 6 / 8,
                   "families_following": 2, "n": 8}
    assert findings.strategy_summary(table, "empty")["families"] == 0
    header, body = findings.strategy_table(table, "cautious")
    assert body == [["arith", "step-by-step", "step-by-step", "step-by-step", "75.0%", "4"],
                    ["needle", "extract-generate", "extract-generate", "extract-generate", "75.0%", "4"]]
    summary = _summary({"base": 0, "flan": 10, "orca1": 30, "orca2": 45})
    curricula = {m: findings.curriculum(summary, MODELS, m) for m in ("empty", "cautious")}
    findings.plot(curricula, "empty", table, "cautious", tmp_path / "findings.png")
    findings.plot(curricula, "empty", None, None, tmp_path / "alone.png")
    wide, narrow = Image.open(tmp_path / "findings.png"), Image.open(tmp_path / "alone.png")
    assert wide.size[0] > 1.8 * narrow.size[0] and narrow.size[1] == wide.size[1]
