"""Shared fixtures. Prefect state lives in a private PREFECT_HOME for the whole session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="orca-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from orca_core.recipe import load_recipe  # noqa: E402


@pytest.fixture
def smoke(tmp_path: Path):
    """The smoke recipe with its store in a fresh temp folder."""
    return load_recipe("smoke", [f"store.root={tmp_path / 'store'}"])


@pytest.fixture
def python() -> str:
    return sys.executable
