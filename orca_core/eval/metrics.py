"""Accuracies with percentile-bootstrap confidence intervals, per task and macro-averaged.

Every outcome is a 0/1 correctness, so resampling n examples with replacement and
counting the correct ones is exactly a Binomial(n, k/n) draw: we draw the counts
directly. Same distribution as resampling indices, but O(samples) work and memory
instead of O(samples x n), which matters for MMLU's 14K examples x 57 subjects.

A macro average (the mean of task accuracies, as Orca 2 reports BBH, MMLU, AGIEval)
gets a stratified bootstrap: each task is resampled within itself, independently,
and the resampled task accuracies are averaged. Every group is bootstrapped with
the same seed, so one benchmark's CI does not change when another is added.

Two models answered the SAME items, so they are compared by the paired difference
(`pair_examples`, `paired_differences`): each item's difference in correctness
(+1, 0 or -1), resampled item by item within each task. Items both models get
right (or wrong) move neither model, so the difference's CI is much tighter than
two overlapping accuracy CIs suggest. A difference is called "above" or "below"
only when its CI excludes 0 (`direction`).
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


def _check_bootstrap(samples: int, level: float) -> None:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _stratified(strata: Sequence[np.ndarray], weights: Sequence[float], samples: int, seed: int,
                level: float) -> tuple[float, float, float]:
    """Weighted mean of per-stratum accuracies and its stratified percentile-bootstrap CI."""
    _check_bootstrap(samples, level)
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


# -- paired differences: two models on the same items ---------------------------------------

PAIR_KEYS = ["benchmark", "task", "system_message", "id"]  # what makes two rows the same item
DIFFERENCE_COLUMNS = ["benchmark", "task", "system_message", "n", "difference", "low", "high"]
ABOVE, BELOW, NO_DIFFERENCE = "above", "below", "no difference"


def direction(low: float, high: float) -> str:
    """The call on a difference A - B from its CI: "above" / "below" only when the CI excludes 0."""
    return ABOVE if low > 0 else BELOW if high < 0 else NO_DIFFERENCE


def _paired_stratified(strata: Sequence[np.ndarray], weights: Sequence[float], samples: int, seed: int,
                       level: float) -> tuple[float, float, float]:
    """Weighted mean of per-stratum mean differences (items of -1, 0, +1) and its stratified paired-bootstrap CI.

    Resampling a stratum's n items with replacement, its mean difference depends only on how many
    drawn items are +1 (A right, B wrong) and how many -1 (B right, A wrong): a Multinomial(n,
    (p+, p-, p0)) draw, made here directly (O(samples x strata) memory, whatever n is).
    """
    _check_bootstrap(samples, level)
    n = np.array([len(s) for s in strata], dtype=np.int64)
    if len(n) == 0 or (n == 0).any():
        return (float("nan"),) * 3
    up = np.array([(s > 0).sum() for s in strata], dtype=np.int64)
    down = np.array([(s < 0).sum() for s in strata], dtype=np.int64)
    w = np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.stack([up, down, n - up - down], axis=1) / n[:, None], size=(samples, len(n)))
    tail = (1 - level) / 2
    low, high = np.quantile(((draws[..., 0] - draws[..., 1]) / n) @ w, [tail, 1 - tail])
    difference = float(((up - down) / n) @ w)
    return difference, float(min(low, difference)), float(max(high, difference))  # float noise, as in _stratified


def _pairing_frame(frame: pd.DataFrame, column: str, name: str) -> pd.DataFrame:
    missing = [c for c in [*PAIR_KEYS, column] if c not in frame.columns]
    if missing:
        raise ValueError(f"per-example results of {name} lack column(s) {missing}; have {list(frame.columns)}")
    rows = frame[[*PAIR_KEYS, column]]
    for flags, problem in ((rows.duplicated(PAIR_KEYS), "appears twice"), (rows[column].isna(), f"has no {column}")):
        if flags.any():
            row = rows[flags.to_numpy()].iloc[0]
            raise ValueError(f"per-example results of {name}: benchmark {row['benchmark']!r}, task {row['task']!r}, "
                             f"system message {row['system_message']!r}: id {row['id']!r} {problem}")
    return rows.assign(**{column: _outcomes(rows[column].to_numpy(), f"{name} {column}")})


def pair_examples(a: pd.DataFrame, b: pd.DataFrame, column: str = "correct_flexible", *, intersect: bool = False,
                  names: tuple[str, str] = ("A", "B")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join two models' per-example results (evaluate.py's examples.parquet) item by item.

    Returns (pairs, unmatched). pairs: PAIR_KEYS plus "a" and "b", the two models' `column`
    (booleans), in A's order. unmatched: per (benchmark, task, system message) with ids only one
    model has, the counts "only_a" and "only_b". Such ids are an error naming the task and the
    counts, unless `intersect` (then the pairs are the items both answered, and the caller says so).
    """
    left, right = (_pairing_frame(f, column, name).rename(columns={column: side}) for f, name, side
                   in zip((a, b), names, ("a", "b")))
    joined = left.merge(right, on=PAIR_KEYS, how="left", indicator=True)  # a left join keeps A's order
    matched = (joined["_merge"] == "both").to_numpy()
    only_b = right.merge(left[PAIR_KEYS], on=PAIR_KEYS, how="left", indicator=True)["_merge"] == "left_only"
    strays = pd.concat([joined[~matched][PAIR_KEYS].assign(only_a=1, only_b=0),
                        right[only_b.to_numpy()][PAIR_KEYS].assign(only_a=0, only_b=1)])
    unmatched = (strays.groupby(["benchmark", "task", "system_message"], sort=False)[["only_a", "only_b"]].sum()
                 .astype(int).reset_index())
    if len(unmatched) and not intersect:
        where = "; ".join(f"benchmark {r.benchmark!r}, task {r.task!r}, system message {r.system_message!r}: "
                          f"{r.only_a} id(s) only in {names[0]}, {r.only_b} only in {names[1]}"
                          for r in unmatched.itertuples())
        raise ValueError(f"{names[0]} and {names[1]} did not answer the same items ({where})")
    pairs = joined[matched][[*PAIR_KEYS, "a", "b"]].astype({"a": bool, "b": bool}).reset_index(drop=True)
    return pairs, unmatched


