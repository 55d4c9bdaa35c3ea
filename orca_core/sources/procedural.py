"""Generate the procedural suite into FLAN-v2-shaped rows (see `suite.py`).

Deterministic by seed: every (family, split) draws from its own reasoning-gym
seed derived from the recipe seed. The held-out split is generated first;
train skips any question that is in held-out, and no question repeats inside
a split, so the two splits are disjoint by construction (and checked).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import reasoning_gym

from orca_core.keys import sha256_text
from orca_core.sources import serial  # noqa: F401  registers our own generators with reasoning-gym
from orca_core.sources.schema import format_options, normalize_question, row_id
from orca_core.sources.suite import SUITE, TASK_SOURCE, Family

log = logging.getLogger(__name__)

OVERSAMPLE = 4  # generator indices to try per wanted row before giving up on unique questions


def derived_seed(seed: int, *parts: str) -> int:
    return int(sha256_text(":".join([str(seed), *parts]))[:8], 16)


def family_options(family: Family, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {**family.options, **overrides.get(family.name, {})}


def reasoning_gym_version() -> str:
    from importlib.metadata import version

    return version("reasoning-gym")


def effective_suite(cfg: Any) -> dict[str, Any]:
    """What each chosen family will generate with (part of the sources key)."""
    names = cfg.families if cfg.families is not None else list(SUITE)
    return {
        name: {
            "generator": SUITE[name].generator,
            "sub_collection": SUITE[name].sub_collection,
            "options": json.loads(json.dumps(family_options(SUITE[name], cfg.generator_options), default=str)),
            "choices": list(SUITE[name].choices),
            "n_choices": SUITE[name].n_choices,
        }
        for name in names
        if name in SUITE  # unknown names fail in generate_suite with the list of known ones
    }


def _row(family: Family, entry: dict[str, Any], split: str, rng: random.Random) -> dict[str, Any]:
    question, answer = entry["question"].strip(), str(entry["answer"]).strip()
    options: list[str] = []
    if family.choices:
        distractors = [c for c in family.choices if c.lower() != answer.lower()]
        options = rng.sample(distractors, family.n_choices - 1) + [answer]
        rng.shuffle(options)
        inputs = f"{question}\n\n{format_options(options)}"
    else:
        inputs = question
    return {
        "id": row_id(family.name, question),
        "inputs": inputs,
        "targets": answer,  # the original target: the answer alone (stage `flan` trains on it)
        "task_source": TASK_SOURCE[family.sub_collection],
        "task_name": family.name,
        "template_type": "zs_opt" if options else "zs_noopt",
        "sub_collection": family.sub_collection,
        "split": split,
        "answer": answer,
        "options": options,
        "multiple_choice": bool(options),
        "source": "procedural",
        "generator": family.generator,
        "metadata": json.dumps(entry.get("metadata", {}), sort_keys=True, default=str),
    }


def _generate(
    family: Family, split: str, n: int, seed: int, options: dict[str, Any], exclude: set[str]
) -> tuple[list[dict[str, Any]], set[str], int]:
    """n rows with questions unique in the split and absent from `exclude`; their questions; skips."""
    if n == 0:
        return [], set(), 0
    gen_seed = derived_seed(seed, family.name, split)
    dataset = reasoning_gym.create_dataset(family.generator, size=n * OVERSAMPLE + 16, seed=gen_seed, **options)
    rng = random.Random(gen_seed)
    rows, questions, skipped = [], set(), 0
    for index in range(len(dataset)):
        entry = dataset[index]
        question = normalize_question(entry["question"])
        if question in questions or question in exclude:
            skipped += 1
            continue
        questions.add(question)
        rows.append(_row(family, entry, split, rng))
        if len(rows) == n:
            return rows, questions, skipped
    raise ValueError(
        f"sources.procedural: family {family.name!r} yields only {len(rows)} unique {split} questions "
        f"(asked for {n}); lower the count or widen its generator options"
    )


def generate_suite(
    families: Iterable[str] | None,
    train_per_family: int,
    heldout_per_family: int,
    seed: int,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(train rows, held-out rows, stats) for the chosen families."""
    names = list(families) if families is not None else list(SUITE)
    unknown = sorted(set(names) - set(SUITE)) + sorted(set(overrides or {}) - set(SUITE))
    if unknown:
        raise ValueError(f"sources.procedural: unknown families {unknown}; known: {sorted(SUITE)}")
    train, heldout, stats = [], [], {}
    for name in names:
        family, started = SUITE[name], time.perf_counter()
        options = family_options(family, overrides or {})
        held, held_questions, held_skipped = _generate(family, "heldout", heldout_per_family, seed, options, set())
        rows, _, train_skipped = _generate(family, "train", train_per_family, seed, options, held_questions)
        train += rows
        heldout += held
        stats[name] = {
            "generator": family.generator,
            "sub_collection": family.sub_collection,
            "strategy": family.strategy,
            "options": json.loads(json.dumps(options, default=str)),
            "skipped_repeats": held_skipped + train_skipped,
        }
        elapsed = time.perf_counter() - started
        log.info("procedural %-24s %5d train %5d held-out (%.0f rows/s)", name, len(rows), len(held),
                 (len(rows) + len(held)) / max(elapsed, 1e-9))
    check_disjoint(train, heldout)
    return train, heldout, stats


def check_disjoint(train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> None:
    """Raise if any question is in both splits (ids hash task + normalized question)."""
    shared = {r["id"] for r in train} & {r["id"] for r in heldout}
    if shared:
        raise AssertionError(f"{len(shared)} questions are in both train and held-out, e.g. {sorted(shared)[:3]}")
