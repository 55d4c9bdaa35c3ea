"""Where an artifact came from, beyond its key: the recipe and the code that built it.

The key (`key.json`) says WHAT an artifact is made of; provenance says which
run made it: the resolved recipe's hash (the recipe itself is saved once per
hash under `<store>/.recipes/<hash>.yaml`, so `orca run --recipe` on that file
rebuilds any artifact of the run) and the code version (the git commit, with
"-dirty" for uncommitted changes, or the installed package version).
Provenance goes into the manifest's stats, never into the key: the same
inputs built by a newer commit are still the same artifact.
"""

from __future__ import annotations

import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from orca_core.recipe.load import recipe_hash, recipe_yaml
from orca_core.recipe.models import Recipe
from orca_core.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
RECIPES = ".recipes"


@cache
def code_version() -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"git:{commit}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"orca-pipeline {metadata.version('orca-pipeline')}"


def provenance(store: ArtifactStore, recipe: Recipe) -> dict[str, Any]:
    """The manifest's `provenance` entry; saves the resolved recipe in the store once per hash."""
    digest = recipe_hash(recipe)
    path = store.url(RECIPES, f"{digest}.yaml")
    if not store.fs.exists(path):
        store.fs.makedirs(store.url(RECIPES), exist_ok=True)
        with store.fs.open(path, "w") as f:
            f.write(recipe_yaml(recipe))
    return {"recipe": recipe.name, "recipe_hash": digest, "recipe_file": path, "code_version": code_version()}
