"""Code-aware step keys: an edit that changes behaviour invalidates exactly the steps that reach it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orca_core.code_digest import PROJECT_PACKAGES, closure, code_components
from orca_core.keys import step_key
from orca_core.recipe import load_recipe
from orca_core.steps import components, explain, steps_for
from orca_core.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
DATA_STEPS = {"sources", "strategies", "traces-orca1", "traces-orca2"}


def _downstream(recipe, roots: set[str]) -> set[str]:
    """`roots` and every step that consumes one of them, directly or not (steps_for is in run order)."""
    found = set(roots)
    for name, step in steps_for(recipe).items():
        if found & set(step.upstream_of(recipe)):
            found.add(name)
    return found


# -- the digest on a small package ---------------------------------------------------------------
def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return _package(tmp_path / "repo", {
        "orca_core/__init__.py": "",
        "orca_core/filters.py": "import torch\n\ndef keep(x):\n    # why: ...\n    return x > 0\n",
        "orca_core/sources.py": '"""Sources."""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n'
                                "    from orca_core import filters\n\ndef make():\n    return [1, 2]\n",
        "orca_core/steps/__init__.py": "",
        "orca_core/steps/build.py": "from . import helpers\n\ndef build_a():\n    from orca_core.filters import keep\n"
                                    "    return keep(helpers.one())\n\ndef build_b():\n"
                                    "    from orca_core.sources import make\n    return make()\n",
        "orca_core/steps/helpers.py": "def one():\n    return 1\n",
    })


def test_closure_follows_imports_lazy_and_relative_skips_type_checking(package):
    modules, external = closure(["orca_core.steps.build:build_a"], package)
    assert set(modules) == {"orca_core/__init__.py", "orca_core/filters.py", "orca_core/steps/__init__.py",
                            "orca_core/steps/build.py:build_a", "orca_core/steps/helpers.py"}
    assert "torch" in external
    modules, _ = closure(["orca_core.sources"], package)
    assert set(modules) == {"orca_core/__init__.py", "orca_core/sources.py"}  # the TYPE_CHECKING import is not code


def test_behaviour_edits_count_comments_docstrings_and_formatting_do_not(package):
    def digests():
        return {e: code_components([e], package) for e in ("orca_core.steps.build:build_a",
                                                           "orca_core.steps.build:build_b", "orca_core.sources")}

    before = digests()
    assert before["orca_core.steps.build:build_a"]["libraries"] == {"torch": code_components(
        ["orca_core.filters"], package)["libraries"]["torch"]}  # torch is imported there: its version is in the key
    filters = package / "orca_core/filters.py"
    filters.write_text('"""Filters, now documented."""\nimport torch\n\n\ndef keep( x ):  # reformatted\n'
                       "    # another comment\n    return x > 0\n")
    assert digests() == before
    filters.write_text("import torch\n\ndef keep(x):\n    return x >= 0\n")  # a function body changed
    after = digests()
    assert after["orca_core.steps.build:build_a"] != before["orca_core.steps.build:build_a"]
    assert after["orca_core.steps.build:build_b"] == before["orca_core.steps.build:build_b"]
    assert after["orca_core.sources"] == before["orca_core.sources"]
    # In the entry module, an edit to another builder does not count; one to the module's top level does.
    build = package / "orca_core/steps/build.py"
    build.write_text(build.read_text().replace("return make()", "return make()[:1]"))
    assert digests()["orca_core.steps.build:build_a"] == after["orca_core.steps.build:build_a"]
    build.write_text("LIMIT = 3\n" + build.read_text())
    assert digests()["orca_core.steps.build:build_a"] != after["orca_core.steps.build:build_a"]


# -- the real DAG in clones of this repository ---------------------------------------------------
PLAN = ("import json, orca_core; from orca_core.recipe import load_recipe; from orca_core.steps import steps_for, plan_key; "
        "r = load_recipe('smoke'); "
        "print(json.dumps({'file': orca_core.__file__, 'keys': {n: plan_key(s, r) for n, s in steps_for(r).items()}}))")


def _clone(dest: Path) -> Path:
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.split("/")[0] in (*PROJECT_PACKAGES, "configs", "infra") and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _plan_keys(clones: list[Path], python: str) -> list[dict[str, str]]:
    """Every step key of the smoke recipe, planned in each clone by its own code (in parallel)."""
    procs = [subprocess.Popen([python, "-c", PLAN], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(clone)}) for clone in clones]
    planned = []
    for clone, proc in zip(clones, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert Path(result["file"]).is_relative_to(clone)  # the clone's code, not the installed one
        planned.append(result["keys"])
    return planned


def test_keys_follow_code_edits_exactly_and_not_the_folder(tmp_path, python):
    same, body, comment = (_clone(tmp_path / name) for name in ("same", "body", "comment"))
    filters = "orca_core/filters.py"
    source = (REPO / filters).read_text()
    (body / filters).write_text(source.replace("def _squash(text: str) -> str:\n",
                                               "def _squash(text: str) -> str:\n    text = text + ''\n", 1))
    (comment / filters).write_text("# a comment: not behaviour\n" + source.replace("\n\n\n", "\n\n\n\n", 1))
    assert (body / filters).read_text() != source
    here = {name: step_key(components(step, load_recipe("smoke"))) for name, step in steps_for(load_recipe("smoke")).items()}
    keys_same, keys_body, keys_comment = _plan_keys([same, body, comment], python)
    assert keys_same == here  # two folders, one set of keys
    assert keys_comment == here
    changed = {name for name in here if keys_body[name] != here[name]}
    # The filter steps reach orca_core/filters.py; the tokenizer (trained on the filtered text), the
    # stages and their evaluations are downstream of them. Sources, strategies and traces are not.
    assert changed == _downstream(load_recipe("smoke"), {"filtered-orca1", "filtered-orca2"})
    assert DATA_STEPS.isdisjoint(changed) and {"filtered-orca1", "report"} <= changed


def test_explain_names_the_changed_module(tmp_path):
    """A key.json built by other code: explain says which module changed, then the library versions."""
    recipe = load_recipe("smoke", [f"store.root={tmp_path / 'store'}"])
    store = ArtifactStore(recipe.store.root)
    step = steps_for(recipe)["train-orca1"]
    comps = components(step, recipe)
    older = json.loads(json.dumps(comps))
    older["code"]["modules"]["orca_core/train.py"] = "0" * 64
    older["code"]["libraries"]["torch"] = "2.0.0"
    staged = tmp_path / "built"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"x")
    store.publish(step.name, step_key(older), older, staged, rows={"checkpoint": 1}, stats={})
    text = explain(store, step, recipe).render()
    assert "differs in 2 field(s)" in text
    assert "code changed: orca_core/train.py" in text
    assert f"library changed: torch 2.0.0 -> {comps['code']['libraries']['torch']}" in text
    assert explain(store, step, recipe).changed_code == ["orca_core/train.py"]
