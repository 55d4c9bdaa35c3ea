"""The findings: stage ordering by paired differences, the verdict line, comparisons, and the findings plot."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from orca_core.eval import findings
from orca_core.eval.metrics import summarize
from orca_core.eval.strategy_usage import usage

MODELS = ["base", "flan", "orca1", "orca2"]


def _examples(right_of_100: int, system: str, tasks=("t1", "t2"), first: int = 0) -> pd.DataFrame:
    """100 examples per task: items first .. first + right_of_100 - 1 answered right."""
    return pd.DataFrame([
        {"benchmark": "procedural-heldout", "task": task, "id": f"{task}-{i}", "system_message": system,
         "prompt": "q", "output": "o", "strict": None, "flexible": None, "gold": "a",
         "correct_strict": first <= i < first + right_of_100, "correct_flexible": first <= i < first + right_of_100,
         "format_ok": True, "finish_reason": "stop", "output_tokens": 5}
        for task in tasks for i in range(100)])


def _results(rights: dict[str, int | tuple[int, int]]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(summary, per-example results) of models answering `right` (or (right, first item)) of 100 per task
    under the empty system message, and none under the cautious one."""
    frames, examples = [], {}
    for model, right in rights.items():
        right, first = right if isinstance(right, tuple) else (right, 0)
        examples[model] = pd.concat([_examples(right, "empty", first=first), _examples(0, "cautious")],
                                    ignore_index=True)
        s = summarize(examples[model], samples=300, seed=0)
        frames.append(s.assign(model=model)[["model", *s.columns]])
    return pd.concat(frames, ignore_index=True), examples


def test_each_stage_is_judged_by_its_paired_difference_with_the_one_before():
    # orca2 answers 33 items, but a different block (items 40-72) from orca1's (0-29): a noisy step.
    summary, examples = _results({"base": 0, "flan": 10, "orca1": 30, "orca2": (33, 40)})
    rows = findings.curriculum(summary, examples, MODELS, "empty", samples=1000, seed=0)
    assert [r["model"] for r in rows] == MODELS
    assert [r["accuracy"] for r in rows] == pytest.approx([0.0, 0.10, 0.30, 0.33])
    assert all(r["n"] == 200 and r["tasks"] == 2 for r in rows)
    assert [r["vs_previous"] for r in rows] == ["", "above", "above", "no difference"]
    assert rows[0]["difference"] is None and rows[2]["difference"] == pytest.approx(0.20)
    # Golden CIs (seed 0): flan vs base, orca1 vs flan (20 more right per task), orca2 vs orca1 (+33 / -30 per task).
    assert [bound for r in rows[1:] for bound in (r["difference_low"], r["difference_high"])] == pytest.approx(
        [0.06, 0.14, 0.145, 0.255, -0.075, 0.135125])
    assert [(t["task"], t["n"], t["vs"]) for t in rows[3]["by_task"]] == [("t1", 100, "no difference"),
                                                                           ("t2", 100, "no difference")]
    assert not findings.ordering_holds(rows) and findings.ordering_holds(rows[:3])
    assert findings.verdict(rows) == ("**Does not hold** (orca2 > orca1 > flan > base expected): "
                                      "orca1 -> orca2 (no difference: +3.0 [-7.5, 13.5] pts).")
    assert findings.verdict(rows[:3]) == ("**Holds**: orca1 > flan > base, every step's paired difference with a "
                                          "95% CI above 0.")
    assert findings.verdict(rows[:1]) == "Only one stage was evaluated: no ordering to check."
    header, body = findings.curriculum_table(rows)
    assert header == ["model", "accuracy % [95% CI]", "examples", "tasks", "difference vs previous, pts [95% CI]",
                      "vs previous"]
    assert body[0][2:] == ["200", "2", "", ""]
    assert body[2][0] == "orca1" and body[2][2:] == ["200", "2", "+20.0 [14.5, 25.5]", "above"]
    header, body = findings.by_task_table(rows)
    assert header == ["task", "flan vs base", "orca1 vs flan", "orca2 vs orca1"]
    assert body[0] == ["t1", "+10.0 [4.0, 16.0]", "+20.0 [12.0, 28.0]", "+3.0 [-14.0, 19.0]"] and body[1][0] == "t2"
    # A stage that got worse is "below"; the other system message is judged on its own rows.
    worse = findings.curriculum(*_results({"flan": 30, "orca1": 10}), ["flan", "orca1"], "empty")
    assert worse[1]["vs_previous"] == "below" and worse[1]["difference_high"] < 0
    assert findings.verdict(worse) == "**Does not hold** (orca1 > flan expected): flan -> orca1 (below: -20.0 [-25.5, -14.5] pts)."
    cautious = findings.curriculum(summary, examples, MODELS, "cautious")
    assert [r["accuracy"] for r in cautious] == [0.0] * 4 and [r["vs_previous"] for r in cautious[1:]] == ["no difference"] * 3


