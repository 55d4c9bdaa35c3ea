"""Publish reports as Prefect artifacts: a run's summary with its timeline; the evaluation's table and report."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from orca_core.eval.steps import ordered_table
from orca_core.store import ArtifactRef, ArtifactStore


@task(name="publish-report")
def publish_report(store_root: str, ref: ArtifactRef, key_prefix: str = "orca-eval") -> None:
    """The table (flexible accuracy with 95 % CI per model x benchmark x system message), the report, a link to it."""
    store = ArtifactStore(store_root)
    folder = store.local_dir(ref)
    table = ordered_table(store.manifest(ref)["stats"])
    create_table_artifact(table, key=f"{key_prefix}-table", description="zero-shot accuracy (flexible), 95 % CI")
    report = (Path(folder) / "report.md").read_text()
    create_markdown_artifact(report, key=f"{key_prefix}-report", description=f"evaluation report ({ref.url})")
    create_link_artifact(f"file://{Path(folder, 'report.html').resolve()}" if store.is_local else ref.url + "/report.html",
                         link_text="report.html (plots)", key=f"{key_prefix}-report-html")


def timeline(rows: list[dict], wall_s: float, width: int = 48) -> str:
    """Text Gantt bars of the steps that ran (start to end, from the run's start), then wall time vs step time."""
    ran = [r for r in rows if r.get("start") is not None]
    scale = width / max(wall_s, 1e-9)
    lines = []
    for r in ran:
        first = min(width - 1, int(r["start"] * scale))
        last = max(first + 1, min(width, round(r["end"] * scale)))
        bar = " " * first + "#" * (last - first) + " " * (width - last)
        lines.append(f"{r['step']:<16}|{bar}| {r['start']:7.1f} -> {r['end']:7.1f} s  {r['state']}")
    in_steps = sum(r["end"] - r["start"] for r in ran)
    lines.append(f"wall {wall_s:.1f} s, {in_steps:.1f} s in steps ({in_steps / max(wall_s, 1e-9):.2f}x: "
                 "above 1 where steps overlapped)")
    return "\n".join(lines)


def publish_run_summary(rows: list[dict], wall_s: float, key: str) -> None:
    """The run's summary artifact: per step its state, why, key, rows, start/end and time; the timeline below."""
    lines = ["| step | state | why | key | rows | start s | end s | seconds | artifact |", "|---" * 9 + "|"]
    lines += [f"| {r['step']} | {r['state']} | {r['why']} | `{r['key'][:12]}` | {r['rows']} | "
              f"{'' if r['start'] is None else r['start']} | {'' if r['end'] is None else r['end']} | "
              f"{r['seconds']:.1f} | `{r['artifact']}` |" for r in rows]
    text = "\n".join(lines) + "\n\n```\n" + timeline(rows, wall_s) + "\n```\n"
    create_markdown_artifact(text, key=key, description="steps of this run: state, why, and when each ran")
