"""The evaluation report: Orca 2's headline table, per-task tables, accuracy and loss plots.

Input is summarize()'s output with a leading `model` column (one model per curriculum
stage: base, flan, orca1, orca2). The headline table reads the macro rows with the
FLEXIBLE extraction (what the model answered, whatever the format); the STRICT table
and the format-OK table show how often it also used the requested answer format.
A model or benchmark with no rows renders as "–": a partial evaluation still reports.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orca_core.eval.metrics import ALL_TASKS, SUITE, SUMMARY_COLUMNS  # noqa: E402

MISSING = "–"
METRICS = {"flexible": "accuracy, flexible extraction: % [95% CI]",
           "strict": "accuracy, strict extraction: % [95% CI]",
           "format_ok": "answer in the requested format: % of outputs"}
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.3em .6em;white-space:nowrap}th{background:#f2f2f2}
td{text-align:right}td:first-child{text-align:left;font-weight:600}img{max-width:100%;margin:.5em 0}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}.note{color:#555}"""


@dataclass
class Section:
    """A titled block of the report above the standard tables: lines of text, a table, a plot."""

    title: str
    lines: list[str] = field(default_factory=list)  # Markdown-light: **bold** is kept in Markdown, dropped in HTML
    table: tuple[list[str], list[list[str]]] | None = None
    image: str | None = None  # a file name in the report folder


def _order(values) -> list:
    return list(dict.fromkeys(values))


def _check(summary: pd.DataFrame) -> None:
    missing = [c for c in ["model", *SUMMARY_COLUMNS] if c not in summary.columns]
    if missing:
        raise ValueError(f"report summary lacks column(s) {missing}; have {list(summary.columns)}")


def _models(summary: pd.DataFrame, models: Sequence[str]) -> list[str]:
    """`models` in order, then any model the summary has that `models` forgot (never dropped silently)."""
    return list(models) + [m for m in _order(summary["model"]) if m not in models]


def _columns(macro: pd.DataFrame) -> list[tuple[str, str]]:
    """(benchmark, system message) pairs: benchmarks in order of appearance (the suite average last)."""
    benchmarks = [b for b in _order(macro["benchmark"]) if b != SUITE]
    benchmarks += [SUITE] if (macro["benchmark"] == SUITE).any() else []
    return [(b, s) for b in benchmarks for s in _order(macro["system_message"])]


def _label(benchmark: str, system: str) -> str:
    return f"{'average' if benchmark == SUITE else benchmark} · {system}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(row: Mapping | None, metric: str) -> str:
    if row is None:
        return MISSING
    if metric == "format_ok":
        value = row["format_ok_rate"]
        return MISSING if pd.isna(value) else f"{_pct(value)}%"
    acc, low, high = (row[f"{k}_{metric}"] for k in ("accuracy", "low", "high"))
    return MISSING if pd.isna(acc) else f"{_pct(acc)}% [{_pct(low)}–{_pct(high)}]"


def _lookup(frame: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, dict]:
    return {tuple(r[k] for k in keys): r for r in frame.to_dict("records")}


def _headline(summary: pd.DataFrame, models: Sequence[str], metric: str) -> tuple[list[str], list[list[str]]]:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    macro = summary[summary["task"] == ALL_TASKS]
    cells = _lookup(macro, ["model", "benchmark", "system_message"])
    columns = _columns(macro)
    header = ["model", *(_label(b, s) for b, s in columns)]
    rows = [[m, *(_cell(cells.get((m, b, s)), metric) for b, s in columns)] for m in _models(summary, models)]
    return header, rows


def _per_task(summary: pd.DataFrame, models: Sequence[str], benchmark: str) -> tuple[list[str], list[list[str]]]:
    rows = summary[(summary["benchmark"] == benchmark) & (summary["task"] != ALL_TASKS)]
    cells = _lookup(rows, ["task", "model", "system_message"])
    columns = [(m, s) for m in _models(summary, models) for s in _order(rows["system_message"])]
    header = ["task", *(f"{m} · {s}" for m, s in columns)]
    body = [[t, *(_cell(cells.get((t, m, s)), "flexible") for m, s in columns)] for t in sorted(_order(rows["task"]))]
    return header, body