def test_overlapping_cis_with_a_paired_difference_above_zero_is_called_above():
    # orca2 gets right every item orca1 does, and 3 more per task: its accuracy CI overlaps orca1's
    # widely, yet on the same items it is never worse, and the difference's CI excludes 0.
    summary, examples = _results({"orca1": 30, "orca2": 33})
    orca1, orca2 = findings.curriculum(summary, examples, ["orca1", "orca2"], "empty", samples=1000, seed=0)
    assert orca2["low"] < orca1["high"]  # the unpaired intervals overlap
    assert [orca2["difference"], orca2["difference_low"], orca2["difference_high"]] == pytest.approx([0.03, 0.01, 0.055])
    assert orca2["vs_previous"] == "above"
    assert findings.ordering_holds([orca1, orca2])


def test_identical_models_differ_by_zero_and_are_not_called():
    summary, examples = _results({"orca1": 30, "orca2": 30})
    step = findings.curriculum(summary, examples, ["orca1", "orca2"], "empty")[1]
    assert (step["difference"], step["difference_low"], step["difference_high"], step["vs_previous"]) == (
        0.0, 0.0, 0.0, "no difference")
    assert findings.curriculum_table([step, step])[1][1][4] == "+0.0 [0.0, 0.0]"


def test_two_recipes_final_stages_are_paired_on_the_items_both_answered():
    a = findings.final_stage(_results({"orca2": 40})[0], "orca2", "empty")
    assert (a["model"], a["accuracy"], a["n"], a["tasks"]) == ("orca2", 0.4, 200, 2)
    with pytest.raises(ValueError, match="no 'empty' results for model 'orca9'"):
        findings.final_stage(_results({"orca2": 40})[0], "orca9", "empty")
    explained = _examples(40, "empty")
    answers = _examples(20, "cautious")  # the control's headline message differs: paired on the item
    step = findings.paired(explained, answers, ("empty", "cautious"), samples=1000, seed=0)
    assert (step["difference"], step["vs"], step["pairs"], step["only_a"], step["only_b"]) == (0.2, "above", 200, 0, 0)
    assert [step["difference_low"], step["difference_high"]] == pytest.approx([0.145, 0.255])
    fewer = answers[answers["id"] != "t2-99"]
    with pytest.raises(ValueError, match=r"task 't2', system message 'empty': 1 id\(s\) only in tiny, 0 only in control"):
        findings.paired(explained, fewer, ("empty", "cautious"), names=("tiny", "control"))
    step = findings.paired(explained, fewer, ("empty", "cautious"), intersect=True)
    assert (step["pairs"], step["only_a"], step["only_b"]) == (199, 1, 0)
    with pytest.raises(ValueError, match="no items in common"):
        findings.paired(explained, answers, ("empty", "native"), intersect=True)


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
    summary, examples = _results({"base": 0, "flan": 10, "orca1": 30, "orca2": 45})
    curricula = {m: findings.curriculum(summary, examples, MODELS, m) for m in ("empty", "cautious")}
    findings.plot(curricula, "empty", table, "cautious", tmp_path / "findings.png")
    findings.plot(curricula, "empty", None, None, tmp_path / "alone.png")
    wide, narrow = Image.open(tmp_path / "findings.png"), Image.open(tmp_path / "alone.png")
    assert wide.size[0] > 1.8 * narrow.size[0] and narrow.size[1] == wide.size[1]


def _budget(control_tokens: int) -> dict:
    """tiny-like arms: the same steps; the main arm's 2 stages 1,000 + 3,000 non-pad tokens."""
    main = {"flan": {"steps": 2, "tokens": 1000, "label_tokens": 100},
            "orca2": {"steps": 6, "tokens": 3000, "label_tokens": 1500}}
    control = {"flan": main["flan"], "orca2": {"steps": 6, "tokens": control_tokens - 1000, "label_tokens": 150}}
    return findings.token_budget(main, control)


def test_tokens_trained_and_the_budget_of_both_arms():
    metrics = pd.DataFrame({"step": [1, 2, 3], "tokens": [4000, 3900, 4096], "label_tokens": [900, 850, 1000]})
    assert findings.tokens_trained(metrics) == {"steps": 3, "tokens": 11996, "label_tokens": 2750}
    with pytest.raises(ValueError, match=r"no column\(s\) \['label_tokens'\]"):
        findings.tokens_trained(metrics.drop(columns="label_tokens"))
    budget = _budget(4060)
    assert budget["main"] == {"steps": 8, "tokens": 4000, "label_tokens": 1600}
    assert budget["control"] == {"steps": 8, "tokens": 4060, "label_tokens": 250}
    assert budget["difference"] == pytest.approx(0.015) and budget["matched"]
    assert not _budget(4100)["matched"] and not _budget(3900)["matched"]  # 2.5% apart: not the same budget
    assert findings.budget_table(budget)[1] == [
        ["main", "flan", "2", "1,000", "100"], ["main", "orca2", "6", "3,000", "1,500"],
        ["control", "flan", "2", "1,000", "100"], ["control", "orca2", "6", "3,060", "150"],
        ["main", "total", "8", "4,000", "1,600"], ["control", "total", "8", "4,060", "250"]]
    with pytest.raises(ValueError, match="different stages"):
        findings.token_budget({"flan": budget["main"]}, {"orca2": budget["main"]})


