"""Speed of the sources step's parts on this machine. Prints JSON.

    .venv/bin/python bench/sources.py [--flan-rows 1000000]

- procedural: rows/s generating the whole suite (both splits, disjointness checked);
- flan: rows/s of Orca 1 sampling over a synthetic FLAN-v2 pool (1,500 tasks);
- store: MB/s publishing (sha256 of every file) and verifying a hit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orca_core.keys import key_components, step_key
from orca_core.recipe.models import FlanSources
from orca_core.sources import flan
from orca_core.sources.procedural import generate_suite
from orca_core.store import ArtifactStore


def bench_procedural(per_family: int) -> dict:
    started = time.perf_counter()
    train, heldout, _ = generate_suite(None, per_family, per_family // 4, seed=0)
    seconds = time.perf_counter() - started
    return {"rows": len(train) + len(heldout), "seconds": round(seconds, 2), "rows_per_s": round((len(train) + len(heldout)) / seconds)}


def bench_flan(rows: int, folder: Path) -> dict:
    rng = np.random.default_rng(0)
    sources = rng.choice(["Flan2021", "T0", "NIv2", "CoT"], size=rows, p=[0.4, 0.32, 0.2, 0.08])
    tasks = np.char.add(sources.astype(str), rng.integers(0, 1500, size=rows).astype(str))
    table = pa.table({
        "inputs": pa.array([f"query {i}" for i in range(rows)]), "targets": pa.array(["answer"] * rows),
        "task_source": pa.array(sources), "task_name": pa.array(tasks), "template_type": pa.array(["zs_opt"] * rows),
    })
    path = folder / "pool.parquet"
    pq.write_table(table, path)
    cfg = FlanSources(paths=[str(path)], counts={"cot": None, "niv2": rows // 10, "flan2021": rows // 5, "t0": rows // 5, "dialog": 0})
    started = time.perf_counter()
    sampled, _ = flan.sample_orca1(flan.read_collection(cfg), cfg, seed=0)
    seconds = time.perf_counter() - started
    return {"pool_rows": rows, "sampled_rows": sampled.num_rows, "seconds": round(seconds, 2), "pool_rows_per_s": round(rows / seconds)}


def bench_store(megabytes: int, folder: Path) -> dict:
    store = ArtifactStore(str(folder / "store"))
    comps = key_components("bench", 1, {"mb": megabytes})
    key = step_key(comps)
    started = time.perf_counter()
    with store.staging("bench", key) as staged:
        (staged / "blob.bin").write_bytes(np.random.default_rng(0).bytes(megabytes << 20))
        store.publish("bench", key, comps, staged)
    publish = time.perf_counter() - started
    started = time.perf_counter()
    assert store.lookup("bench", key) is not None
    verify = time.perf_counter() - started
    return {"megabytes": megabytes, "publish_mb_per_s": round(megabytes / publish), "verify_mb_per_s": round(megabytes / verify)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-family", type=int, default=1000)
    parser.add_argument("--flan-rows", type=int, default=1_000_000)
    parser.add_argument("--store-mb", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "procedural": bench_procedural(args.per_family),
            "flan_sampling": bench_flan(args.flan_rows, Path(tmp)),
            "store": bench_store(args.store_mb, Path(tmp)),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