def paired_differences(pairs: pd.DataFrame, samples: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """A - B in accuracy with a paired, task-stratified percentile-bootstrap CI, from pair_examples()'s pairs.

    Rows (DIFFERENCE_COLUMNS), per system message: each benchmark's macro row (task "(all)": the
    mean of its task differences, as summarize() averages accuracies), then its task rows; then the
    mean over benchmarks (benchmark "(suite)", as suite_macro() weights them; for one benchmark it
    equals that benchmark's macro row). With the same items on both sides a macro difference is
    exactly the difference of the two macro accuracies; only its CI is new.
    """
    out: list[dict] = []
    for system, group in pairs.groupby("system_message", sort=False):
        suite: list[np.ndarray] = []
        weights: list[float] = []
        benchmarks = list(group.groupby("benchmark", sort=False))
        for benchmark, rows in benchmarks:
            tasks = [(task, t["a"].to_numpy(int) - t["b"].to_numpy(int)) for task, t in rows.groupby("task", sort=True)]
            strata = [d for _, d in tasks]
            macro = _paired_stratified(strata, [1 / len(strata)] * len(strata), samples, seed, level)
            out.append(dict(zip(DIFFERENCE_COLUMNS, (benchmark, ALL_TASKS, system, len(rows), *macro))))
            out += [dict(zip(DIFFERENCE_COLUMNS, (benchmark, task, system, len(d),
                                                  *_paired_stratified([d], [1.0], samples, seed, level))))
                    for task, d in tasks]
            suite += strata
            weights += [1 / (len(benchmarks) * len(strata))] * len(strata)
        out.append(dict(zip(DIFFERENCE_COLUMNS, (SUITE, ALL_TASKS, system, len(group),
                                                 *_paired_stratified(suite, weights, samples, seed, level)))))
    return pd.DataFrame(out, columns=DIFFERENCE_COLUMNS)
