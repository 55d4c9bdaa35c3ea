"""The findings a run must show (Orca's, at any scale), read off the evaluation.

1. Each curriculum stage beats the one before it on the macro average: the
   paired difference on the items both answered has a 95 % CI above 0
   (`curriculum`), with the same per task family.
2. Explanation tuning beats answer imitation at the same token budget: a
   recipe's final stage against its answers-only control's, trained beside it
   (`explanations_vs_answers`, with the tokens each arm trained on:
   `tokens_trained`), or against another recipe's (`paired`, `orca compare`).
3. The final student picks a strategy per task family when it is given only
   the generic system message (`strategy_usage.usage`, summarised and called
   here: `strategy_summary`, `strategy_verdict`).

Each function returns plain rows (lists of dicts) that the report renders as
tables and plots. Every model is scored on the same items, so a step is judged
by the paired difference (metrics.paired_differences), never by whether two
accuracy CIs overlap: "above" / "below" when its CI excludes 0, else
"no difference" (metrics.direction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from orca_core.eval.metrics import (ABOVE, ALL_TASKS, PAIR_KEYS, SUITE, direction, pair_examples,
                                    paired_differences)
from orca_core.eval.strategy_usage import distinct_strategies

PAIRED_COLUMNS = [*PAIR_KEYS, "correct_flexible"]  # what findings read of each model's examples.parquet


def macro_rows(summary: pd.DataFrame, system_message: str) -> pd.DataFrame:
    """One macro row per model: the suite average when there are several benchmarks, else the benchmark's."""
    macro = summary[(summary["task"] == ALL_TASKS) & (summary["system_message"] == system_message)]
    if (macro["benchmark"] == SUITE).any():
        return macro[macro["benchmark"] == SUITE]
    benchmarks = list(dict.fromkeys(macro["benchmark"]))
    if len(benchmarks) > 1:
        raise ValueError(f"summary has benchmarks {benchmarks} but no suite average row")
    return macro


def _model_row(summary: pd.DataFrame, macro: pd.Series, model: str, system_message: str) -> dict[str, Any]:
    """A model's macro accuracy (flexible) with its CI, examples and tasks."""
    tasks = summary[(summary["model"] == model) & (summary["system_message"] == system_message)
                    & (summary["task"] != ALL_TASKS) & (summary["benchmark"] != SUITE)]["task"].nunique()
    return {"model": model, "accuracy": float(macro["accuracy_flexible"]), "low": float(macro["low_flexible"]),
            "high": float(macro["high_flexible"]), "n": int(macro["n"]), "tasks": int(tasks)}


