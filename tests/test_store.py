"""The artifact store: atomic publish, verified hits, corruption detected and rebuilt."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from orca_core.keys import key_components, step_key
from orca_core.steps import run_step
from orca_core.store import ArtifactStore


def _publish(store: ArtifactStore, payload: str = "hello", step: str = "demo"):
    comps = key_components(step, 1, {"payload": payload})
    key = step_key(comps)
    with store.staging(step, key) as staged:
        (staged / "data.txt").write_text(payload)
        (staged / "sub").mkdir()
        (staged / "sub" / "more.txt").write_text(payload * 2)
        ref = store.publish(step, key, comps, staged, rows={"data": 1}, stats={"chars": len(payload)})
    return ref, comps


@pytest.mark.parametrize("root", ["local", "memory"])
def test_publish_then_lookup_roundtrip(tmp_path, root):
    url = str(tmp_path / "store") if root == "local" else f"memory://orca-{uuid.uuid4().hex}"
    store = ArtifactStore(url)
    ref, comps = _publish(store)
    assert store.lookup("demo", ref.key) == ref
    manifest = store.manifest(ref)
    assert set(manifest["files"]) == {"data.txt", "sub/more.txt", "key.json"}
    assert manifest["files"]["data.txt"]["size"] == 5
    assert manifest["rows"] == {"data": 1} and manifest["stats"] == {"chars": 5}
    assert store.read_json("demo", ref.key, "key.json") == comps
    assert store.keys("demo") == [ref.key]
    assert (store.local_dir(ref, cache_dir=str(tmp_path / "cache")) / "sub" / "more.txt").read_text() == "hellohello"
    if root == "local":
        assert not list((tmp_path / "store" / ".staging").iterdir())  # nothing left behind


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from orca_core.keys import key_components, step_key
    from orca_core import store as store_module
    store = store_module.ArtifactStore(sys.argv[1])
    comps = key_components("demo", 1, {"payload": "x"})
    key = step_key(comps)
    where = sys.argv[2]
    if where == "before-rename":   # everything written, manifest included; killed before the commit
        real_rename = os.rename
        def stalled_rename(src, dst):
            print("ready", flush=True); time.sleep(60); real_rename(src, dst)
        store_module.os.rename = stalled_rename
    with store.staging("demo", key) as staged:
        (staged / "first.txt").write_text("x")
        if where == "between-files":
            print("ready", flush=True); time.sleep(60)
        (staged / "second.txt").write_text("y")
        store.publish("demo", key, comps, staged)
""")