def table_rows(summary: pd.DataFrame, models: Sequence[str], metric: str = "flexible") -> list[dict[str, str]]:
    """The headline table as JSON-able rows ({"model": ..., "<benchmark> · <system>": "acc% [low–high]"})."""
    _check(summary)
    header, rows = _headline(summary, models, metric)
    return [dict(zip(header, row)) for row in rows]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(summary: pd.DataFrame, models: Sequence[str], metric: str = "flexible") -> str:
    """The headline table (macro rows, one line per model) as a Markdown table."""
    _check(summary)
    return _markdown(*_headline(summary, models, metric))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _facts(summary: pd.DataFrame) -> list[str]:
    """Lines under the tables: examples per benchmark, and where prompts did not fit the context."""
    macro = summary[(summary["task"] == ALL_TASKS) & (summary["benchmark"] != SUITE)]
    sizes = macro.groupby("benchmark", sort=False)["n"].max()
    tasks = summary[summary["task"] != ALL_TASKS].groupby("benchmark")["task"].nunique()
    facts = ["Examples per model and system message: " + ", ".join(
        f"{b} {int(n)} ({int(tasks.get(b, 1))} task(s))" for b, n in sizes.items())]
    long = macro[macro["prompt_too_long"] > 0]
    if len(long):
        facts.append("Prompts longer than the model's context (scored wrong): " + ", ".join(
            f"{r.model} {r.benchmark} · {r.system_message}: {int(r.prompt_too_long)}" for r in long.itertuples()))
    return facts


def plot_accuracy(summary: pd.DataFrame, models: Sequence[str], path: Path) -> None:
    """One panel per benchmark: macro accuracy per model with 95% CIs, a colour per system message.

    Flexible extraction: filled markers, solid line, CI bars. Strict: hollow markers, dashed line.
    """
    macro = summary[summary["task"] == ALL_TASKS]
    models = _models(summary, models)
    benchmarks = _order(b for b, _ in _columns(macro)) or [""]
    systems = _order(macro["system_message"])
    cells = _lookup(macro, ["model", "benchmark", "system_message"])
    ncols = min(3, len(benchmarks))
    nrows = math.ceil(len(benchmarks) / ncols)
    legend_cols = max(1, min(2 * len(systems), int(4.6 * ncols / 2.4)))
    legend_h = 0.15 + 0.25 * math.ceil(2 * len(systems) / legend_cols)  # inches under the panels
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows + legend_h), sharey=True,
                             squeeze=False)
    highs = [r[k] for r in cells.values() for k in ("high_flexible", "accuracy_strict") if not pd.isna(r[k])]
    top = min(103.0, 100 * max(highs, default=1.0) * 1.1 + 5)  # zoom in on a weak model's few percent
    x = np.arange(len(models))

    def get(row: dict | None, key: str) -> float:
        return np.nan if row is None else 100 * row[key]

    for ax, benchmark in zip(axes.flat, benchmarks):
        for i, system in enumerate(systems):
            shift = (i - (len(systems) - 1) / 2) * 0.12
            color = f"C{i}"
            rows = [cells.get((m, benchmark, system)) for m in models]
            acc, low, high = (np.array([get(r, f"{k}_flexible") for r in rows]) for k in ("accuracy", "low", "high"))
            ax.errorbar(x + shift, acc, yerr=[acc - low, high - acc], color=color, marker="o", ms=6, capsize=3,
                        lw=1.6, label=f"{system} · flexible (95% CI)")
            ax.plot(x + shift, [get(r, "accuracy_strict") for r in rows], color=color, marker="o", ms=6, ls="--",
                    lw=1, mfc="white", label=f"{system} · strict")
        ax.set_title("average over benchmarks" if benchmark == SUITE else benchmark, fontsize=11)
        ax.set_xticks(x, models)
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_ylim(-3, top)  # 0% and 100% points stay off the frame
        ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= top])
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(benchmarks):]:
        ax.set_visible(False)
    if not len(macro):
        axes[0, 0].text(0.5, 0.5, "no results", ha="center", va="center", transform=axes[0, 0].transAxes)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:  # flexible (the headline) first, then strict, each in system-message order
        pairs = sorted(zip(handles, labels), key=lambda hl: "strict" in hl[1])
        handles, labels = [h for h, _ in pairs], [label for _, label in pairs]
        fig.legend(handles, labels, loc="lower center", ncol=legend_cols, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_metrics(stage: str, path: Path) -> pd.DataFrame:
    path = Path(path)
    path = path / "metrics.parquet" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"loss curve of stage {stage!r}: {path} does not exist")
    frame = pd.read_parquet(path)
    missing = [c for c in ("step", "loss") if c not in frame.columns]
    if missing:
        raise ValueError(f"loss curve of stage {stage!r}: {path} lacks column(s) {missing}")
    return frame.sort_values("step")


