"""Peak RSS of the dataset step (tokenize + pack one stage) as the number of examples grows.

For each size, a synthetic Orca 1 trace table (procedural-suite questions with
explanations of varied length, `teacher_role=assistant`, `verdict=kept`) is
written to Parquet, and the step's own build (`curriculum.build_dataset_for`)
turns it into the packed dataset in a fresh process, so each peak is its own.
The tokenizer is a small byte-level BPE trained here (orca_core/tokenizer.py).

    .venv/bin/python bench/data.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.json_output import print_json  # noqa: E402

WRITE_CHUNK = 50_000  # trace rows built in Python at a time (the parent's memory is not measured, but stays small)


def suite_rows() -> list[dict]:
    from orca_core.sources.procedural import generate_suite

    return generate_suite(None, 40, 0, seed=0)[0]


def trace_rows(rows: list[dict], start: int, stop: int) -> list[dict]:
    """Traces start..stop: each a suite question with an explanation of 1-4 sentences (~100 tokens a chat)."""
    from orca_core.traces import TRACE_SCHEMA

    empty = dict.fromkeys(TRACE_SCHEMA.names)
    out = []
    for i in range(start, stop):
        row = rows[i % len(rows)]
        steps = " ".join(f"Step {k}: from {i % 97 + k} we work out part {k} of it." for k in range(1 + i % 4))
        out.append({**empty, "source_id": f"{row['id']}-{i}", "task_name": row["task_name"], "stage": "orca1",
                    "teacher_role": "assistant", "student_system": "You are a helpful assistant.",
                    "user": row["inputs"], "response": f"{steps} The answer is {row['answer']}.",
                    "status": "ok", "verdict": "kept"})
    return out


def write_upstream(folder: Path, n: int) -> dict[str, Path]:
    """The dataset step's upstream folders: sources, filtered-orca1 (n traces) and a trained BPE tokenizer."""
    from orca_core.sources import TRAIN_FILE
    from orca_core.sources.schema import to_table
    from orca_core.tokenizer import train_bpe
    from orca_core.traces import TRACE_SCHEMA, TRACES_FILE

    rows = suite_rows()
    upstream = {name: folder / name for name in ("sources", "filtered-orca1", "tokenizer")}
    for path in upstream.values():
        path.mkdir(parents=True)
    pq.write_table(to_table(rows), upstream["sources"] / TRAIN_FILE)
    with pq.ParquetWriter(upstream["filtered-orca1"] / TRACES_FILE, TRACE_SCHEMA) as writer:
        for start in range(0, n, WRITE_CHUNK):
            writer.write_table(pa.Table.from_pylist(trace_rows(rows, start, min(n, start + WRITE_CHUNK)), TRACE_SCHEMA))
    texts = [f"{t['user']}\n{t['response']}" for t in trace_rows(rows, 0, 2000)]
    train_bpe(texts, 2048, upstream["tokenizer"])
    return upstream


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(folder: Path, max_len: int) -> dict:
    """One build in this process: the step's function on the folders write_upstream made."""
    from orca_core import curriculum
    from orca_core.context import StepContext
    from orca_core.recipe import load_recipe

    recipe = load_recipe("smoke", [f"train.max_len={max_len}", "train.overlong=truncate"])
    stage = next(s for s in recipe.curriculum.stages if s.data == "orca1")
    upstream = {name: folder / name for name in ("sources", "filtered-orca1", "tokenizer")}
    out = folder / "out"
    out.mkdir()
    imported = peak_rss_mib()
    started = time.perf_counter()
    counts, stats = curriculum.build_dataset_for(stage)(recipe, upstream, out, StepContext())
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(peak_rss_mib()),
            "rss_before_build_mib": round(imported), "rows": stats["rows"], "kept": stats["kept"],
            "tokens": stats["tokens"], "packing_efficiency": round(stats["packing_efficiency"], 4),
            "output_mib": round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1)}


def measure() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--max-len", type=int, default=1024)
    args = parser.parse_args()
    result: dict = {"max_len": args.max_len, "builds": {}}
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="orca-bench-data-") as tmp:
            write_upstream(Path(tmp), n)
            done = subprocess.run([sys.executable, __file__, "--child", tmp, str(args.max_len)], check=True,
                                  stdout=subprocess.PIPE, text=True)
            result["builds"][str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
    peaks = [build["peak_rss_mib"] for build in result["builds"].values()]
    if len(peaks) > 1:
        result["peak_rss_ratio_last_to_first"] = round(peaks[-1] / peaks[0], 3)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        print_json(measure)
