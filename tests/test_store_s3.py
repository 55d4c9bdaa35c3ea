"""The artifact store on a real S3 server (SeaweedFS on 127.0.0.1): attempt prefixes, manifest-last commits.

Publishing on S3 uploads under `<step>/<key>/.attempts/<uuid>/` and commits by a conditional put of
`<step>/<key>/manifest.json`; these tests drive that against the server, with real concurrent writers.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orca_core.keys import key_components, step_key
from orca_core.recipe import load_recipe
from orca_core import store as store_module
from orca_core.store import ArtifactStore, CorruptArtifact

COMPS = key_components("demo", 1, {"payload": "hello"})
KEY = step_key(COMPS)


def _publish(store: ArtifactStore, payload: str = "hello"):
    with store.staging("demo", KEY) as staged:
        (staged / "data.txt").write_text(payload)
        (staged / "sub").mkdir()
        (staged / "sub" / "more.txt").write_text(payload * 2)
        return store.publish("demo", KEY, COMPS, staged, rows={"data": 1}, stats={"chars": len(payload)})


def _attempts(store: ArtifactStore) -> list[str]:
    """Attempt ids with at least one object (SeaweedFS lists emptied folders as prefixes: objects are what count)."""
    prefix = f"{store.root}/demo/{KEY}/.attempts/"
    return sorted({p.removeprefix(prefix).split("/", 1)[0] for p in store.fs.find(prefix) if p.startswith(prefix)})


def test_publish_lookup_verify_roundtrip(s3_root, tmp_path):
    store = ArtifactStore(s3_root)
    assert store.check("demo", KEY) == "absent" and store.lookup("demo", KEY) is None
    ref = _publish(store)
    manifest = store.manifest(ref)
    attempt = manifest["files_at"].removeprefix(".attempts/")
    assert ref.url == f"{s3_root}/demo/{KEY}/.attempts/{attempt}" and _attempts(store) == [attempt]
    assert set(manifest["files"]) == {"data.txt", "sub/more.txt", "key.json"} and manifest["rows"] == {"data": 1}
    assert store.fs.cat_file(f"{ref.url}/sub/more.txt") == b"hellohello"  # the files live under the attempt
    assert store.check("demo", KEY) == "ok" and store.lookup("demo", KEY) == ref and store.keys("demo") == [KEY]
    assert store.read_json("demo", KEY, "key.json") == COMPS
    local = store.local_dir(ref, cache_dir=str(tmp_path / "cache"))
    assert (local / "sub" / "more.txt").read_text() == "hellohello" and json.loads((local / "manifest.json").read_text()) == manifest
    # The same key again keeps the first artifact and uploads nothing.
    assert _publish(store, "other") == ref and _attempts(store) == [attempt]
    # The commit is a conditional put, and this server honours it: a second manifest is refused.
    with pytest.raises(OSError):
        store.fs.pipe_file(store.url("demo", KEY, "manifest.json"), b"{}", mode="create")
    assert store.manifest(ref) == manifest
    # Training and evaluation keep resume state in a local folder of their own per store.
    work = store.work_folder(".train-work")
    assert work.is_absolute() and work != ArtifactStore(f"{s3_root}-other").work_folder(".train-work")


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from orca_core.keys import key_components, step_key
    from orca_core.store import ArtifactStore

    root, pause, signals = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = ArtifactStore(root)
    comps = key_components("demo", 1, {"payload": "hello"})
    key = step_key(comps)

    def wait_for(name):
        (signals / f"{name}.ready").touch()
        while not (signals / f"{name}.go").exists():
            time.sleep(0.02)

    real_put, real_pipe = store.fs.put_file, store.fs.pipe_file  # s3fs binds its sync methods per instance
    if pause == "mid-upload":  # stop after the first file of this attempt is up
        def put_file(lpath, rpath, *args, **kwargs):
            real_put(lpath, rpath, *args, **kwargs)
            wait_for("upload")
        store.fs.put_file = put_file
    else:  # stop right before the commit, so that two writers put their manifests at once
        def pipe_file(path, value, *args, **kwargs):
            if path.endswith("manifest.json"):
                wait_for(pause)
            return real_pipe(path, value, *args, **kwargs)
        store.fs.pipe_file = pipe_file
    with store.staging("demo", key) as staged:
        (staged / "data.txt").write_text("hello")
        (staged / "sub").mkdir()
        (staged / "sub" / "more.txt").write_text("hellohello")
        ref = store.publish("demo", key, comps, staged, rows={"data": 1})
    print(ref.url, flush=True)
""")


def _writer(python: str, root: str, pause: str, signals: Path) -> subprocess.Popen:
    return subprocess.Popen([python, "-c", _WRITER, root, pause, str(signals)], stdout=subprocess.PIPE, text=True)


