"""Report: the paper-style tables (cells, order, missing values), the files, and the plots as valid images.

The summary comes from summarize() on synthetic per-example results: 4 models (base, flan, orca1,
orca2) x 2 benchmarks (bbh with 2 tasks, gsm8k) x 2 system messages, with known accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orca_core.eval.metrics import suite_macro, summarize
from orca_core.eval.report import markdown_table, table_rows, write_report

MODELS = ["base", "flan", "orca1", "orca2"]


def _examples(right: int, system: str) -> pd.DataFrame:
    """`right` of 4 correct (flexible) per task; strict gets one fewer; 'cautious' answers one more right on gsm8k."""
    rows = []
    for benchmark, task in [("bbh", "t1"), ("bbh", "t2"), ("gsm8k", "gsm8k")]:
        k = min(4, right + (system == "cautious" and benchmark == "gsm8k"))
        k += task == "t2" and k < 4  # bbh t2 is one easier than t1
        for i in range(4):
            rows.append({"benchmark": benchmark, "task": task, "id": f"{task}-{i}", "system_message": system,
                         "prompt": "q", "output": "a", "strict": None, "flexible": None, "gold": "a",
                         "correct_strict": i < k - 1, "correct_flexible": i < k, "format_ok": i % 2 == 0,
                         "finish_reason": "prompt_too_long" if i == 3 and right == 0 else "stop",
                         "output_tokens": 10 * (i + 1)})
    return pd.DataFrame(rows)


def _summary(models=MODELS, suite: bool = False) -> pd.DataFrame:
    frames = []
    for right, model in enumerate(models):
        examples = pd.concat([_examples(right, s) for s in ("empty", "cautious")], ignore_index=True)
        summary = summarize(examples, samples=200, seed=0)
        summary = pd.concat([summary, suite_macro(examples, samples=200)], ignore_index=True) if suite else summary
        frames.append(summary.assign(model=model)[["model", *summary.columns]])
    return pd.concat(frames, ignore_index=True)


def _loss_curve(path: Path, steps: int, start: float) -> Path:
    path.mkdir(parents=True)
    step = np.arange(1, steps + 1)
    pd.DataFrame({"step": step, "epoch": 0, "loss": start * np.exp(-step / steps) + 0.1 * np.sin(step),
                  "lr": 1e-4, "tokens": 100, "label_tokens": 50, "tokens_per_s": 1.0, "seconds": 1.0,
                  "elapsed": step.astype(float)}).to_parquet(path / "metrics.parquet")
    return path / "metrics.parquet"


def _assert_image(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 100 < pixels.max()  # something dark drawn on a light background


def test_headline_table_cells_and_order():
    summary = _summary()
    table = markdown_table(summary, MODELS)
    lines = table.splitlines()
    assert lines[0] == "| model | bbh · empty | bbh · cautious | gsm8k · empty | gsm8k · cautious |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {m}" for m in MODELS]
    rows = {row["model"]: row for row in table_rows(summary, MODELS)}
    assert list(rows) == MODELS
    assert rows["orca2"]["gsm8k · empty"].startswith("75.0% [")  # 3 of 4
    assert rows["orca1"]["gsm8k · cautious"].startswith("75.0% [")  # 2 + 1 of 4
    assert rows["flan"]["bbh · empty"].startswith("37.5% [")  # macro of t1 1/4 and t2 2/4
    assert rows["base"]["gsm8k · empty"] == "0.0% [0.0–0.0]"
    assert rows["orca2"]["gsm8k · cautious"] == "100.0% [100.0–100.0]"
    strict = {row["model"]: row for row in table_rows(summary, MODELS, metric="strict")}
    assert strict["orca2"]["gsm8k · empty"].startswith("50.0% [")
    assert {row["model"]: row for row in table_rows(summary, MODELS, "format_ok")}["base"]["bbh · empty"] == "50.0%"
    json.dumps(table_rows(summary, MODELS))  # a Prefect table artifact takes it as is
    with pytest.raises(ValueError, match="metric"):
        markdown_table(summary, MODELS, metric="exact")


def test_missing_models_and_benchmarks_render_as_dashes():
    summary = _summary()
    summary = summary[~((summary["model"] == "flan") & (summary["benchmark"] == "gsm8k"))]
    rows = table_rows(summary[summary["model"] != "orca1"], ["orca3", *MODELS])
    assert [row["model"] for row in rows] == ["orca3", "base", "flan", "orca1", "orca2"]
    assert set(list(rows[0].values())[1:]) == {"–"} and set(list(rows[3].values())[1:]) == {"–"}
    assert rows[2]["gsm8k · empty"] == "–" and rows[2]["bbh · empty"] != "–"
    # a model the caller did not list is appended, not dropped
    assert [row["model"] for row in table_rows(summary, ["orca2"])] == ["orca2", "base", "flan", "orca1"]


def test_suite_average_is_the_last_column():
    header = markdown_table(_summary(suite=True), MODELS).splitlines()[0]
    assert header.endswith("| gsm8k · cautious | average · empty | average · cautious |")


def test_write_report_files(tmp_path):
    summary = _summary(suite=True)
    curves = {"flan": _loss_curve(tmp_path / "flan", 30, 7.0),
              "orca1": _loss_curve(tmp_path / "orca1", 80, 4.0).parent,  # a stage folder works too
              "orca2": _loss_curve(tmp_path / "orca2", 60, 2.0)}
    out = tmp_path / "report"
    files = write_report(summary, out, models=MODELS, loss_curves=curves, title="tiny: evaluation",
                         notes={"suite": "tiny-suite", "backend": "hf"})
    assert set(files) == {"report.md", "report.html", "accuracy.png", "loss.png", "summary.csv"}
    assert all(path.parent == out and path.stat().st_size > 0 for path in files.values())
    _assert_image(files["accuracy.png"])
    _assert_image(files["loss.png"])
    pd.testing.assert_frame_equal(pd.read_csv(files["summary.csv"]).drop(columns=["strict", "flexible"],
                                                                            errors="ignore"),
                                  summary.reset_index(drop=True), check_dtype=False)

    md = files["report.md"].read_text()
    assert md.startswith("# tiny: evaluation\n") and "- **suite**: tiny-suite" in md
    assert md.count(markdown_table(summary, MODELS)) == 1
    assert markdown_table(summary, MODELS, "strict") in md and markdown_table(summary, MODELS, "format_ok") in md
    assert "![accuracy plot](accuracy.png)" in md and "![loss plot](loss.png)" in md
    assert "<details><summary>bbh</summary>" in md
    assert "| task | base · empty | base · cautious | flan · empty |" in md
    assert "| t2 | 25.0% [" in md  # base, bbh t2: 1 of 4
    assert "Prompts longer than the model's context" in md and "base bbh · empty: 2" in md
    assert md.index("| base |") < md.index("| flan |") < md.index("| orca1 |") < md.index("| orca2 |")

    page = files["report.html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert page.count("<table>") == 3 + 2  # three headline tables, a per-task table per benchmark
    assert "<th>gsm8k · empty</th>" in page and "<td>75.0% [" in page
    assert "<img src='accuracy.png'" in page and "<img src='loss.png'" in page
    assert "<details><summary>gsm8k</summary>" in page


def test_report_without_loss_curves_or_results(tmp_path):
    files = write_report(_summary().iloc[:0], tmp_path, models=MODELS)
    assert "loss.png" not in files and not (tmp_path / "loss.png").exists()
    _assert_image(files["accuracy.png"])
    assert "| orca2 |" in files["report.md"].read_text()


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="model"):
        write_report(_summary().drop(columns="model"), tmp_path, models=MODELS)
    with pytest.raises(FileNotFoundError, match="'orca1'.*nowhere"):
        write_report(_summary(), tmp_path, models=MODELS, loss_curves={"orca1": tmp_path / "nowhere"})


def test_findings_sections_render_the_paired_difference_column(tmp_path):
    from orca_core.eval import findings
    from orca_core.eval.report import Section

    frames = {m: pd.concat([_examples(right, s) for s in ("empty", "cautious")], ignore_index=True)
              for right, m in enumerate(MODELS)}
    summary = _summary(suite=True)  # two benchmarks: the findings judge the average over them
    rows = findings.curriculum(summary, frames, MODELS, "empty", samples=200, seed=0)
    assert [r["vs_previous"] for r in rows] == ["", "above", "above", "above"]  # one more item right in every task
    sections = [Section("Finding 1", [findings.verdict(rows)], findings.curriculum_table(rows)),
                Section("Finding 1 per task", [], findings.by_task_table(rows))]
    files = write_report(summary, tmp_path, models=MODELS, sections=sections)
    md, page = files["report.md"].read_text(), files["report.html"].read_text()
    assert "| model | accuracy % [95% CI] | examples | tasks | difference vs previous, pts [95% CI] | vs previous |" in md
    assert "| base | 6.2 [0.0–18.8] | 12 | 3 |  |  |" in md
    assert "| orca2 | 81.2 [50.0–100.0] | 12 | 3 | +25.0 [6.2, 56.4] | above |" in md  # golden, seed 0
    assert "| task | flan vs base | orca1 vs flan | orca2 vs orca1 |" in md
    assert "| gsm8k / gsm8k | +25.0 [0.0, 75.0] | +25.0 [0.0, 75.0] | +25.0 [0.0, 75.0] |" in md
    assert "**Holds**: orca2 > orca1 > flan > base" in md and "<p>Holds: orca2 &gt; orca1 &gt; flan &gt; base" in page
    assert "<th>difference vs previous, pts [95% CI]</th>" in page and "<td>+25.0 [6.2, 56.4]</td>" in page
    assert md.index("## Finding 1\n") < md.index("## Finding 1 per task") < md.index("## Accuracy, flexible")