def plot_loss(loss_curves: Mapping[str, Path], path: Path) -> None:
    """Training loss of every stage laid end to end on one global-step axis, a dashed line at each boundary.

    Each stage's raw per-step loss is drawn faint, its exponential moving average solid.
    `loss_curves` maps stage name -> metrics.parquet (or the trained stage's folder).
    """
    fig, ax = plt.subplots(figsize=(9, 4.2))
    offset = 0
    for i, (stage, source) in enumerate(loss_curves.items()):
        frame = _read_metrics(stage, source)
        steps = frame["step"].to_numpy() + offset
        smooth = frame["loss"].ewm(span=max(2, len(frame) // 15)).mean()
        ax.plot(steps, frame["loss"], color=f"C{i}", alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color=f"C{i}", lw=2, label=stage)
        if offset:
            ax.axvline(offset + 0.5, color="0.4", ls="--", lw=1)
        ax.annotate(stage, (offset + 0.5, 1), xycoords=("data", "axes fraction"), xytext=(4, -14),
                    textcoords="offset points", fontsize=10, color=f"C{i}", fontweight="bold")
        offset = int(steps.max()) if len(steps) else offset
    ax.set_xlabel("optimizer step (stages end to end)")
    ax.set_ylabel("training loss (label tokens)")
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summary: pd.DataFrame, out_dir: Path, *, models: list[str],
                 loss_curves: Mapping[str, Path] | None = None,
                 title: str = "Orca 2 reproduction: zero-shot evaluation",
                 notes: Mapping[str, object] | None = None,
                 sections: Sequence[Section] = ()) -> dict[str, Path]:
    """Write report.md, report.html, accuracy.png, loss.png (with loss_curves) and summary.csv to out_dir.

    Returns file name -> path. `notes` are run facts shown at the top (recipe, checkpoint keys, backend);
    `sections` (the findings) come right after them, before the standard tables.
    """
    _check(summary)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"summary.csv": out_dir / "summary.csv", "accuracy.png": out_dir / "accuracy.png"}
    summary.to_csv(files["summary.csv"], index=False)
    plot_accuracy(summary, models, files["accuracy.png"])
    if loss_curves:
        files["loss.png"] = out_dir / "loss.png"
        plot_loss(loss_curves, files["loss.png"])
    tables = [(METRICS[m], _headline(summary, models, m)) for m in METRICS]
    benchmarks = [b for b in _order(summary["benchmark"]) if b != SUITE]
    per_task = [(b, _per_task(summary, models, b)) for b in benchmarks]
    facts = _facts(summary)
    images = [(n, f"{n.removesuffix('.png')} plot") for n in ("accuracy.png", "loss.png") if n in files]

    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in (notes or {}).items()] + ([""] if notes else [])
    for section in sections:
        md += [f"## {section.title}", ""] + [line for text in section.lines for line in (text, "")]
        md += [_markdown(*section.table), ""] if section.table else []
        md += [f"![{section.title}]({section.image})", ""] if section.image else []
    for heading, table in tables:
        md += [f"## {heading[0].upper()}{heading[1:]}", "", _markdown(*table), ""]
    md += [f"_{fact}_" for fact in facts] + [""]
    md += [f"![{alt}]({name})" for name, alt in images] + [""]
    md += ["## Per-task accuracy (flexible, % [95% CI])", ""]
    for benchmark, table in per_task:
        md += [f"<details><summary>{benchmark}</summary>", "", _markdown(*table), "", "</details>", ""]
    files["report.md"] = out_dir / "report.md"
    files["report.md"].write_text("\n".join(md))

    esc = html.escape
    page = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
            f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    if notes:
        page.append("<ul>" + "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in notes.items())
                    + "</ul>")
    for section in sections:
        page.append(f"<h2>{esc(section.title)}</h2>")
        page += [f"<p>{esc(text.replace('**', ''))}</p>" for text in section.lines]
        page += [_html_table(*section.table)] if section.table else []
        page += [f"<img src='{esc(section.image)}' alt='{esc(section.title)}'>"] if section.image else []
    for heading, table in tables:
        page += [f"<h2>{esc(heading[0].upper() + heading[1:])}</h2>", _html_table(*table)]
    page += [f"<p class='note'>{esc(fact)}</p>" for fact in facts]
    page += [f"<img src='{name}' alt='{alt}'>" for name, alt in images]
    page.append("<h2>Per-task accuracy (flexible, % [95% CI])</h2>")
    page += [f"<details><summary>{esc(b)}</summary>{_html_table(*t)}</details>" for b, t in per_task]
    page.append("</body></html>")
    files["report.html"] = out_dir / "report.html"
    files["report.html"].write_text("\n".join(page))
    return files
