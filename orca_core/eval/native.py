"""The "native" system message: prompt a checkpoint the way its last curriculum stage was trained.

Zero-shot with the empty system message is the paper's protocol, and the
report keeps that column. But a small student ties what it learned to the
system messages it learned it under: an Orca 1 student reasons when an Orca 1
system message asks it to, and falls back to its FLAN habit (a bare answer)
under an empty one. "native" gives each checkpoint the prompting of its own
training data, so the stages are compared on what they learned rather than on
how they cope with a prompt they never saw:

    base, flan   the empty message (FLAN has no system messages)
    orca1        an Orca 1 message drawn, per example, from the set its sub-collection draws from
    orca2        the generic message that prompt erasing left in its data

Procedural tasks take their suite sub-collection; other benchmarks count as CoT.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from orca_core.eval.benchmarks import Example
from orca_core.prompts import pick_orca1_system_message
from orca_core.sources.suite import SUITE


def sub_collection(example: Example) -> str:
    if example.benchmark == "procedural-heldout" and example.task in SUITE:
        return SUITE[example.task].sub_collection
    return "cot"


def native_prompter(stage_data: str | None, generic_system_message: str, seed: int = 0) -> Callable[[Example], str]:
    """example -> system message text, for a checkpoint whose last stage trained on `stage_data` (None: base)."""
    if stage_data in (None, "flan"):
        return lambda example: ""
    if stage_data == "orca2":
        return lambda example: generic_system_message
    if stage_data == "orca1":
        return lambda example: pick_orca1_system_message(example.id, sub_collection(example), bool(example.options),
                                                         seed)[1]
    raise ValueError(f"unknown stage data {stage_data!r}: expected flan, orca1 or orca2")


def stage_data_of(checkpoint: Path) -> str | None:
    """The data of the stage that exported `checkpoint` (its recipe.json), or None for a base or foreign model."""
    path = Path(checkpoint) / "recipe.json"
    if not path.exists():
        return None
    return (json.loads(path.read_text()).get("stage") or {}).get("data")
