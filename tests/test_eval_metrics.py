"""Metrics: golden accuracies and CIs, the stratified macro, summarize(), and a loop-based reference bootstrap.

metrics.py draws the bootstrap's correct-counts from a binomial (exactly the distribution of
resampling 0/1 outcomes with replacement); the reference here resamples indices in a plain
Python loop, so agreement checks that equivalence, the percentile and the averaging.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from orca_core.eval.metrics import ALL_TASKS, SUITE, SUMMARY_COLUMNS, bootstrap_ci, macro_ci, suite_macro, summarize


def _percentile(values: list[float], q: float) -> float:
    """numpy's default ('linear') percentile, by hand."""
    values = sorted(values)
    position = q * (len(values) - 1)
    below = int(position)
    above = min(below + 1, len(values) - 1)
    return values[below] + (values[above] - values[below]) * (position - below)


def reference_macro(per_task: dict[str, list[int]], samples: int, seed: int, level: float = 0.95):
    """Stratified percentile bootstrap, the slow obvious way: resample each task's examples, average."""
    rng = random.Random(seed)
    stats = []
    for _ in range(samples):
        accuracies = [sum(rng.choices(values, k=len(values))) / len(values) for values in per_task.values()]
        stats.append(sum(accuracies) / len(accuracies))
    accuracy = sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)
    tail = (1 - level) / 2
    return accuracy, _percentile(stats, tail), _percentile(stats, 1 - tail)


def test_exact_accuracies_and_known_small_cis():
    assert bootstrap_ci([1, 0, 1, 1]) == (0.75, 0.25, 1.0)  # Binomial(4, .75): P(<=1) = 5.1% > 2.5%, P(4) = 32%
    assert bootstrap_ci(np.array([True, False, False, False, False]))[0] == 0.2
    assert bootstrap_ci([True] * 37) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([False] * 12) == (0.0, 0.0, 0.0)
    assert bootstrap_ci([True]) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([False]) == (0.0, 0.0, 0.0)
    assert all(np.isnan(bootstrap_ci([])))


def test_ci_contains_accuracy_and_shrinks_with_n():
    widths = []
    for n in (10, 100, 1000, 10000):
        correct = np.arange(n) % 3 != 0  # 2/3 correct
        accuracy, low, high = bootstrap_ci(correct, samples=2000)
        assert accuracy == pytest.approx(np.mean(correct))
        assert low < accuracy < high
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)
    # ~1/sqrt(n): width at n=10000 is about 3.92 * sqrt(p(1-p)/n)
    assert widths[-1] == pytest.approx(3.92 * np.sqrt(2 / 9 / 10000), rel=0.1)


def test_bootstrap_is_deterministic_under_a_seed():
    correct = np.random.default_rng(5).random(300) < 0.4
    assert bootstrap_ci(correct, seed=3) == bootstrap_ci(correct.tolist(), seed=3)
    assert bootstrap_ci(correct, seed=3) != bootstrap_ci(correct, seed=4)
    assert macro_ci({"a": correct[:100], "b": correct[100:]}, seed=7) == \
        macro_ci({"a": correct[:100], "b": correct[100:]}, seed=7)


def test_level_changes_the_interval():
    correct = np.arange(400) % 4 != 0
    _, low90, high90 = bootstrap_ci(correct, samples=4000, level=0.90)
    _, low99, high99 = bootstrap_ci(correct, samples=4000, level=0.99)
    assert low99 < low90 and high90 < high99


def test_stratified_macro_known_value():
    # a: always 1.0; b: two examples, one right -> resampled accuracy 0, .5, 1 with p .25, .5, .25.
    # macro = (1 + .5) / 2 = .75 (micro would be 5/6); the macro's bootstrap takes .5, .75, 1.0.
    assert macro_ci({"a": [1, 1, 1, 1], "b": [0, 1]}) == (0.75, 0.5, 1.0)
    accuracy, low, high = macro_ci({"a": [1] * 10, "b": [0] * 10})
    assert (accuracy, low, high) == (0.5, 0.5, 0.5)  # no within-task variance -> no CI width
    assert macro_ci({"a": [1, 0], "empty": []})[0] == 0.5  # an empty task has no accuracy to average
    assert all(np.isnan(macro_ci({})))


@pytest.mark.parametrize("per_task", [
    {"only": [1] * 280 + [0] * 120},
    {"t1": [1] * 30 + [0] * 70, "t2": [1] * 45 + [0] * 5, "t3": [1, 0] * 40},
])
def test_matches_a_loop_reference(per_task):
    samples = 20000
    ours = macro_ci(per_task, samples=samples, seed=1) if len(per_task) > 1 else \
        bootstrap_ci(next(iter(per_task.values())), samples=samples, seed=1)
    reference = reference_macro(per_task, samples=samples, seed=1)
    assert ours[0] == pytest.approx(reference[0])
    # The bootstrap distribution is discrete (steps of 1/400 here, finer for the macro), and the Monte Carlo
    # error at 20000 samples is below a step: allow one step. A 90% interval is ~3 steps narrower per side.
    tolerance = 1 / 400 + 1e-9
    assert ours[1] == pytest.approx(reference[1], abs=tolerance)
    assert ours[2] == pytest.approx(reference[2], abs=tolerance)
    wrong = reference_macro(per_task, samples=samples, seed=1, level=0.90)
    assert abs(ours[1] - wrong[1]) > tolerance and abs(ours[2] - wrong[2]) > tolerance  # the check can fail


