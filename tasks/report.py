"""Publish an evaluation report as Prefect artifacts: the paper-style table and the markdown report."""

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
