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

from orca_core.eval.metrics import (ALL_TASKS, DIFFERENCE_COLUMNS, PAIR_KEYS, SUITE, SUMMARY_COLUMNS, bootstrap_ci,
                                    direction, macro_ci, pair_examples, paired_differences, suite_macro, summarize)


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


# -- paired differences ----------------------------------------------------------------------------------

def _scored(correct, tasks, benchmark: str = "bbh", system: str = "empty") -> pd.DataFrame:
    """Per-example rows of one model as evaluate.py writes them (the columns pairing reads)."""
    return pd.DataFrame({"benchmark": benchmark, "task": tasks, "system_message": system,
                         "id": [f"{t}-{i}" for i, t in enumerate(tasks)], "correct_flexible": np.asarray(correct, bool)})


TASKS = ["t1"] * 20 + ["t2"] * 20
B_RIGHT = np.arange(40) % 2 == 0  # B: every even item
A_RIGHT = B_RIGHT.copy()
A_RIGHT[[1, 3, 21, 23]] = True  # A also gets four odd items...
A_RIGHT[4] = False  # ...and misses one B gets: they agree on 35 of 40


def reference_paired(per_task: dict[str, list[int]], samples: int, seed: int, level: float = 0.95):
    """The paired stratified bootstrap, the slow obvious way: resample each task's item differences, average."""
    rng = random.Random(seed)
    stats = [sum(sum(rng.choices(d, k=len(d))) / len(d) for d in per_task.values()) / len(per_task)
             for _ in range(samples)]
    tail = (1 - level) / 2
    return sum(sum(d) / len(d) for d in per_task.values()) / len(per_task), _percentile(stats, tail), \
        _percentile(stats, 1 - tail)


def test_paired_difference_golden_values_and_narrower_than_the_unpaired_cis():
    pairs, unmatched = pair_examples(_scored(A_RIGHT, TASKS), _scored(B_RIGHT, TASKS))
    assert len(pairs) == 40 and unmatched.empty and list(pairs.columns) == [*PAIR_KEYS, "a", "b"]
    table = paired_differences(pairs, samples=1000, seed=0)
    assert list(table.columns) == DIFFERENCE_COLUMNS
    assert table[["benchmark", "task", "system_message", "n"]].to_numpy().tolist() == [
        ["bbh", ALL_TASKS, "empty", 40], ["bbh", "t1", "empty", 20], ["bbh", "t2", "empty", 20],
        [SUITE, ALL_TASKS, "empty", 40]]
    golden = [[0.075, -0.025, 0.175], [0.05, -0.1, 0.2], [0.1, 0.0, 0.25], [0.075, -0.025, 0.175]]  # seed 0
    assert table[["difference", "low", "high"]].to_numpy() == pytest.approx(np.array(golden), abs=1e-12)
    # The macro difference is exactly the difference of the macro accuracies; its CI is what pairing changes.
    accuracy_a, low_a, high_a = macro_ci({"t1": A_RIGHT[:20], "t2": A_RIGHT[20:]}, seed=0)
    accuracy_b, low_b, high_b = macro_ci({"t1": B_RIGHT[:20], "t2": B_RIGHT[20:]}, seed=0)
    assert table.loc[0, "difference"] == pytest.approx(accuracy_a - accuracy_b)
    width = table.loc[0, "high"] - table.loc[0, "low"]
    assert width < 0.7 * min(high_a - low_a, high_b - low_b)  # 0.20 vs 0.30 each (unpaired: ~0.42 for the difference)
    assert table.loc[0, "low"] < 0 < table.loc[0, "high"] and direction(-0.025, 0.175) == "no difference"
    assert (direction(0.01, 0.2), direction(-0.2, -0.01), direction(0.0, 0.1)) == ("above", "below", "no difference")


def test_identical_models_differ_by_exactly_zero():
    pairs, _ = pair_examples(_scored(A_RIGHT, TASKS), _scored(A_RIGHT, TASKS))
    table = paired_differences(pairs, samples=500, seed=3)
    assert table[["difference", "low", "high"]].to_numpy().tolist() == [[0.0, 0.0, 0.0]] * 4