@pytest.mark.parametrize("where", ["between-files", "before-rename"])
def test_kill_during_publish_leaves_no_artifact(tmp_path, python, where):
    root = tmp_path / "store"
    proc = subprocess.Popen([python, "-c", _KILLED_WRITER, str(root), where], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = ArtifactStore(str(root))
    key = step_key(key_components("demo", 1, {"payload": "x"}))
    assert store.check("demo", key) == "absent"
    assert store.lookup("demo", key) is None and store.keys("demo") == []
    # The next attempt publishes normally.
    with store.staging("demo", key) as staged:
        (staged / "first.txt").write_text("x")
        ref = store.publish("demo", key, key_components("demo", 1, {"payload": "x"}), staged)
    assert store.lookup("demo", key) == ref


def test_partial_remote_publish_is_not_an_artifact():
    store = ArtifactStore(f"memory://orca-{uuid.uuid4().hex}")
    ref, _ = _publish(store)
    store.fs.rm(f"{store.root}/demo/{ref.key}/manifest.json")  # what a kill before the manifest leaves
    assert store.check("demo", ref.key) == "absent"  # an attempt without its manifest is no artifact ...
    assert store.lookup("demo", ref.key) is None and store.keys("demo") == []
    assert store.fs.exists(f"{ref.url}/data.txt")  # ... and may be an upload in progress: left alone
    ref2, _ = _publish(store)
    assert store.lookup("demo", ref2.key) == ref2 and ref2.url != ref.url


@pytest.mark.parametrize("damage", ["garbage-manifest", "flipped-byte", "missing-file", "truncated"])
def test_corruption_is_detected_logged_and_moved_aside(tmp_path, caplog, damage):
    store = ArtifactStore(str(tmp_path / "store"))
    ref, _ = _publish(store)
    folder = Path(ref.url)
    if damage == "garbage-manifest":
        (folder / "manifest.json").write_text("{not json")
    elif damage == "flipped-byte":
        (folder / "data.txt").write_text("hellO")  # same size: only sha256 sees it
    elif damage == "missing-file":
        (folder / "sub" / "more.txt").unlink()
    else:
        (folder / "data.txt").write_text("he")
    with caplog.at_level(logging.WARNING, logger="orca_core"):
        assert store.lookup("demo", ref.key) is None
    assert "corrupt" in caplog.text and ref.key[:12] in caplog.text
    assert not folder.exists()
    assert len(list((tmp_path / "store" / ".corrupt").iterdir())) == 1  # kept for inspection
    rebuilt, _ = _publish(store)
    assert store.lookup("demo", rebuilt.key) == rebuilt


def test_size_only_verification_misses_a_same_size_change_by_design(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), verify="size")
    ref, _ = _publish(store)
    (Path(ref.url) / "data.txt").write_text("hellO")
    assert store.lookup("demo", ref.key) == ref


def test_publishing_an_existing_key_keeps_the_first(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    first, _ = _publish(store)
    created = store.manifest(first)["created_at"]
    time.sleep(1.1)
    second, _ = _publish(store)
    assert second == first and store.manifest(second)["created_at"] == created


def test_run_step_rebuilds_a_corrupt_sources_artifact(smoke):
    from orca_core.steps import SOURCES

    store = ArtifactStore(smoke.store.root)
    first = run_step(store, SOURCES, smoke)
    assert not first.cached and first.rows == {"train": 160, "heldout": 40}
    assert run_step(store, SOURCES, smoke).cached
    manifest = Path(first.ref.url) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["train.parquet"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    again = run_step(store, SOURCES, smoke)
    assert not again.cached and again.ref == first.ref and store.lookup("sources", first.ref.key) == first.ref


CONCURRENT_BUILD = """
import sys, time
from pathlib import Path
from orca_core.recipe import load_recipe
from orca_core.steps import Step, run_step
from orca_core.store import ArtifactStore

root, counter = sys.argv[1], Path(sys.argv[2])

def build(recipe, upstream, out, ctx):
    with counter.open("a") as f:
        f.write("built\\n")
    time.sleep(2)  # long enough for the other run to arrive while this one builds
    (out / "data.txt").write_text("the same content")
    return {"rows": 1}, {}

step = Step("slow", version=1, reads=lambda r: {"seed": r.seed}, build=build)
result = run_step(ArtifactStore(root), step, load_recipe("smoke", [f"store.root={root}"]))
print("CACHED" if result.cached else "BUILT", result.ref.key)
"""


def test_two_runs_wanting_one_artifact_build_it_once(tmp_path, python):
    """Concurrent runs on one store: the second waits on the artifact's lock and finds it built."""

    root, counter = tmp_path / "store", tmp_path / "builds.txt"
    runs = [subprocess.Popen([python, "-c", CONCURRENT_BUILD, str(root), str(counter)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0].split() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert sorted(o[0] for o in outputs) == ["BUILT", "CACHED"] and outputs[0][1] == outputs[1][1]
    assert counter.read_text() == "built\n"  # built once, not twice
    store = ArtifactStore(str(root))
    assert store.keys("slow") == [outputs[0][1]] and store.check("slow", outputs[0][1]) == "ok"
    assert not (root / ".corrupt").exists() and not (root / ".superseded").exists()
    assert not any((root / ".staging").iterdir())
