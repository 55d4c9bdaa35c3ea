"""The findings a run must show (Orca's, at any scale), read off the evaluation.

1. Each curriculum stage beats the one before it on the macro average, with
   95 % bootstrap CIs that do not overlap (`curriculum`).
2. Explanation tuning beats answer imitation at the same token budget: a
   recipe's final stage against an answers-only recipe's (`compare`, used by
   `orca compare`).
3. The final student picks a strategy per task family when it is given only
   the generic system message (`strategy_usage.usage`, summarised here).

Each function returns plain rows (lists of dicts) that the report renders as
tables and plots; "separate" means the lower CI bound of a model is above the
upper bound of the one it is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from orca_core.eval.metrics import ALL_TASKS, SUITE
from orca_core.eval.strategy_usage import distinct_strategies


def macro_rows(summary: pd.DataFrame, system_message: str) -> pd.DataFrame:
    """One macro row per model: the suite average when there are several benchmarks, else the benchmark's."""
    macro = summary[(summary["task"] == ALL_TASKS) & (summary["system_message"] == system_message)]
    if (macro["benchmark"] == SUITE).any():
        return macro[macro["benchmark"] == SUITE]
    benchmarks = list(dict.fromkeys(macro["benchmark"]))
    if len(benchmarks) > 1:
        raise ValueError(f"summary has benchmarks {benchmarks} but no suite average row")
    return macro


def _tasks(summary: pd.DataFrame, model: str, system_message: str) -> int:
    rows = summary[(summary["model"] == model) & (summary["system_message"] == system_message)
                   & (summary["task"] != ALL_TASKS) & (summary["benchmark"] != SUITE)]
    return int(rows["task"].nunique())


def curriculum(summary: pd.DataFrame, models: Sequence[str], system_message: str) -> list[dict[str, Any]]:
    """Per model in curriculum order: macro accuracy (flexible) with CI, examples, and the step from the previous model.

    `vs_previous` is "separate" when this model's CI lies wholly above the previous model's,
    "below" when wholly below, "overlap" otherwise ("" for the first model).
    """
    macro = macro_rows(summary, system_message).set_index("model")
    rows: list[dict[str, Any]] = []
    for model in models:
        if model not in macro.index:
            continue
        r = macro.loc[model]
        row = {"model": model, "accuracy": float(r["accuracy_flexible"]), "low": float(r["low_flexible"]),
               "high": float(r["high_flexible"]), "n": int(r["n"]), "tasks": _tasks(summary, model, system_message),
               "delta": None, "vs_previous": ""}
        if rows:
            row["delta"] = row["accuracy"] - rows[-1]["accuracy"]
            row["vs_previous"] = compare(row, rows[-1])
        rows.append(row)
    return rows


def ordering_holds(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether every model in `rows` after the first is separately above the one before it."""
    return len(rows) > 1 and all(r["vs_previous"] == "separate" for r in rows[1:])


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'separate' when a's CI lies wholly above b's, 'below' when wholly below, else 'overlap'."""
    return "separate" if a["low"] > b["high"] else "below" if a["high"] < b["low"] else "overlap"


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


# -- rendering: the report's Findings sections and findings.png ------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def curriculum_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "accuracy % [95% CI]", "examples", "tasks", "vs previous"]
    body = []
    for r in rows:
        step = "" if r["delta"] is None else f"{100 * r['delta']:+.1f} pts, CIs {r['vs_previous']}"
        body.append([r["model"], f"{_pct(r['accuracy'])} [{_pct(r['low'])}–{_pct(r['high'])}]", str(r["n"]),
                     str(r["tasks"]), step])
    return header, body


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence: does each stage beat the one before it with separate CIs?"""
    if len(rows) < 2:
        return "Only one stage was evaluated: no ordering to check."
    chain = " > ".join(r["model"] for r in reversed(rows))
    if ordering_holds(rows):
        return f"**Holds**: {chain}, every step with non-overlapping 95% CIs."
    failed = [f"{prev['model']} -> {r['model']} ({r['vs_previous']})" for prev, r in zip(rows, rows[1:])
              if r["vs_previous"] != "separate"]
    return f"**Does not hold** ({chain} expected): " + ", ".join(failed) + "."


def strategy_table(table: pd.DataFrame, system_message: str) -> tuple[list[str], list[list[str]]]:
    header = ["task family", "teacher was told", "teacher's answers look like", "student's answers look like",
              "student follows the teacher", "examples"]
    rows = table[table["system_message"] == system_message]
    body = [[r.task, r.instructed, r.teacher_shape, r.student_shape, f"{_pct(r.follows)}%", str(r.n)]
            for r in rows.itertuples()]
    return header, body


def plot(curricula: dict[str, list[dict[str, Any]]], headline: str, usage: pd.DataFrame | None,
         usage_message: str | None, path) -> None:
    """Left: macro accuracy per stage with 95% CIs, one line per system message (the headline one bold).
    Right (with strategy usage): share of the student's answers in each shape, per task family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from orca_core.eval.strategy_usage import SHAPES

    panels = 2 if usage is not None and len(usage) else 1
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
    if panels == 2:
        ax = axes[0, 1]
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
    """The macro row of one model (a recipe's final stage) as curriculum() reports it."""
    rows = curriculum(summary, [stage], system_message)
    if not rows:
        raise ValueError(f"the report has no {system_message!r} results for model {stage!r}")
    return rows[0]
