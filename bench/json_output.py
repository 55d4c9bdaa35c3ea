"""Bench scripts print one JSON document on stdout; everything else goes to stderr."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable


def print_json(measure: Callable[[], dict]) -> None:
    """Run `measure` with stdout sent to stderr (vLLM, DeepSpeed and transformers print notices there),
    then print its result as the only thing on stdout."""
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = measure()
    print(json.dumps(result, indent=2), file=real_stdout)
