"""Which reasoning strategy an answer follows, and whether the student picks one per task family.

Orca 2's claim is that the student learns to choose a strategy per task even
when the system message no longer says which (prompt erasing). On the
embedded default, the teacher is the oracle, whose strategies have distinct
surface forms, so an answer's strategy can be read off its shape:

    recall-then-generate    "Recalled facts:" list, then "Using what I recalled: ..."
    recall-reason-generate  "Recalled facts:" list, then the steps
    extract-generate        starts with a quoted piece of the input
    explain-then-answer     one paragraph ending "So the answer is X."
    step-by-step            several lines ending "So the answer is X."
    direct-answer           the answer alone

Some families' steps look like another strategy (letter counting's steps
quote words), so the student is compared with the teacher in the same terms:
`usage` reads the teacher's traces of each task with the same classifier, and
counts how often the student's answers have the teacher's shape. With real
teachers (free-form text) this needs a judge model instead.
"""

from __future__ import annotations

import pandas as pd

SHAPES = ("recall-then-generate", "recall-reason-generate", "extract-generate", "explain-then-answer",
          "step-by-step", "direct-answer")


def strategy_of(text: str) -> str:
    """The strategy whose shape `text` has (one of SHAPES)."""
    text = text.strip()
    if "Recalled facts:" in text:
        return "recall-then-generate" if "Using what I recalled:" in text else "recall-reason-generate"
    if text.startswith('"'):
        return "extract-generate"
    if "So the answer is" not in text:
        return "direct-answer"
    lines = [line for line in text.splitlines() if line.strip()]
    return "explain-then-answer" if len(lines) == 1 else "step-by-step"


def _mode(values: pd.Series) -> str:
    return values.value_counts().sort_index().idxmax() if len(values) else ""


def usage(examples: pd.DataFrame, traces: pd.DataFrame) -> pd.DataFrame:
    """Per (system message, task): the strategy the teacher was told to use, its traces' shape, the student's.

    examples: evaluation rows (task, system_message, output); traces: the Orca 2 teacher traces
    (task_name, strategy, response). `follows` is the share of the student's answers with the shape of
    the teacher's traces for that task; `share_<shape>` the share of the student's answers in each shape.
    """
    teacher = traces.assign(shape=traces["response"].map(strategy_of)).groupby("task_name").agg(
        instructed=("strategy", _mode), teacher_shape=("shape", _mode))
    student = examples.assign(shape=examples["output"].map(strategy_of))
    rows = []
    for (message, task), group in student.groupby(["system_message", "task"], sort=True):
        expected = teacher["teacher_shape"].get(task, "")
        rows.append({"system_message": message, "task": task, "n": len(group),
                     "instructed": teacher["instructed"].get(task, ""), "teacher_shape": expected,
                     "student_shape": _mode(group["shape"]), "follows": float((group["shape"] == expected).mean()),
                     **{f"share_{shape}": float((group["shape"] == shape).mean()) for shape in SHAPES}})
    return pd.DataFrame(rows)


def distinct_strategies(table: pd.DataFrame, system_message: str) -> int:
    """How many different strategies the student uses across tasks (its most used one per task)."""
    return int(table[table["system_message"] == system_message]["student_shape"].nunique())