def test_rejects_non_binary_outcomes():
    with pytest.raises(ValueError, match="position 2"):
        bootstrap_ci([1, 0, 2])
    with pytest.raises(ValueError, match="task 'b'"):
        macro_ci({"a": [1], "b": [0.5]})


def _examples(rows: list[tuple]) -> pd.DataFrame:
    columns = ["benchmark", "task", "system_message", "correct_strict", "correct_flexible", "format_ok",
               "finish_reason", "output_tokens"]
    frame = pd.DataFrame(rows, columns=columns)
    frame.insert(2, "id", [str(i) for i in range(len(frame))])
    return frame


def test_summarize_rows_and_values():
    rows = (
        # bbh, task t1: flexible 3/4, strict 1/4
        [("bbh", "t1", "empty", s, f, True, "stop", 16) for s, f in [(1, 1), (0, 1), (0, 1), (0, 0)]]
        # bbh, task t2: flexible 1/2, strict 1/2, one prompt too long
        + [("bbh", "t2", "empty", 1, 1, True, "stop", 20), ("bbh", "t2", "empty", 0, 0, False, "prompt_too_long", 0)]
        + [("gsm8k", "gsm8k", "empty", 1, 1, True, "stop", 30), ("gsm8k", "gsm8k", "empty", 0, 1, False, "length", 50)]
        + [("gsm8k", "gsm8k", "cautious", 0, 0, True, "stop", 8)]
    )
    summary = summarize(_examples(rows), samples=500, seed=0)
    assert list(summary.columns) == SUMMARY_COLUMNS
    keys = list(zip(summary["benchmark"], summary["task"], summary["system_message"]))
    assert keys == [("bbh", ALL_TASKS, "empty"), ("bbh", "t1", "empty"), ("bbh", "t2", "empty"),
                    ("gsm8k", ALL_TASKS, "empty"), ("gsm8k", "gsm8k", "empty"),
                    ("gsm8k", ALL_TASKS, "cautious"), ("gsm8k", "gsm8k", "cautious")]
    row = summary.set_index(["benchmark", "task", "system_message"])
    t1, t2, bbh = row.loc[("bbh", "t1", "empty")], row.loc[("bbh", "t2", "empty")], row.loc[("bbh", ALL_TASKS, "empty")]
    assert (t1.n, t1.accuracy_flexible, t1.accuracy_strict, t1.format_ok_rate) == (4, 0.75, 0.25, 1.0)
    assert (t2.n, t2.prompt_too_long, t2.format_ok_rate, t2.output_tokens_mean) == (2, 1, 0.5, 10.0)
    assert bbh.n == 6 and bbh.prompt_too_long == 1
    assert bbh.accuracy_flexible == pytest.approx((0.75 + 0.5) / 2)  # macro, not micro (4/6)
    assert bbh.accuracy_strict == pytest.approx((0.25 + 0.5) / 2)
    assert bbh.format_ok_rate == pytest.approx(0.75) and bbh.output_tokens_mean == pytest.approx(13.0)
    for task_row in (t1, t2, bbh):
        assert task_row.low_flexible <= task_row.accuracy_flexible <= task_row.high_flexible
        assert task_row.low_strict <= task_row.accuracy_strict <= task_row.high_strict
    # a single-task benchmark's macro row equals its task row, CI included
    single = summary[(summary["benchmark"] == "gsm8k") & (summary["system_message"] == "empty")]
    assert single.drop(columns="task").iloc[0].equals(single.drop(columns="task").iloc[1])
    assert row.loc[("gsm8k", "gsm8k", "empty")].accuracy_flexible == 1.0
    assert row.loc[("gsm8k", "gsm8k", "empty")].accuracy_strict == 0.5


def test_summarize_ci_is_independent_of_other_groups():
    rng = np.random.default_rng(0)
    rows = [("a", "a", "empty", x, x, True, "stop", 1) for x in rng.random(50) < 0.5]
    alone = summarize(_examples(rows))
    together = summarize(_examples(rows + [("b", "b", "empty", 1, 1, True, "stop", 1)] * 5))
    pd.testing.assert_frame_equal(alone, together.iloc[:2].reset_index(drop=True))


def test_summarize_errors_name_the_problem():
    frame = _examples([("bbh", "t1", "empty", 1, 1, True, "stop", 3)])
    with pytest.raises(ValueError, match="format_ok"):
        summarize(frame.drop(columns="format_ok"))
    frame["correct_flexible"] = frame["correct_flexible"].astype(object)
    frame.loc[0, "correct_flexible"] = None
    with pytest.raises(ValueError, match=r"correct_flexible is null in row 0 .*'bbh'.*'t1'"):
        summarize(frame)


def test_suite_macro_averages_benchmark_macros():
    rows = ([("bbh", "t1", "empty", 1, 1, True, "stop", 10)] * 4  # bbh macro = (1 + .5) / 2 = .75
            + [("bbh", "t2", "empty", 1, 1, True, "stop", 10), ("bbh", "t2", "empty", 0, 0, True, "stop", 10)]
            + [("gsm8k", "gsm8k", "empty", 0, 0, True, "stop", 10)] * 3)  # gsm8k = 0
    suite = suite_macro(_examples(rows), samples=500)
    assert list(suite.columns) == SUMMARY_COLUMNS and len(suite) == 1
    row = suite.iloc[0]
    assert (row.benchmark, row.task, row.system_message, row.n) == (SUITE, ALL_TASKS, "empty", 9)
    assert row.accuracy_flexible == pytest.approx(0.375)
    assert (row.low_flexible, row.high_flexible) == pytest.approx((0.25, 0.5))  # only t2 varies: weight 1/4
