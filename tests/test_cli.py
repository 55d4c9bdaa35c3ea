"""`orca explain` and `orca store ls` against a real store."""

from __future__ import annotations

import json
import subprocess

from typer.testing import CliRunner

from flows.cli import app
from orca_core.steps import SOURCES, run_step
from orca_core.store import ArtifactStore

runner = CliRunner()


def test_explain_names_the_changed_field(smoke, tmp_path):
    store_set = ["--set", f"store.root={smoke.store.root}"]
    empty = runner.invoke(app, ["explain", "sources", "--recipe", "smoke", *store_set])
    assert empty.exit_code == 0 and "MISS: no artifact of this step exists" in empty.output

    run_step(ArtifactStore(smoke.store.root), SOURCES, smoke)
    hit = runner.invoke(app, ["explain", "sources", "--recipe", "smoke", *store_set, "--set", "train.lr=0.5"])
    assert "HIT" in hit.output

    miss = runner.invoke(app, ["explain", "sources", "--recipe", "smoke", *store_set,
                               "--set", "sources.procedural.heldout_per_family=6"])
    assert miss.exit_code == 0
    assert "differs in 1 field(s)" in miss.output
    assert "config.sources.procedural.heldout_per_family: 5 -> 6" in miss.output

    unknown = runner.invoke(app, ["explain", "nosuchstep", "--recipe", "smoke"])
    assert unknown.exit_code == 2 and "steps: sources" in unknown.output


def test_store_ls_lists_artifacts_and_marks_the_recipes(smoke):
    first = run_step(ArtifactStore(smoke.store.root), SOURCES, smoke)
    listed = runner.invoke(app, ["store", "ls", "--recipe", "smoke", "--set", f"store.root={smoke.store.root}", "--json"])
    rows = json.loads(listed.output)
    assert [(r["step"], r["key"], r["used_by_recipe"], r["rows"]) for r in rows] == [
        ("sources", first.ref.key, True, {"train": 160, "heldout": 40})
    ]


def test_orca_core_imports_neither_prefect_nor_ray(python):
    code = (
        "import sys, pkgutil, importlib, orca_core\n"
        "for m in pkgutil.walk_packages(orca_core.__path__, 'orca_core.'): importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'ray'))\n"
        "print(bad)"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"  # (DeepSpeed prints a notice on import)
