"""Step keys: stable across processes, sensitive to exactly what a step reads."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq

from orca_core.keys import canonical_json, diff_components, flatten, key_components, step_key
from orca_core.recipe import load_recipe
from orca_core.steps import SOURCES, components, plan_key


CODE = {"modules": {"orca_core/x.py": "ef" * 32}, "libraries": {"torch": "2.13.0"}}


def test_golden_key_pins_the_canonical_form():
    comps = key_components("demo", 3, {"b": [1, 2.5, "é"], "a": None, "lr": 1e-4}, {"up": "ab" * 32}, {"f": "cd" * 32},
                           CODE)
    assert canonical_json(comps).startswith('{"code":{"libraries":{"torch":"2.13.0"},"modules":{"orca_core/x.py":"efef')
    assert '"config":{"a":null,"b":[1,2.5,"é"],"lr":0.0001},"inputs"' in canonical_json(comps)
    assert step_key(comps) == "42ba28ac835f8a3df3d6fb1901680b21b11d4861971c16de59bfb70531c384ec"
    # Key order and float spelling do not matter.
    same = key_components("demo", 3, {"lr": 0.0001, "a": None, "b": [1, 2.50, "é"]}, {"up": "ab" * 32}, {"f": "cd" * 32},
                          CODE)
    assert step_key(same) == step_key(comps)


def test_key_is_the_same_in_another_process(python):
    here = plan_key(SOURCES, load_recipe("smoke"))
    code = "from orca_core.recipe import load_recipe; from orca_core.steps import SOURCES, plan_key; print(plan_key(SOURCES, load_recipe('smoke')))"
    for seed in ("1", "2"):  # different str hash seeds, different dict orders
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.strip() == here


def test_a_field_the_step_reads_changes_the_key_an_unrelated_one_does_not():
    base = plan_key(SOURCES, load_recipe("smoke"))
    for changed in ("sources.seed=1", "sources.procedural.train_per_family=21",
                    "sources.procedural.generator_options={syllogism: {invalid_ratio: 0.5}}"):
        assert plan_key(SOURCES, load_recipe("smoke", [changed])) != base, changed
    for unrelated in ("train.lr=0.5", "eval.limit=3", "seed=9", "teachers.strong.rpm=1",
                      "store.root=/somewhere/else", "prefect.retries=0", "description=x"):
        assert plan_key(SOURCES, load_recipe("smoke", [unrelated])) == base, unrelated


def _flan_file(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_flan_input_files_enter_the_key_by_content_not_by_path(tmp_path):
    row = {"inputs": "Q?", "targets": "A", "task_source": "CoT", "task_name": "cot_x", "template_type": "zs_noopt"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _flan_file(tmp_path / "a" / "part.parquet", [row])
    _flan_file(tmp_path / "b" / "renamed.parquet", [row])
    _flan_file(tmp_path / "changed.parquet", [{**row, "targets": "B"}])

    def key(path):
        recipe = load_recipe("smoke", ["sources.procedural=null", f"sources.flan={{paths: [{path}]}}"])
        return plan_key(SOURCES, recipe), components(SOURCES, recipe)

    key_a, comps_a = key(tmp_path / "a" / "part.parquet")
    key_b, _ = key(tmp_path / "b" / "renamed.parquet")
    key_c, _ = key(tmp_path / "changed.parquet")
    assert key_a == key_b != key_c
    assert "paths" not in comps_a["config"]["sources"]["flan"]
    assert str(tmp_path) not in json.dumps(comps_a)  # no path anywhere in the key


def test_diff_names_changed_leaves():
    old = {"config": {"sources": {"seed": 0, "families": ["a", "b"]}}, "version": 1}
    new = {"config": {"sources": {"seed": 1, "families": ["a"]}}, "version": 1}
    assert diff_components(old, new) == [
        ("config.sources.families[1]", "b", "<absent>"),
        ("config.sources.seed", 0, 1),
    ]
    assert flatten({"a": {}, "b": []}) == {"a": {}, "b": []}
