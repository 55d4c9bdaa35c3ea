"""Nightly evaluation bookkeeping: which checkpoints, the history of results, and regressions.

Each nightly run scores the newest checkpoint of every stage in the store (or
a named list of folders), writes one history record to
`<store>/nightly/<timestamp>.json`, and compares each (model, benchmark,
system message) to the newest earlier record of the same model. Both results
keep their per-example rows in the store (`eval-results/<key>/examples.parquet`,
the key is in the record), so the comparison is the paired difference on the
items both answered: a regression is a difference whose 95 % CI lies wholly
below 0. The flow fails and names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from orca_core.eval.evaluate import EXAMPLES_FILE, RESULTS_STEP
from orca_core.eval.findings import PAIRED_COLUMNS, difference_cell, paired
from orca_core.eval.metrics import BELOW
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


def record(summary: pd.DataFrame, model: str, checkpoint: str, digest: str,
           results: dict[str, str]) -> list[dict[str, Any]]:
    """One history row per (benchmark, system message) from a checkpoint's macro rows.

    `results`: "<benchmark>.<system message>" -> the key of its eval-results artifact (the
    checkpoint eval's results.json), recorded so a later night can pair with its examples.
    """
    macro = summary[summary["task"] == "(all)"]
    rows = []
    for row in macro.itertuples():
        job = f"{row.benchmark}.{row.system_message}"
        if job not in results:
            raise ValueError(f"results.json names no eval-results artifact for {job}; it has {sorted(results)}")
        rows.append({"model": model, "checkpoint": checkpoint, "digest": digest, "benchmark": row.benchmark,
                     "system_message": row.system_message, "n": int(row.n), "accuracy": float(row.accuracy_flexible),
                     "low": float(row.low_flexible), "high": float(row.high_flexible), "results_key": results[job]})
    return rows


def results_examples(store: ArtifactStore, key: str) -> pd.DataFrame:
    """The per-example rows of one eval-results artifact, verified against its manifest first."""
    ref = store.lookup(RESULTS_STEP, key)  # checks sizes and sha256 (store.verify); a corrupt one is moved aside
    if ref is None:
        raise LookupError(f"{RESULTS_STEP}/{key} is missing from {store.url()} or failed verification")
    return pq.read_table(store.local_dir(ref) / EXAMPLES_FILE, columns=PAIRED_COLUMNS).to_pandas()


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
    now: float
    difference: float  # now - previous, paired on the items both answered
    low: float
    high: float
    pairs: int

    def line(self) -> str:
        return (f"| {self.model} | {self.benchmark} | {self.system_message} | `{self.checkpoint}` | "
                f"{100 * self.previous:.1f}% (`{self.previous_checkpoint}`) | {100 * self.now:.1f}% | "
                f"{difference_cell(self.difference, self.low, self.high)} | {self.pairs} |")


def regressions(current: list[dict[str, Any]], earlier: list[dict[str, Any]], examples: Callable[[str], pd.DataFrame],
                samples: int = 1000, seed: int = 0) -> tuple[list[Regression], list[str]]:
    """Results whose paired difference with the same model's newest earlier result has a 95 % CI below 0.

    `examples(results_key)` loads a result's per-example rows (results_examples). Returns the
    regressions and notes on the comparisons that could not be made (an earlier record without
    a results key, a result gone from the store, no items in common) or that left items out.
    """
    found, notes = [], []
    for row in current:
        name = f"{row['model']}/{row['benchmark']}/{row['system_message']}"
        previous = next((old for rec in reversed(earlier) for old in rec["results"]
                         if (old["model"], old["benchmark"], old["system_message"])
                         == (row["model"], row["benchmark"], row["system_message"])), None)
        if previous is None:
            continue
        if not previous.get("results_key"):
            notes.append(f"{name}: the previous record has no per-example results key (written by an older "
                         "version): not compared")
            continue
        try:
            step = paired(examples(row["results_key"]), examples(previous["results_key"]), row["system_message"],
                          samples=samples, seed=seed, intersect=True, names=("now", "previous"))
        except (LookupError, ValueError) as err:
            notes.append(f"{name}: not compared: {err}")
            continue
        if step["only_a"] or step["only_b"]:
            notes.append(f"{name}: paired on the {step['pairs']} items both answered ({step['only_a']} only now, "
                         f"{step['only_b']} only in the previous result)")
        if step["vs"] == BELOW:
            found.append(Regression(row["model"], row["benchmark"], row["system_message"], row["checkpoint"],
                                    previous["checkpoint"], previous["accuracy"], row["accuracy"], step["difference"],
                                    step["difference_low"], step["difference_high"], step["pairs"]))
    return found, notes


def regression_markdown(found: list[Regression]) -> str:
    lines = ["# Nightly eval: regressions", "",
             "The paired difference with the same model's previous nightly result, on the items both answered, "
             "has a 95 % CI below 0 (flexible extraction).", "",
             "| model | benchmark | system message | checkpoint | previous | now | difference, pts [95% CI] | items |",
             "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [r.line() for r in found])


def as_dicts(found: list[Regression]) -> list[dict[str, Any]]:
    return [asdict(r) for r in found]
