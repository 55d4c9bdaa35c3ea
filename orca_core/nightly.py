"""Nightly evaluation bookkeeping: which checkpoints, the history of results, and regressions.

Each nightly run scores the newest checkpoint of every stage in the store (or
a named list of folders), writes one history record to
`<store>/nightly/<timestamp>.json`, and compares each (model, benchmark,
system message) to the newest earlier record of the same model. A score below
the earlier result's 95 % CI is a regression: the flow fails and names it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from orca_core.store import ArtifactStore

HISTORY = "nightly"


def newest_checkpoints(store: ArtifactStore) -> dict[str, Path]:
    """Model name -> the newest published checkpoint of each `train-<stage>` step (by manifest time)."""
    found: dict[str, Path] = {}
    if not store.fs.exists(store.url()):
        return found
    for path in store.fs.ls(store.url(), detail=False):
        step = path.rstrip("/").rsplit("/", 1)[-1]
        if not step.startswith("train-"):
            continue
        dated = [(store.read_json(step, key, "manifest.json")["created_at"], key) for key in store.keys(step)
                 if store.check(step, key) == "ok"]
        if dated:
            found[step.removeprefix("train-")] = store.local_dir(store.ref(step, max(dated)[1]))
    return dict(sorted(found.items()))


def record(summary: pd.DataFrame, model: str, checkpoint: str, digest: str) -> list[dict[str, Any]]:
    """One history row per (benchmark, system message) from a checkpoint's macro rows."""
    macro = summary[summary["task"] == "(all)"]
    return [{"model": model, "checkpoint": checkpoint, "digest": digest, "benchmark": row.benchmark,
             "system_message": row.system_message, "n": int(row.n), "accuracy": float(row.accuracy_flexible),
             "low": float(row.low_flexible), "high": float(row.high_flexible)} for row in macro.itertuples()]


def write_history(store: ArtifactStore, rows: list[dict[str, Any]], run: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = store.url(HISTORY, f"{stamp}-{run}.json")
    store.fs.makedirs(store.url(HISTORY), exist_ok=True)
    with store.fs.open(path + ".tmp", "w") as f:
        json.dump({"created_at": stamp, "run": run, "results": rows}, f, indent=2)
    store.fs.mv(path + ".tmp", path)  # readers never see half a record
    return path


def history(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every nightly record, oldest first."""
    folder = store.url(HISTORY)
    if not store.fs.exists(folder):
        return []
    paths = sorted(p for p in store.fs.ls(folder, detail=False) if p.endswith(".json"))
    records = []
    for path in paths:
        with store.fs.open(path) as f:
            records.append({**json.load(f), "path": path})
    return records


@dataclass(frozen=True)
class Regression:
    model: str
    benchmark: str
    system_message: str
    checkpoint: str
    previous_checkpoint: str
    previous: float
    previous_low: float
    now: float

    def line(self) -> str:
        return (f"| {self.model} | {self.benchmark} | {self.system_message} | `{self.checkpoint}` | "
                f"{100 * self.previous:.1f}% [CI low {100 * self.previous_low:.1f}%] (`{self.previous_checkpoint}`) | "
                f"{100 * self.now:.1f}% |")


def regressions(current: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[Regression]:
    """Results below the 95 % CI of the same model's newest earlier result."""
    found = []
    for row in current:
        previous = next((old for rec in reversed(earlier) for old in rec["results"]
                         if (old["model"], old["benchmark"], old["system_message"])
                         == (row["model"], row["benchmark"], row["system_message"])), None)
        if previous is not None and row["accuracy"] < previous["low"]:
            found.append(Regression(row["model"], row["benchmark"], row["system_message"], row["checkpoint"],
                                    previous["checkpoint"], previous["accuracy"], previous["low"], row["accuracy"]))
    return found


def regression_markdown(found: list[Regression]) -> str:
    lines = ["# Nightly eval: regressions", "",
             "A score below the 95 % CI of the same model's previous nightly result (flexible extraction).", "",
             "| model | benchmark | system message | checkpoint | previous | now |", "|---|---|---|---|---|---|"]
    return "\n".join(lines + [r.line() for r in found])


def as_dicts(found: list[Regression]) -> list[dict[str, Any]]:
    return [asdict(r) for r in found]
