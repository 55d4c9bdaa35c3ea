"""Joining Ray: a private local runtime by default, or the cluster the recipe names.

Its own module so the trainer and the fan-out share it without importing each other
(step keys digest the modules a step's code reaches).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import ray

from orca_core.recipe.models import Recipe


def ensure_ray(recipe: Recipe) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if recipe.ray.address == "local":
        # A private runtime with its own temp dir: /tmp/ray is shared with every other user of the machine.
        temp_dir = Path(tempfile.gettempdir()) / f"orca-ray-{os.getuid()}"
        kwargs |= {"address": "local", "num_cpus": recipe.ray.num_cpus, "_temp_dir": str(temp_dir)}
    else:
        kwargs["address"] = recipe.ray.address
    ray.init(**kwargs)