def test_each_task_is_resampled_within_itself():
    # t1: A right and B wrong on every item (+1 each); t2 the reverse (-1 each). Every task is constant,
    # so a stratified resample always gives (1 + -1) / 2 = 0; pooling the 40 items would not.
    a = np.r_[np.ones(20), np.zeros(20)]
    table = paired_differences(pair_examples(_scored(a, TASKS), _scored(1 - a, TASKS))[0], samples=1000, seed=0)
    assert table[["difference", "low", "high"]].to_numpy().tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0],
                                                                        [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]
    # A constant task adds no width: the macro CI of (constant, varying) is half the varying task's alone.
    varying = _scored(A_RIGHT[:20], ["t2"] * 20), _scored(B_RIGHT[:20], ["t2"] * 20)
    alone = paired_differences(pair_examples(*varying)[0], samples=20000, seed=0).iloc[0]
    with_constant = paired_differences(pair_examples(pd.concat([_scored([1] * 20, ["t1"] * 20), varying[0]]),
                                                     pd.concat([_scored([1] * 20, ["t1"] * 20), varying[1]]))[0],
                                       samples=20000, seed=0).iloc[0]
    assert [alone["difference"], alone["low"], alone["high"]] == pytest.approx([0.05, -0.1, 0.2])  # seed 0
    assert [with_constant["difference"], with_constant["low"], with_constant["high"]] == pytest.approx([0.025, -0.05, 0.1])


def test_paired_bootstrap_matches_a_loop_reference():
    rng = np.random.default_rng(2)
    a, b = rng.random(150) < 0.6, rng.random(150) < 0.5
    tasks = ["t1"] * 40 + ["t2"] * 50 + ["t3"] * 60
    ours = paired_differences(pair_examples(_scored(a, tasks), _scored(b, tasks))[0], samples=20000, seed=1).iloc[0]
    d = a.astype(int) - b.astype(int)
    per_task = {"t1": d[:40].tolist(), "t2": d[40:90].tolist(), "t3": d[90:].tolist()}
    reference = reference_paired(per_task, samples=20000, seed=1)
    assert ours["difference"] == pytest.approx(reference[0])
    tolerance = 0.01  # Monte Carlo error of a 2.5% quantile at 20000 samples, plus the 1/120 grid
    assert ours["low"] == pytest.approx(reference[1], abs=tolerance)
    assert ours["high"] == pytest.approx(reference[2], abs=tolerance)
    wrong = reference_paired(per_task, samples=20000, seed=1, level=0.80)
    assert abs(ours["low"] - wrong[1]) > tolerance and abs(ours["high"] - wrong[2]) > tolerance  # the check can fail


def test_suite_difference_weights_benchmarks_equally():
    # bbh: 2 tasks, differences .05 and .1 (macro .075); gsm8k: one task, A 2 of 4 right more than B (.5).
    # Benchmarks keep A's order (gsm8k first here); B's rows may come in any order.
    a = pd.concat([_scored([1, 1, 0, 0], ["gsm8k"] * 4, benchmark="gsm8k"), _scored(A_RIGHT, TASKS)])
    b = pd.concat([_scored(B_RIGHT, TASKS), _scored([0, 0, 0, 0], ["gsm8k"] * 4, benchmark="gsm8k")]).iloc[::-1]
    table = paired_differences(pair_examples(a, b)[0], samples=1000, seed=0)
    assert list(zip(table["benchmark"], table["task"])) == [("gsm8k", ALL_TASKS), ("gsm8k", "gsm8k"), ("bbh", ALL_TASKS),
                                                          ("bbh", "t1"), ("bbh", "t2"), (SUITE, ALL_TASKS)]
    assert table.iloc[2:5]["difference"].tolist() == pytest.approx([0.075, 0.05, 0.1])
    suite = table.iloc[-1]
    assert suite["n"] == 44 and suite["difference"] == pytest.approx((0.075 + 0.5) / 2)
    assert suite["low"] < suite["difference"] < suite["high"]


def test_pairing_errors_name_the_task_and_the_count():
    a, b = _scored(A_RIGHT, TASKS), _scored(B_RIGHT, TASKS)
    with pytest.raises(ValueError, match=r"orca2 and orca1 did not answer the same items \(benchmark 'bbh', task 't2', "
                                         r"system message 'empty': 3 id\(s\) only in orca2, 0 only in orca1\)"):
        pair_examples(a, b.iloc[:37], names=("orca2", "orca1"))
    pairs, unmatched = pair_examples(a, b.iloc[:37], intersect=True)
    assert len(pairs) == 37 and unmatched.to_dict("records") == [
        {"benchmark": "bbh", "task": "t2", "system_message": "empty", "only_a": 3, "only_b": 0}]
    with pytest.raises(ValueError, match=r"results of B: benchmark 'bbh', task 't1', system message 'empty': "
                                         r"id 't1-0' appears twice"):
        pair_examples(a, pd.concat([b, b.iloc[:1]]))
    with pytest.raises(ValueError, match=r"results of A lack column\(s\) \['id'\]"):
        pair_examples(a.drop(columns="id"), b)
