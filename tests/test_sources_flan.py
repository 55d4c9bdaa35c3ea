"""The FLAN-v2 loader and Orca 1's sampling rules, on fixtures in the real schema."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orca_core.recipe.models import FlanSources
from orca_core.sources import build_sources, flan
from orca_core.recipe import load_recipe

FIXTURES = Path(__file__).parent / "fixtures" / "flan"
ALL = {"cot": None, "niv2": None, "flan2021": None, "t0": None, "dialog": 0}


def _cfg(paths, **kw) -> FlanSources:
    return FlanSources(paths=[str(p) for p in paths], **{"counts": ALL, **kw})


def test_reads_real_schema_files_keeps_zero_shot_and_applies_the_rules():
    cfg = _cfg([FIXTURES / "flan_v2_sample.jsonl.gz", FIXTURES / "flan_v2_openorca_style.parquet"])
    table, stats = flan.sample_orca1(flan.read_collection(cfg), cfg, seed=0)
    rows = table.to_pylist()
    names = {r["task_name"] for r in rows}
    assert stats["pool_rows"] == 12 and stats["zero_shot_rows"] == 11  # the fs_opt row is gone
    assert "bigbench_snarks" not in names  # BIG-bench is an eval set
    assert stats["by_sub_collection"]["t0"]["excluded_tasks"] == ["bigbench_snarks"]
    assert "wow" not in names  # Dialog skipped
    assert Counter(r["sub_collection"] for r in rows) == {"cot": 2, "niv2": 2, "flan2021": 3, "t0": 2}
    by_task = {r["task_name"]: r for r in rows}
    assert by_task["anli/r1:0.1.0"]["options"] == ["yes", "it is not possible to tell", "no"]
    assert by_task["anli/r1:0.1.0"]["multiple_choice"]
    assert by_task["piqa:1.0.0"]["options"] == ["a feather", "a brick"]  # lettered options
    assert by_task["cot_sensemaking"]["options"] == ["yes", "no"]
    assert not by_task["gigaword:1.2.0"]["multiple_choice"]
    assert by_task["web_questions_whats_the_answer"]["task_source"] == "P3"  # original spelling kept
    assert by_task["web_questions_whats_the_answer"]["sub_collection"] == "t0"


def _pool(path: Path, source: str, tasks: dict[str, int]) -> Path:
    rows = [
        {"inputs": f"{task} query {i}", "targets": f"a{i}", "task_source": source, "task_name": task, "template_type": "zs_noopt"}
        for task, n in tasks.items() for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_niv2_caps_each_task_then_samples_down(tmp_path):
    path = _pool(tmp_path / "niv2.parquet", "NIv2", {"task_big": 1000, "task_mid": 80, "task_small": 10})
    cfg = _cfg([path], niv2_max_per_task=50, counts={**ALL, "niv2": None})
    table, _ = flan.sample_orca1(flan.read_collection(cfg), cfg, seed=0)
    assert Counter(table["task_name"].to_pylist()) == {"task_big": 50, "task_mid": 50, "task_small": 10}
    cfg = _cfg([path], niv2_max_per_task=50, counts={**ALL, "niv2": 60})
    table, stats = flan.sample_orca1(flan.read_collection(cfg), cfg, seed=0)
    counts = Counter(table["task_name"].to_pylist())
    assert table.num_rows == 60 and max(counts.values()) <= 50
    assert stats["by_sub_collection"]["niv2"] == {"pool": 110, "target": 60, "sampled": 60, "tasks": len(counts)}


def test_flan2021_picks_tasks_uniformly_then_queries_without_replacement(tmp_path):
    tasks = {f"task{i}": 400 for i in range(10)} | {"tiny_task": 5}
    path = _pool(tmp_path / "flan.parquet", "Flan2021", tasks)
    cfg = _cfg([path], counts={**ALL, "flan2021": 2005})
    table, _ = flan.sample_orca1(flan.read_collection(cfg), cfg, seed=0)
    counts = Counter(table["task_name"].to_pylist())
    assert table.num_rows == 2005
    assert len(set(table["inputs"].to_pylist())) == 2005  # without replacement
    assert counts["tiny_task"] == 5  # exhausted: its share goes to the others
    big = np.array([counts[f"task{i}"] for i in range(10)])
    assert big.sum() == 2000
    # Uniform over tasks, not over rows: multinomial(2000, 1/10) -> mean 200, sd ~13.4.
    chi2 = ((big - 200) ** 2 / 200).sum()
    assert chi2 < 30, big  # p ~ 0.0004 for 9 d.o.f.
    # A row-uniform sampler would have given the tiny task ~0.25 rows and the same counts; check the
    # task choice really is uniform with unequal pools:
    skewed = _pool(tmp_path / "skew.parquet", "Flan2021", {"huge": 5000, "small_a": 300, "small_b": 300})
    cfg = _cfg([skewed], counts={**ALL, "flan2021": 600})
    counts = Counter(flan.sample_orca1(flan.read_collection(cfg), cfg, seed=1)[0]["task_name"].to_pylist())
    assert all(150 <= counts[t] <= 250 for t in ("huge", "small_a", "small_b")), counts


def test_targets_larger_than_the_pool_take_everything(tmp_path):
    path = _pool(tmp_path / "t0.parquet", "T0", {"a": 3, "b": 4})
    cfg = _cfg([path], counts={**ALL, "t0": 100})
    table, stats = flan.sample_orca1(flan.read_collection(cfg), cfg, seed=0)
    assert table.num_rows == 7 and stats["by_sub_collection"]["t0"]["sampled"] == 7


def test_sampling_is_deterministic_and_independent_of_file_names(tmp_path):
    a = _pool(tmp_path / "a.parquet", "Flan2021", {f"t{i}": 50 for i in range(5)})
    b = _pool(tmp_path / "b.parquet", "T0", {f"p{i}": 50 for i in range(5)})
    counts = {**ALL, "flan2021": 60, "t0": 60}
    one, _ = flan.sample_orca1(flan.read_collection(_cfg([a, b], counts=counts)), _cfg([a, b], counts=counts), seed=3)
    (tmp_path / "x").mkdir()
    a2, b2 = a.rename(tmp_path / "x" / "zz.parquet"), b.rename(tmp_path / "x" / "aa.parquet")
    two, _ = flan.sample_orca1(flan.read_collection(_cfg([a2, b2], counts=counts)), _cfg([a2, b2], counts=counts), seed=3)
    assert one.equals(two)


def test_bad_files_name_file_and_column(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"inputs": "q", "targets": "a"}]), bad)
    with pytest.raises(ValueError, match=r"bad.parquet: missing FLAN-v2 columns \['task_source', 'task_name', 'template_type'\]"):
        flan.read_collection(_cfg([bad]))
    with pytest.raises(FileNotFoundError, match="sources.flan.paths: no file matches"):
        flan.read_collection(_cfg([tmp_path / "nope-*.parquet"]))
    weird = _pool(tmp_path / "weird.parquet", "Mystery", {"a": 2})
    with pytest.raises(ValueError, match=r"unknown task_source values \['Mystery'\]"):
        flan.sample_orca1(flan.read_collection(_cfg([weird])), _cfg([weird]), seed=0)


def test_recipe_requires_exactly_one_input():
    with pytest.raises(ValueError, match="exactly one of `paths` or `dataset`"):
        FlanSources(paths=["a.parquet"], dataset="x")


def test_sources_step_combines_flan_and_procedural(tmp_path):
    recipe = load_recipe("smoke", [f"sources.flan={{paths: ['{FIXTURES}/*']}}"])
    rows, stats = build_sources(recipe.sources, tmp_path)
    assert rows == {"train": 160 + 9, "heldout": 40}
    assert stats["flan"]["by_sub_collection"]["cot"]["sampled"] == 2
    assert set(pq.read_table(tmp_path / "train.parquet")["source"].to_pylist()) == {"procedural", "flan"}