def paired(a: pd.DataFrame, b: pd.DataFrame, system_messages: str | tuple[str, str], *, samples: int = 1000,
           seed: int = 0, intersect: bool = False, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """A - B in flexible macro accuracy on the items both answered, from their per-example results.

    `system_messages`: the one both are judged under, or (A's, B's) to set two recipes' headline
    messages against each other. Returns the difference over benchmarks with its 95% CI and call
    ("above" / "below" / "no difference"), the items paired, per task the same, and the ids only
    one model has (an error unless `intersect`).
    """
    mine, theirs = (system_messages, system_messages) if isinstance(system_messages, str) else system_messages
    b = b[b["system_message"] == theirs].assign(system_message=mine)  # paired on the item, whatever the message
    pairs, unmatched = pair_examples(a[a["system_message"] == mine], b, intersect=intersect, names=names)
    if not len(pairs):
        raise ValueError(f"{names[0]} ({mine} system message) and {names[1]} ({theirs}) have no items in common")
    table = paired_differences(pairs, samples=samples, seed=seed)
    top = table[table["benchmark"] == SUITE].iloc[0]
    single = pairs["benchmark"].nunique() == 1  # tasks need no benchmark prefix
    return {"difference": float(top["difference"]), "difference_low": float(top["low"]),
            "difference_high": float(top["high"]), "vs": direction(top["low"], top["high"]), "pairs": int(top["n"]),
            "by_task": [{"task": r.task if single else f"{r.benchmark} / {r.task}", "n": int(r.n),
                         "difference": float(r.difference), "low": float(r.low), "high": float(r.high),
                         "vs": direction(r.low, r.high)}
                        for r in table[(table["task"] != ALL_TASKS) & (table["benchmark"] != SUITE)].itertuples()],
            "only_a": int(unmatched["only_a"].sum()), "only_b": int(unmatched["only_b"].sum())}


def curriculum(summary: pd.DataFrame, examples: Mapping[str, pd.DataFrame], models: Sequence[str],
               system_message: str, *, samples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per model in curriculum order: macro accuracy (flexible) with CI, examples, and the step from the previous model.

    `examples` maps each model to its per-example results (examples.parquet). The step is the
    paired difference with the previous model on the same items: `difference` with
    `difference_low` / `difference_high` (its 95% CI), `by_task` the same per task, and
    `vs_previous` "above" / "below" when the CI excludes 0, "no difference" otherwise ("" and
    None for the first model).
    """
    macro = macro_rows(summary, system_message).set_index("model")
    rows: list[dict[str, Any]] = []
    for model in models:
        if model not in macro.index:
            continue
        row = {**_model_row(summary, macro.loc[model], model, system_message), "difference": None,
               "difference_low": None, "difference_high": None, "vs_previous": "", "by_task": []}
        if rows:
            previous = rows[-1]["model"]
            if model not in examples or previous not in examples:
                raise ValueError(f"no per-example results for model {model if model not in examples else previous!r}")
            step = paired(examples[model], examples[previous], system_message, samples=samples, seed=seed,
                          names=(model, previous))
            row.update({k: step[k] for k in ("difference", "difference_low", "difference_high", "by_task")},
                       vs_previous=step["vs"])
        rows.append(row)
    return rows


def ordering_holds(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether every model in `rows` after the first is above the one before it (paired CI above 0)."""
    return len(rows) > 1 and all(r["vs_previous"] == ABOVE for r in rows[1:])


# Finding 2 is judged at the same token budget: the arms' non-pad training tokens may differ by this much.
BUDGET_TOLERANCE = 0.02


def tokens_trained(metrics: pd.DataFrame) -> dict[str, int]:
    """A stage's optimizer steps, non-pad tokens and label (loss) tokens, from its metrics.parquet (a row a step)."""
    missing = {"tokens", "label_tokens"} - set(metrics.columns)
    if missing:
        raise ValueError(f"metrics.parquet has no column(s) {sorted(missing)}")
    return {"steps": int(len(metrics)), "tokens": int(metrics["tokens"].sum()),
            "label_tokens": int(metrics["label_tokens"].sum())}


def token_budget(main: Mapping[str, Mapping[str, int]], control: Mapping[str, Mapping[str, int]],
                 tolerance: float = BUDGET_TOLERANCE) -> dict[str, Any]:
    """Both arms' training, per stage (`tokens_trained` of each) and in total, and whether the budgets match.

    `difference`: the control's non-pad tokens over the main arm's, minus 1; `matched` when within `tolerance`.
    """
    if list(main) != list(control):
        raise ValueError(f"the arms trained different stages: {list(main)} and {list(control)}")
    fields = ("steps", "tokens", "label_tokens")
    rows = [{"arm": arm, "stage": stage, **{f: int(counts[f]) for f in fields}}
            for arm, stages in (("main", main), ("control", control)) for stage, counts in stages.items()]
    total = {arm: {f: sum(r[f] for r in rows if r["arm"] == arm) for f in fields} for arm in ("main", "control")}
    difference = total["control"]["tokens"] / total["main"]["tokens"] - 1 if total["main"]["tokens"] else float("inf")
    return {"stages": rows, "main": total["main"], "control": total["control"], "difference": difference,
            "matched": abs(difference) <= tolerance, "tolerance": tolerance}


def explanations_vs_answers(main: pd.DataFrame, control: pd.DataFrame, system_message: str,
                            budget: dict[str, Any], *, names: tuple[str, str], samples: int = 1000,
                            seed: int = 0) -> dict[str, Any]:
    """Finding 2: the main arm's final stage minus the control's, paired on the held-out items both answered.

    `main` / `control`: their per-example results; each is judged under the headline `system_message`
    (the one it was trained toward). Holds when the difference's 95% CI is above 0 and the control trained
    on at least the main arm's tokens (within `budget["tolerance"]`, or more): a control that saw fewer
    tokens than the main arm cannot show that explanations beat answers at the same budget.
    """
    result = paired(main, control, system_message, samples=samples, seed=seed, names=names)
    fair = budget["matched"] or budget["difference"] > 0
    return {**result, "main": names[0], "control": names[1], "system_message": system_message,
            "budget": budget, "holds": result["vs"] == ABOVE and fair}


def control_verdict(result: dict[str, Any]) -> str:
    """One sentence: do explanations beat answers (paired CI above 0), and were the budgets the same?"""
    budget = result["budget"]
    cell = difference_cell(result["difference"], result["difference_low"], result["difference_high"])
    tokens = (f"non-pad training tokens {budget['main']['tokens']:,} (explanations) vs {budget['control']['tokens']:,}"
              f" (answers only), {'+' if budget['difference'] >= 0 else ''}{100 * budget['difference']:.1f}%")
    same = (f"{tokens}: the same budget within {100 * budget['tolerance']:.0f}%" if budget["matched"] else
            f"{tokens}: the budgets differ by more than {100 * budget['tolerance']:.0f}%")
    if result["holds"]:
        return (f"**Holds**: {result['main']} is {cell} pts above its answers-only control {result['control']} "
                f"on the same {result['pairs']} items (95% CI above 0); {same}.")
    why = (f"the paired difference is {cell} pts ({result['vs']})" if result["vs"] != ABOVE else
           f"the control trained on fewer tokens (difference {cell} pts)")
    return f"**Does not hold**: {result['main']} vs its answers-only control {result['control']}: {why}; {same}."


def control_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per task family: the main arm's final stage minus the control's, pts [95% CI], and the call."""
    header = ["task", "items", f"{result['main']} - answers only, pts [95% CI]", "call"]
    body = [[t["task"], str(t["n"]), difference_cell(t["difference"], t["low"], t["high"]), t["vs"]]
            for t in result["by_task"]]
    body.append(["all (macro)", str(result["pairs"]), difference_cell(result["difference"], result["difference_low"],
                                                                     result["difference_high"]), result["vs"]])
    return header, body


def budget_table(budget: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per arm and stage: optimizer steps, non-pad tokens, label (loss) tokens; then each arm's total."""
    header = ["arm", "stage", "steps", "tokens (non-pad)", "label tokens"]
    body = [[r["arm"], r["stage"], f"{r['steps']:,}", f"{r['tokens']:,}", f"{r['label_tokens']:,}"]
            for r in budget["stages"]]
    body += [[arm, "total", f"{t['steps']:,}", f"{t['tokens']:,}", f"{t['label_tokens']:,}"]
             for arm, t in (("main", budget["main"]), ("control", budget["control"]))]
    return header, body


def strategy_summary(table: pd.DataFrame, system_message: str) -> dict[str, Any]:
    """From strategy_usage.usage(): families, distinct strategies of student and teacher, share that follows."""
    rows = table[table["system_message"] == system_message]
    if not len(rows):
        return {"families": 0, "student_strategies": 0, "teacher_strategies": 0, "follows": None,
                "families_following": 0, "n": 0}
    return {
        "families": int(len(rows)),
        "student_strategies": distinct_strategies(table, system_message),
        "teacher_strategies": int(rows["teacher_shape"].nunique()),
        "follows": float((rows["follows"] * rows["n"]).sum() / rows["n"].sum()),  # over answers, not families
        "families_following": int((rows["student_shape"] == rows["teacher_shape"]).sum()),
        "n": int(rows["n"].sum()),
    }


def strategy_holds(summary: dict[str, Any]) -> bool:
    """Finding 3 holds when, in every family, the student's most used shape is the one its teacher was told to use."""
    return summary["families"] > 0 and summary["families_following"] == summary["families"]


def strategy_verdict(summary: dict[str, Any], model: str, system_message: str) -> str:
    """One sentence: does the final student use its teacher's strategy in every family, given the generic message?"""
    if not summary["families"]:
        return f"No {system_message!r} answers of {model} to read strategies from."
    share = f"{100 * (summary['follows'] or 0):.1f}% of its {summary['n']} answers in the teacher's shape"
    if strategy_holds(summary):
        return (f"**Holds**: given only the generic system message ({system_message}), {model} answers in each of the "
                f"{summary['families']} families mostly in the shape of the strategy its teacher used there "
                f"({share}; {summary['student_strategies']} strategies across families, the teacher "
                f"{summary['teacher_strategies']}).")
    return (f"**Does not hold**: {model}'s most used shape is the teacher's in {summary['families_following']} of "
            f"{summary['families']} families ({share}, {system_message} system message).")


# -- rendering: the report's Findings sections and findings.png ------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _points(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def difference_cell(difference: float, low: float, high: float) -> str:
    """'+4.2 [1.1, 7.3]': a difference in percentage points with its 95% CI."""
    return f"{'+' if round(100 * difference, 1) >= 0 else ''}{_points(difference)} [{_points(low)}, {_points(high)}]"


def curriculum_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "accuracy % [95% CI]", "examples", "tasks", "difference vs previous, pts [95% CI]",
              "vs previous"]
    body = []
    for r in rows:
        step = "" if r["difference"] is None else difference_cell(r["difference"], r["difference_low"],
                                                                  r["difference_high"])
        body.append([r["model"], f"{_pct(r['accuracy'])} [{_pct(r['low'])}–{_pct(r['high'])}]", str(r["n"]),
                     str(r["tasks"]), step, r["vs_previous"]])
    return header, body


def by_task_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per task: each model's paired difference with the one before it, pts [95% CI]."""
    steps = [(prev["model"], r) for prev, r in zip(rows, rows[1:])]
    cells = {(r["model"], t["task"]): t for _, r in steps for t in r["by_task"]}
    tasks = list(dict.fromkeys(t["task"] for _, r in steps for t in r["by_task"]))
    header = ["task", *(f"{r['model']} vs {previous}" for previous, r in steps)]
    body = [[task, *(difference_cell(c["difference"], c["low"], c["high"]) if (c := cells.get((r["model"], task)))
                     else "–" for _, r in steps)] for task in tasks]
    return header, body


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence: is each stage above the one before it (paired difference, 95% CI above 0)?"""
    if len(rows) < 2:
        return "Only one stage was evaluated: no ordering to check."
    chain = " > ".join(r["model"] for r in reversed(rows))
    if ordering_holds(rows):
        return f"**Holds**: {chain}, every step's paired difference with a 95% CI above 0."
    failed = [f"{prev['model']} -> {r['model']} ({r['vs_previous']}: "
              f"{difference_cell(r['difference'], r['difference_low'], r['difference_high'])} pts)"
              for prev, r in zip(rows, rows[1:]) if r["vs_previous"] != ABOVE]
    return f"**Does not hold** ({chain} expected): " + ", ".join(failed) + "."


def strategy_table(table: pd.DataFrame, system_message: str) -> tuple[list[str], list[list[str]]]:
    header = ["task family", "teacher was told", "teacher's answers look like", "student's answers look like",
              "student follows the teacher", "examples"]
    rows = table[table["system_message"] == system_message]
    body = [[r.task, r.instructed, r.teacher_shape, r.student_shape, f"{_pct(r.follows)}%", str(r.n)]
            for r in rows.itertuples()]
    return header, body


def plot(curricula: dict[str, list[dict[str, Any]]], headline: str, usage: pd.DataFrame | None,
         usage_message: str | None, path, control: dict[str, Any] | None = None) -> None:
    """Left: macro accuracy per stage with 95% CIs, one line per system message (the headline one bold).
    Then (with a control): the final stage minus the answers-only control per family, paired, 95% CIs.
    Right (with strategy usage): share of the student's answers in each shape, per task family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from orca_core.eval.strategy_usage import SHAPES

    with_usage = usage is not None and len(usage)
    panels = 1 + bool(control) + bool(with_usage)
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.4), squeeze=False)
    ax = axes[0, 0]
    for i, (message, rows) in enumerate(curricula.items()):
        x = np.arange(len(rows))
        acc = np.array([100 * r["accuracy"] for r in rows])
        err = [acc - [100 * r["low"] for r in rows], [100 * r["high"] for r in rows] - acc]
        bold = message == headline
        ax.errorbar(x + (i - (len(curricula) - 1) / 2) * 0.1, acc, yerr=err, marker="o", capsize=4,
                    lw=2.2 if bold else 1, alpha=1 if bold else 0.6, color=f"C{i}",
                    label=f"{message} system message" + (" (headline)" if bold else ""))
        ax.set_xticks(x, [r["model"] for r in rows])
    n = next((rows[0]["n"] for rows in curricula.values() if rows), 0)
    ax.set_ylabel("macro accuracy, flexible (%)")
    ax.set_title(f"each stage vs the last (95% CI, {n} examples each)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if control:
        ax = axes[0, 1]
        rows = [*control["by_task"], {"task": "all (macro)", "difference": control["difference"],
                                      "low": control["difference_low"], "high": control["difference_high"]}]
        y = np.arange(len(rows))[::-1]
        diff = np.array([100 * r["difference"] for r in rows])
        ax.errorbar(diff, y, xerr=[diff - [100 * r["low"] for r in rows], [100 * r["high"] for r in rows] - diff],
                    fmt="o", capsize=4, color="C2")
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(y, [r["task"] for r in rows], fontsize=8)
        ax.set_xlabel("difference, pts (paired, 95% CI)")
        ax.set_title(f"{control['main']} minus answers-only {control['control']}\n"
                     f"({control['budget']['main']['tokens']:,} vs {control['budget']['control']['tokens']:,} "
                     "training tokens)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    if with_usage:
        ax = axes[0, panels - 1]
        rows = usage.set_index("task")
        shares = np.array([[rows.loc[t, f"share_{s}"] for s in SHAPES] for t in rows.index])
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(SHAPES)), [s.replace("-", "-\n", 1) for s in SHAPES], fontsize=7)
        ax.set_yticks(range(len(rows)), rows.index, fontsize=8)
        for y, task in enumerate(rows.index):  # the teacher's shape for the family: a box
            if rows.loc[task, "teacher_shape"] in SHAPES:
                x = SHAPES.index(rows.loc[task, "teacher_shape"])
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec="C3", lw=2))
            for x, share in enumerate(shares[y]):
                if share >= 0.05:
                    ax.text(x, y, f"{100 * share:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if share > 0.6 else "black")
        ax.set_title(f"student's strategy per family ({usage_message} system message);\n"
                     "red box: the teacher's", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_stage(summary: pd.DataFrame, stage: str, system_message: str) -> dict[str, Any]:
    """The macro row of one model (a recipe's final stage): accuracy with CI, examples, tasks."""
    macro = macro_rows(summary, system_message)
    rows = macro[macro["model"] == stage]
    if not len(rows):
        raise ValueError(f"the report has no {system_message!r} results for model {stage!r}")
    return _model_row(summary, rows.iloc[0], stage, system_message)