def test_explanations_beat_answers_only_when_paired_above_zero_at_the_same_budget():
    explained, answers = _examples(40, "empty"), _examples(20, "empty")
    names = ("orca2", "tiny-answers-only/orca2")
    same = findings.explanations_vs_answers(explained, answers, "empty", _budget(4060), names=names)
    assert (same["difference"], same["vs"], same["pairs"], same["holds"]) == (0.2, "above", 200, True)
    assert [same["difference_low"], same["difference_high"]] == pytest.approx([0.145, 0.255])  # golden, seed 0
    assert findings.control_verdict(same) == (
        "**Holds**: orca2 is +20.0 [14.5, 25.5] pts above its answers-only control tiny-answers-only/orca2 on the "
        "same 200 items (95% CI above 0); non-pad training tokens 4,000 (explanations) vs 4,060 (answers only), "
        "+1.5%: the same budget within 2%.")
    assert findings.control_table(same) == (
        ["task", "items", "orca2 - answers only, pts [95% CI]", "call"],
        [["t1", "100", "+20.0 [12.0, 28.0]", "above"], ["t2", "100", "+20.0 [12.0, 28.0]", "above"],
         ["all (macro)", "200", "+20.0 [14.5, 25.5]", "above"]])  # per family: 20 more right of 100 each
    # the control saw 5% fewer tokens: not the same budget, and the finding does not hold
    fewer = findings.explanations_vs_answers(explained, answers, "empty", _budget(3800), names=names)
    assert not fewer["holds"] and findings.control_verdict(fewer) == (
        "**Does not hold**: orca2 vs its answers-only control tiny-answers-only/orca2: the control trained on fewer "
        "tokens (difference +20.0 [14.5, 25.5] pts); non-pad training tokens 4,000 (explanations) vs 3,800 "
        "(answers only), -5.0%: the budgets differ by more than 2%.")
    more = findings.explanations_vs_answers(explained, answers, "empty", _budget(4400), names=names)
    assert more["holds"] and "+10.0%: the budgets differ by more than 2%." in findings.control_verdict(more)
    tie = findings.explanations_vs_answers(answers, answers, "empty", _budget(4000), names=names)
    assert (tie["difference"], tie["vs"], tie["holds"]) == (0.0, "no difference", False)
    assert "the paired difference is +0.0 [0.0, 0.0] pts (no difference)" in findings.control_verdict(tie)


def test_strategy_verdict_holds_when_every_family_follows_its_teacher():
    follows = {"families": 4, "student_strategies": 3, "teacher_strategies": 3, "follows": 0.8125,
               "families_following": 4, "n": 1000}
    assert findings.strategy_holds(follows)
    assert findings.strategy_verdict(follows, "orca2", "native") == (
        "**Holds**: given only the generic system message (native), orca2 answers in each of the 4 families mostly "
        "in the shape of the strategy its teacher used there (81.2% of its 1000 answers in the teacher's shape; "
        "3 strategies across families, the teacher 3).")
    three = {**follows, "families_following": 3}
    assert not findings.strategy_holds(three)
    assert findings.strategy_verdict(three, "orca2", "native") == (
        "**Does not hold**: orca2's most used shape is the teacher's in 3 of 4 families (81.2% of its 1000 answers "
        "in the teacher's shape, native system message).")
    assert not findings.strategy_holds({**follows, "families": 0, "families_following": 0})


def test_the_findings_plot_shows_the_control_per_family(tmp_path):
    summary, examples = _results({"flan": 10, "orca1": 30, "orca2": 45})
    curricula = {"empty": findings.curriculum(summary, examples, MODELS[1:], "empty")}
    control = findings.explanations_vs_answers(_examples(40, "empty"), _examples(20, "empty"), "empty", _budget(4060),
                                               names=("orca2", "answers/orca2"))
    findings.plot(curricula, "empty", None, None, tmp_path / "two.png", control)
    findings.plot(curricula, "empty", None, None, tmp_path / "one.png")
    two, one = Image.open(tmp_path / "two.png"), Image.open(tmp_path / "one.png")
    assert two.size[0] > 1.8 * one.size[0] and two.size[1] == one.size[1]
