"""Our own generators for inherently serial tasks, registered with reasoning-gym.

Reasoning-gym has no generator for these (its `coin_flip` asks for probabilities),
so they are written in its interface (a seeded `ProceduralDataset` of
{question, answer, metadata} with its gold scorer) and registered by name:
`reasoning_gym.create_dataset` and `get_score_answer_fn` find them like any
other, once this module is imported.

Sizes are fixed, so every prompt and every step trace has the same width: step k
of a trace sits at a constant offset from item k of the prompt (shell game: a
5-character swap "A-B, " -> a 5-character step "AB>C\\n"; coins: a 3-character
move "F, " -> a 3-character step "FT\\n", the move and the side after it), the
regime where a small transformer learns a step-by-step trace and fails on the
direct answer (Li et al. 2024, "Chain of Thought Empowers Transformers to Solve
Inherently Serial Problems").
`max_of_two` is the contrast: one comparison, best answered directly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from reasoning_gym.factory import ProceduralDataset, register_dataset

CUP_NAMES = "ABCDEFGH"
FLIP, KEEP = "F", "K"


def _exact(answer: str | None, entry: dict[str, Any]) -> float:
    """1.0 for the gold answer itself (case and surrounding space aside), else 0.0."""
    return float(isinstance(answer, str) and answer.strip().upper() == str(entry["answer"]).strip().upper())


class _ExactAnswerDataset(ProceduralDataset):
    """reasoning-gym's dataset interface for the generators here: seeded by the config, scored by exact match."""

    def __init__(self, config: Any):
        super().__init__(config=config, seed=config.seed, size=config.size)

    def score_answer(self, answer: str | None, entry: dict[str, Any]) -> float:
        return _exact(answer, entry)


@dataclass
class ShellGameConfig:
    cups: int = 5
    swaps: int = 5
    seed: int | None = None
    size: int = 500

    def validate(self) -> None:
        if not 2 <= self.cups <= len(CUP_NAMES):
            raise ValueError(f"shell_game: cups must be 2..{len(CUP_NAMES)}, got {self.cups}")
        if self.swaps < 1:
            raise ValueError(f"shell_game: swaps must be >= 1, got {self.swaps}")


class ShellGameDataset(_ExactAnswerDataset):
    """A ball under one of n cups; after k swaps of two cups, which cup is it under?"""

    def __getitem__(self, idx: int) -> dict[str, Any]:
        rng = random.Random(self.seed + idx)
        cups = CUP_NAMES[: self.config.cups]
        start = rng.choice(cups)
        swaps = ["".join(rng.sample(cups, 2)) for _ in range(self.config.swaps)]
        cup, path = start, []
        for a, b in swaps:
            cup = b if cup == a else a if cup == b else cup
            path.append(cup)
        question = (f"Cups {cups[0]}-{cups[-1]}; a ball is under cup {start}. "
                    f"Swaps: {', '.join(f'{a}-{b}' for a, b in swaps)}. Which cup is the ball under?")
        return {"question": question, "answer": cup,
                "metadata": {"source_dataset": "shell_game", "source_index": idx, "start": start,
                             "swaps": swaps, "path": path}}


@dataclass
class CoinMovesConfig:
    moves: int = 10
    seed: int | None = None
    size: int = 500

    def validate(self) -> None:
        if self.moves < 1:
            raise ValueError(f"coin_moves: moves must be >= 1, got {self.moves}")


class CoinMovesDataset(_ExactAnswerDataset):
    """A coin showing H or T, then k moves that flip (F) or keep (K) it: which side is up? (parity)"""

    def __getitem__(self, idx: int) -> dict[str, Any]:
        rng = random.Random(self.seed + idx)
        side = start = rng.choice("HT")
        moves = [rng.choice((FLIP, KEEP)) for _ in range(self.config.moves)]
        sides = []
        for move in moves:
            side = {"H": "T", "T": "H"}[side] if move == FLIP else side
            sides.append(side)
        question = (f"A coin shows {start}. Moves (F flips it, K keeps it): {', '.join(moves)}. "
                    "Which side is up?")
        return {"question": question, "answer": side,
                "metadata": {"source_dataset": "coin_moves", "source_index": idx, "start": start,
                             "moves": moves, "sides": sides}}


@dataclass
class MaxOfTwoConfig:
    digits: int = 3
    seed: int | None = None
    size: int = 500

    def validate(self) -> None:
        if self.digits < 1:
            raise ValueError(f"max_of_two: digits must be >= 1, got {self.digits}")


class MaxOfTwoDataset(_ExactAnswerDataset):
    """Two different numbers of the same digit count: which is larger?"""

    def __getitem__(self, idx: int) -> dict[str, Any]:
        rng = random.Random(self.seed + idx)
        low, high = 10 ** (self.config.digits - 1), 10**self.config.digits - 1
        a, b = rng.sample(range(low, high + 1), 2)
        return {"question": f"Which number is larger, {a} or {b}?", "answer": str(max(a, b)),
                "metadata": {"source_dataset": "max_of_two", "source_index": idx, "a": a, "b": b}}


GENERATORS = {
    "shell_game": (ShellGameDataset, ShellGameConfig),
    "coin_moves": (CoinMovesDataset, CoinMovesConfig),
    "max_of_two": (MaxOfTwoDataset, MaxOfTwoConfig),
}


def register() -> None:
    """Make the generators known to reasoning-gym by name (idempotent: imports may repeat)."""
    from reasoning_gym.factory import DATASETS

    for name, (dataset, config) in GENERATORS.items():
        if name not in DATASETS:
            register_dataset(name, dataset, config)


register()
