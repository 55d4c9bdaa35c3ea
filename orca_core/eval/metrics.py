"""Accuracies with percentile-bootstrap confidence intervals, per task and macro-averaged.

Every outcome is a 0/1 correctness, so resampling n examples with replacement and
counting the correct ones is exactly a Binomial(n, k/n) draw: we draw the counts
directly. Same distribution as resampling indices, but O(samples) work and memory
instead of O(samples x n), which matters for MMLU's 14K examples x 57 subjects.

A macro average (the mean of task accuracies, as Orca 2 reports BBH, MMLU, AGIEval)
gets a stratified bootstrap: each task is resampled within itself, independently,
and the resampled task accuracies are averaged. Every group is bootstrapped with
the same seed, so one benchmark's CI does not change when another is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

ALL_TASKS = "(all)"  # the task of a benchmark's macro row
SUITE = "(suite)"  # the benchmark of suite_macro's rows: the mean over benchmarks

EXAMPLE_COLUMNS = ("benchmark", "task", "system_message", "correct_strict", "correct_flexible",
                   "format_ok", "finish_reason", "output_tokens")
SUMMARY_COLUMNS = ["benchmark", "task", "system_message", "n",
                   "accuracy_strict", "low_strict", "high_strict",
                   "accuracy_flexible", "low_flexible", "high_flexible",
                   "format_ok_rate", "prompt_too_long", "output_tokens_mean"]


def _outcomes(correct: Sequence[bool] | np.ndarray, name: str = "correct") -> np.ndarray:
    values = np.asarray(correct)
    if values.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of booleans, got shape {values.shape}")
    if values.dtype != bool:
        bad = ~np.isin(values, (0, 1))
        if bad.any():
            raise ValueError(f"{name}: outcomes must be 0/1 or booleans; position {int(np.argmax(bad))} "
                             f"is {values[np.argmax(bad)]!r}")
    return values.astype(bool)


def _stratified(strata: Sequence[np.ndarray], weights: Sequence[float], samples: int, seed: int,
                level: float) -> tuple[float, float, float]:
    """Weighted mean of per-stratum accuracies and its stratified percentile-bootstrap CI."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = np.array([len(s) for s in strata], dtype=np.int64)
    if len(n) == 0 or (n == 0).any():
        return (float("nan"),) * 3
    p = np.array([s.sum() for s in strata], dtype=float) / n
    w = np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.binomial(n, p, size=(samples, len(n))) / n  # one resampled accuracy per stratum per sample
    tail = (1 - level) / 2
    low, high = np.quantile(draws @ w, [tail, 1 - tail])
    accuracy = float(p @ w)
    # Clip float noise (e.g. 0.9999999 for an all-correct set) so the CI always contains the estimate.
    return accuracy, float(min(low, accuracy)), float(max(high, accuracy))


