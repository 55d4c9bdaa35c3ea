"""Two pipeline runs on one store at once: both succeed, every artifact is built once, no request is sent twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from orca_core.recipe import load_recipe
from orca_core.steps import DATA_STEPS, plan_key
from orca_core.store import ArtifactStore

FAKE_KEY = "sk-fake-orca-concurrency-0123456789"
KEYED = ["teachers.assistant.api_key_env=ORCA_FAKE_TEACHER_KEY", "teachers.strong.api_key_env=ORCA_FAKE_TEACHER_KEY"]


def test_two_concurrent_runs_share_the_store_without_duplicates(tmp_path):
    store_root = tmp_path / "store"
    overrides = [f"store.root={store_root}", *KEYED]
    orca = [str(Path(sys.executable).with_name("orca")), "run", "--only", "generate", "--recipe", "smoke"]
    for o in overrides:
        orca += ["--set", o]
    runs = []
    for i in range(2):
        env = {**os.environ, "ORCA_FAKE_TEACHER_KEY": FAKE_KEY, "OMP_NUM_THREADS": "1",
               "PREFECT_HOME": str(tmp_path / f"prefect-{i}"), "COLUMNS": "200"}
        env.pop("PREFECT_API_URL", None)
        runs.append(subprocess.Popen(orca, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    recipe = load_recipe("smoke", overrides)
    store = ArtifactStore(str(store_root))
    for step in DATA_STEPS:  # one artifact per step, the planned one, verified
        assert store.keys(step.name) == [plan_key(step, recipe)], step.name
        assert store.check(step.name, plan_key(step, recipe)) == "ok"
    for aside in (".corrupt", ".superseded"):
        assert not (store_root / aside).exists() or not any((store_root / aside).iterdir())
    # Every teacher request was sent once: the request cache holds each request id once.
    ids = [i for shard in (store_root / "requests").rglob("*.parquet") for i in pq.read_table(shard, columns=["request_id"])["request_id"].to_pylist()]
    assert ids and len(ids) == len(set(ids))