def _await(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"writer exited early with {process.returncode}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.02)


def test_concurrent_writers_one_manifest_wins_and_no_upload_is_deleted(s3_root, tmp_path, python):
    store = ArtifactStore(s3_root)
    # 1. A writer is mid-upload while another publishes the same key: the upload is left alone,
    #    and when the first one commits it finds the other's manifest and drops only its own files.
    slow = _writer(python, s3_root, "mid-upload", tmp_path)
    _await(tmp_path / "upload.ready", slow)
    (partial,) = _attempts(store)
    fast = _publish(store)
    assert sorted(_attempts(store)) == sorted([partial, fast.url.rsplit("/", 1)[-1]])  # both there
    assert store.fs.exists(store.url("demo", KEY, ".attempts", partial, "data.txt"))  # its upload not deleted
    (tmp_path / "upload.go").touch()
    out, _ = slow.communicate(timeout=60)
    assert slow.returncode == 0 and out.strip() == fast.url  # the slow writer returns the winner's artifact
    assert _attempts(store) == [fast.url.rsplit("/", 1)[-1]] and store.lookup("demo", KEY) == fast
    # 2. Two writers put their manifests at the same moment: exactly one commit stands.
    store.supersede("demo", KEY)
    racers = [_writer(python, s3_root, name, tmp_path) for name in ("a", "b")]
    for name, racer in zip("ab", racers):
        _await(tmp_path / f"{name}.ready", racer)
    for name in "ab":
        (tmp_path / f"{name}.go").touch()
    urls = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert all(racer.returncode == 0 for racer in racers)
    (winner,) = urls  # both report the same artifact
    assert store.lookup("demo", KEY).url == winner and store.check("demo", KEY) == "ok"
    assert winner.rsplit("/", 1)[-1] in _attempts(store)
    assert len(store.fs.ls(store.url(".superseded"), detail=False)) == 1  # the first artifact's manifest, kept


def test_a_publish_removes_abandoned_uploads_and_keeps_young_ones(s3_root, monkeypatch):
    store = ArtifactStore(s3_root)
    killed = store.url("demo", KEY, ".attempts", "killed0writer", "data.txt")
    store.fs.pipe_file(killed, b"half an upload")
    ref = _publish(store)  # a day has not passed: it may be an upload in progress
    standing = ref.url.rsplit("/", 1)[-1]
    assert _attempts(store) == sorted(["killed0writer", standing])
    monkeypatch.setattr(store_module, "ABANDONED_ATTEMPT_S", 0.0)  # now it is old enough
    time.sleep(1.1)  # (object times have 1 s resolution)
    assert _publish(store) == ref  # the key is published: nothing uploaded, the leftover swept
    assert _attempts(store) == [standing] and store.check("demo", KEY) == "ok"


@pytest.mark.parametrize("damage", ["same-size", "truncated", "missing"])
def test_a_changed_object_is_detected_and_rebuilt(s3_root, tmp_path, damage):
    store = ArtifactStore(s3_root)
    ref = _publish(store)
    target = f"{ref.url}/data.txt"
    if damage == "missing":
        store.fs.rm_file(target)
    else:
        store.fs.pipe_file(target, b"hellO" if damage == "same-size" else b"he")
    reason = {"same-size": "data.txt does not match its sha256", "truncated": "data.txt has 2 bytes, manifest says 5",
              "missing": "data.txt is missing"}[damage]
    assert store.check("demo", KEY) == f"corrupt: {reason}"
    with pytest.raises(CorruptArtifact, match=reason):  # a download checks every file too
        store.local_dir(ref, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "demo" / KEY / ref.url.rsplit("/", 1)[-1]).exists()
    assert store.lookup("demo", KEY) is None and store.check("demo", KEY) == "absent"  # uncommitted
    assert len(store.fs.ls(store.url(".corrupt"), detail=False)) == 1
    rebuilt = _publish(store)
    assert rebuilt.url != ref.url and store.lookup("demo", KEY) == rebuilt


def test_sources_and_a_fanout_step_on_s3_then_a_rerun_is_all_hits(s3_root):
    """sources -> traces-orca1 (the fan-out, its request cache in the bucket) -> filtered-orca1, all on S3."""
    from orca_core import steps
    from orca_core.context import StepContext
    from orca_core.recipe.models import TeacherEndpoint
    from orca_core.teacher.runner import LocalFanoutRunner, oracle_server
    from orca_core.traces import TRACES_FILE

    scale = [f"store.root={s3_root}", "sources.procedural.families=[basic_arithmetic, spell_backward]",
             "sources.procedural.train_per_family=20"]
    store = ArtifactStore(s3_root)
    sources = steps.run_step(store, steps.SOURCES, load_recipe("smoke", scale))
    book = store.local_dir(sources.ref)  # the oracle's answer book, downloaded and checked
    oracle = lambda model: TeacherEndpoint(kind="oracle", model=model, rpm=1)  # noqa: E731
    with oracle_server({"assistant": oracle("oracle-assistant"), "strong": oracle("oracle-strong")},
                       [book / "train.parquet", book / "heldout.parquet"]) as urls:
        url = urls["assistant"]  # one oracle for every run below: its /stats counts what was sent
        teacher = f"kind: vllm, base_url: {url}, rpm: 60000, max_concurrency: 32"
        recipe = load_recipe("smoke", [*scale, f"teachers.assistant={{model: oracle-assistant, {teacher}}}",
                                       f"teachers.strong={{model: oracle-strong, {teacher}}}"])

        def run(step):
            ctx = StepContext(fanout=LocalFanoutRunner(recipe), request_cache=store.url("requests"))
            return steps.run_step(store, step, recipe, ctx=ctx)

        def served() -> int:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
                return json.load(response)["ok"]

        dag = (steps.SOURCES, steps.TRACES_ORCA1, steps.FILTERED_ORCA1)
        first = [run(step) for step in dag]
        assert [r.cached for r in first] == [True, False, False] and first[0].ref == sources.ref
        traces = first[1]
        assert served() == traces.rows["traces"] > 40  # one call per Orca 1 trace (assistant + strong subset)
        assert store.fs.find(store.url("requests"))  # the request cache lives in the bucket
        again = [run(step) for step in dag]
        assert all(r.cached for r in again) and [r.ref for r in again] == [r.ref for r in first]
        # Traces deleted, request cache kept: rebuilt from the cache in the bucket, nothing sent.
        store.supersede("traces-orca1", traces.ref.key)
        rebuilt = run(steps.TRACES_ORCA1)
        assert not rebuilt.cached and served() == traces.rows["traces"]
    read = lambda ref: pq.read_table(store.local_dir(ref) / TRACES_FILE)  # noqa: E731
    assert read(rebuilt.ref).equals(read(traces.ref))