def bootstrap_ci(correct: Sequence[bool] | np.ndarray, samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, low, high): the percentile-bootstrap CI over examples; all nan for no examples."""
    return _stratified([_outcomes(correct)], [1.0], samples, seed, level)


def macro_ci(per_task: Mapping[str, Sequence[bool] | np.ndarray], samples: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float, float]:
    """(macro accuracy, low, high): mean of task accuracies, CI by resampling within each task.

    Tasks with no examples are left out of the average (they have no accuracy); with no
    examples at all the result is nan. Task order does not matter beyond the draw order.
    """
    strata = [_outcomes(values, f"task {task!r}") for task, values in per_task.items()]
    strata = [s for s in strata if len(s)]
    return _stratified(strata, [1 / len(strata)] * len(strata) if strata else [], samples, seed, level)


def _check_examples(examples: pd.DataFrame) -> None:
    missing = [c for c in EXAMPLE_COLUMNS if c not in examples.columns]
    if missing:
        raise ValueError(f"per-example results lack column(s) {missing}; have {list(examples.columns)}")
    for column in ("correct_strict", "correct_flexible", "format_ok"):
        nulls = examples[column].isna().to_numpy()
        if nulls.any():
            row = examples.iloc[int(np.argmax(nulls))]
            raise ValueError(f"per-example results: {column} is null in row {int(np.argmax(nulls))} "
                             f"(benchmark {row['benchmark']!r}, task {row['task']!r}, id {row.get('id', '?')!r})")


def _task_row(rows: pd.DataFrame, samples: int, seed: int, level: float) -> dict:
    strict = bootstrap_ci(rows["correct_strict"].to_numpy(bool), samples, seed, level)
    flexible = bootstrap_ci(rows["correct_flexible"].to_numpy(bool), samples, seed, level)
    return {"n": len(rows), **_metrics(strict, flexible),
            "format_ok_rate": float(rows["format_ok"].to_numpy(bool).mean()),
            "prompt_too_long": int((rows["finish_reason"] == "prompt_too_long").sum()),
            "output_tokens_mean": float(rows["output_tokens"].astype(float).mean())}


def _metrics(strict: tuple[float, float, float], flexible: tuple[float, float, float]) -> dict:
    return dict(zip(["accuracy_strict", "low_strict", "high_strict",
                     "accuracy_flexible", "low_flexible", "high_flexible"], (*strict, *flexible)))


def _macro_row(tasks: dict[str, pd.DataFrame], task_rows: list[dict], weights: list[float], samples: int,
               seed: int, level: float) -> dict:
    """Macro row over `tasks` (name -> example rows) with the given per-task weights (summing to 1)."""
    strict = _stratified([t["correct_strict"].to_numpy(bool) for t in tasks.values()], weights, samples, seed, level)
    flexible = _stratified([t["correct_flexible"].to_numpy(bool) for t in tasks.values()], weights, samples, seed,
                           level)
    return {"task": ALL_TASKS, "n": sum(r["n"] for r in task_rows), **_metrics(strict, flexible),
            "format_ok_rate": float(np.dot(weights, [r["format_ok_rate"] for r in task_rows])),
            "prompt_too_long": sum(r["prompt_too_long"] for r in task_rows),
            "output_tokens_mean": float(np.dot(weights, [r["output_tokens_mean"] for r in task_rows]))}


def summarize(examples: pd.DataFrame, samples: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One row per (benchmark, task, system message), plus a macro row (task "(all)") per (benchmark, system message).

    The macro row's accuracies, format-OK rate and mean output length are macro averages over
    tasks (a single-task benchmark's macro row equals its task row); n and prompt_too_long are
    sums. Benchmarks and system messages keep their order of appearance; tasks are sorted, each
    benchmark's macro row first.
    """
    _check_examples(examples)
    out: list[dict] = []
    for (benchmark, system), group in examples.groupby(["benchmark", "system_message"], sort=False):
        tasks = dict(list(group.groupby("task", sort=True)))
        task_rows = [{"task": task, **_task_row(rows, samples, seed, level)} for task, rows in tasks.items()]
        macro = _macro_row(tasks, task_rows, [1 / len(tasks)] * len(tasks), samples, seed, level)
        out += [{"benchmark": benchmark, "system_message": system, **row} for row in [macro, *task_rows]]
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def suite_macro(examples: pd.DataFrame, samples: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """The mean over benchmarks of each benchmark's macro accuracy, per system message.

    Rows have summarize()'s columns with benchmark "(suite)" and task "(all)", so they can be
    appended to a summary (the report shows them as an "average" column). The CI resamples
    every task within itself, each task weighted 1 / (benchmarks x tasks of its benchmark).
    """
    _check_examples(examples)
    out: list[dict] = []
    for system, group in examples.groupby("system_message", sort=False):
        tasks: dict[tuple, pd.DataFrame] = {}
        weights: list[float] = []
        benchmarks = list(group.groupby("benchmark", sort=False))
        for benchmark, rows in benchmarks:
            per_task = list(rows.groupby("task", sort=True))
            for task, task_rows in per_task:
                tasks[(benchmark, task)] = task_rows
                weights.append(1 / (len(benchmarks) * len(per_task)))
        task_rows = [_task_row(rows, samples, seed, level) for rows in tasks.values()]
        row = _macro_row(tasks, task_rows, weights, samples, seed, level)
        out.append({"benchmark": SUITE, "system_message": system, **row})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)
