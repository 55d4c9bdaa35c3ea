"""Teacher prompts: Orca 1 system messages, Orca 2 strategies, prompt erasing.

Orca 1 (stage `orca1`): one of the 16 published system messages, chosen
uniformly from the set allowed for the query's sub-collection (paper Table 2,
`data/orca_system_messages.json`). The student sees the same message.

Orca 2 (stage `orca2`): the teacher sees a detailed strategy instruction;
the student sees only the generic cautious message (Prompt Erasing). A
strategy may take several calls: later calls append the teacher's previous
answer and a follow-up instruction, and the trace's response is all the
teacher's turns joined.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from orca_core.keys import sha256_text

PROMPTS_VERSION = "orca-prompts-v1"  # bump when any text below changes (it is part of every trace key)
ANSWER_SUFFIX = "End with the sentence 'So the answer is <answer>.'"


@cache
def orca1_data() -> dict:
    return json.loads(files("orca_core").joinpath("data/orca_system_messages.json").read_text())


def orca1_system_message(message_id: int) -> str:
    return orca1_data()["system_messages"][str(message_id)]


def orca1_allowed_ids(sub_collection: str, multiple_choice: bool) -> list[int]:
    """Orca 1's mapping; Flan 2021 multiple-choice tasks draw from {8, 10}."""
    allowed = orca1_data()["allowed_by_sub_collection"]
    if sub_collection == "flan2021" and multiple_choice:
        return list(allowed["flan2021_multiple_choice"])
    if sub_collection not in allowed:
        raise ValueError(f"no Orca 1 system messages for sub-collection {sub_collection!r} (dialog is skipped)")
    return list(allowed[sub_collection])


def pick_orca1_system_message(source_id: str, sub_collection: str, multiple_choice: bool, seed: int) -> tuple[int, str]:
    """Uniform over the allowed set, deterministic per (seed, source row)."""
    ids = orca1_allowed_ids(sub_collection, multiple_choice)
    chosen = random.Random(sha256_text(f"{seed}:orca1-system:{source_id}")).choice(ids)
    return chosen, orca1_system_message(chosen)


def in_strong_subset(source_id: str, fraction: float, seed: int) -> bool:
    """Orca 1's 1M-of-5M strong-teacher subset: a deterministic hash draw per row."""
    return int(sha256_text(f"{seed}:strong-subset:{source_id}")[:12], 16) / 16**12 < fraction


@dataclass(frozen=True)
class Strategy:
    name: str
    instruction: str  # the detailed system message the teacher sees
    followups: tuple[str, ...] = ()  # one extra call per follow-up instruction


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy(
            "step-by-step",
            "You are a careful problem solver. Solve the task step by step: write each intermediate "
            f"computation or deduction on its own line, checking it before moving on. {ANSWER_SUFFIX}",
        ),
        Strategy(
            "recall-then-generate",
            "You are a knowledgeable assistant. Before answering, recall the facts, definitions and "
            "methods the task depends on. In this turn, list only what you recall; do not answer yet.",
            (f"Now use what you recalled to answer the task directly. {ANSWER_SUFFIX}",),
        ),
        Strategy(
            "recall-reason-generate",
            "You are a knowledgeable assistant. Before answering, recall the facts the task depends on "
            "(for example, quantities or properties of the things it mentions). In this turn, list only "
            "what you recall; do not answer yet.",
            (f"Now reason step by step from the recalled facts to the answer. {ANSWER_SUFFIX}",),
        ),
        Strategy(
            "extract-generate",
            "You are a careful reader. First quote, word for word, the sentences of the given text that "
            f"the answer depends on. Then derive the answer from those quotes only. {ANSWER_SUFFIX}",
        ),
        Strategy(
            "explain-then-answer",
            "You are a clear teacher. Explain in a short paragraph the reasoning that decides the task, "
            f"naming the rule or fact that settles it, then give the answer. {ANSWER_SUFFIX}",
        ),
        Strategy(
            "direct-answer",
            "You are a concise assistant. Reply with the final answer only: no explanation, no restating "
            "of the question.",
        ),
    ]
}


def chat(system: str, user: str) -> list[dict[str, str]]:
    """A teacher request's chat messages; an empty system message (Orca 1 #1) sends no system turn."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def student_chat(system: str, user: str) -> list[dict[str, str]]:
    """The student's prompt, in training examples and in evaluation alike: a system turn always, even empty.

    Orca 2's "empty system message" is an empty system turn, and the student must be asked
    exactly as it was taught: a 1M-parameter student trained on `<|im_start|>system\n<|im_end|>`
    and prompted without that turn scored 56 % instead of 100 % on coin_moves.
    """
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def followup_messages(strategy: Strategy, user: str, previous: list[str]) -> list[dict[str, str]]:
    """Messages of call len(previous) of a multi-call strategy, given the earlier answers."""
    messages = chat(strategy.instruction, user)
    for answer, followup in zip(previous, strategy.followups):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": followup}]
    return messages


def join_turns(turns: list[str]) -> str:
    """The response the student learns from: every teacher turn, in order."""
    return "\n\n".join(t.strip() for t in turns)
