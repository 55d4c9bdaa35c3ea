"""What the oracle teacher says: gold answers with real reasoning, in the asked-for style.

The oracle stands in for ChatGPT and GPT-4 offline. It is started with the
sources artifact, so it knows every procedural prompt's gold answer and the
generator's metadata; from the metadata it rebuilds the actual computation
(facts to recall, intermediate steps, sentences to quote) and writes it the
way the system message asks: each Orca 1 message and each Orca 2 strategy
gets a recognisably different answer. A seeded draw per (seed, model, row,
style) makes some answers wrong, more often when the strategy does not suit
the task, so the pipeline's filters and strategy choice have something to do.
Everything is a pure function of the request: same request, same answer.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orca_core.keys import sha256_text
from orca_core.prompts import STRATEGIES, orca1_data
from orca_core.recipe.models import OracleSettings
from orca_core.sources.schema import normalize_question
from orca_core.sources.suite import SUITE
from orca_oracle.reasoning import Reasoning, reason, task_line

UNKNOWN_REPLY = "I am not sure how to answer this. I could not find enough information to give a reliable answer."
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(count_tokens(str(m.get("content") or "")) + 4 for m in messages)


def truncate_tokens(text: str, max_tokens: int) -> str:
    """The text up to the end of its `max_tokens`-th token."""
    if max_tokens <= 0:
        return ""
    ends = [m.end() for m in _TOKEN.finditer(text)]
    return text if len(ends) <= max_tokens else text[: ends[max_tokens - 1]]


class OracleBook:
    """Source rows by prompt text, with their reasoning computed once."""

    def __init__(self, rows: Iterable[dict[str, Any]]):
        self.by_inputs: dict[str, dict[str, Any]] = {}
        self.by_normalized: dict[str, dict[str, Any]] = {}
        for row in rows:
            self.by_inputs.setdefault(row["inputs"], row)
            self.by_normalized.setdefault(normalize_question(row["inputs"]), row)
        self._reasoning: dict[str, Reasoning] = {}

    @classmethod
    def from_parquet(cls, paths: Iterable[str | Path]) -> OracleBook:
        return cls(row for path in paths for row in pq.read_table(path).to_pylist())

    def __len__(self) -> int:
        return len(self.by_inputs)

    def find(self, user: str) -> dict[str, Any] | None:
        return self.by_inputs.get(user) or self.by_normalized.get(normalize_question(user))

    def reasoning(self, row: dict[str, Any]) -> Reasoning:
        if row["id"] not in self._reasoning:
            self._reasoning[row["id"]] = reason(row, gold(row))
        return self._reasoning[row["id"]]


def gold(row: dict[str, Any]) -> str:
    return str(row.get("answer") or row.get("targets") or "").strip()


# --- quality: which answers come out wrong --------------------------------------------------------


def wrong_probability(settings: OracleSettings, strategy: str | None, task_name: str) -> float:
    """error_rate, plus the strategy penalty when an Orca 2 strategy does not suit the family."""
    suited = SUITE[task_name].strategy if task_name in SUITE else None
    penalty = 0.0
    if strategy in STRATEGIES and suited is not None and strategy != suited:
        penalty = settings.strategy_penalty * (1.0 if strategy == "direct-answer" else 0.5)
    return min(1.0, settings.error_rate + penalty)


def wrong_answer(answer: str, options: list[str], rng: random.Random) -> str:
    """A plausible wrong answer: another option, the other of Yes/No, a near integer, a perturbed string."""
    others = [o for o in options if o.strip().lower() != answer.lower()]
    if others:
        return rng.choice(others)
    if answer.lower() in ("yes", "no"):
        return {"yes": "No", "no": "Yes"}[answer.lower()]
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + rng.choice((-3, -2, -1, 1, 2, 3)))
    digits = [i for i, c in enumerate(answer) if c.isdigit()]
    if digits:
        i = digits[-1]
        return answer[:i] + str((int(answer[i]) + rng.randint(1, 9)) % 10) + answer[i + 1 :]
    swaps = [i for i in range(len(answer) - 1) if answer[i].lower() != answer[i + 1].lower()]
    if swaps:
        i = rng.choice(swaps)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    return answer + answer[-1:] if answer else "unknown"


# --- rendering ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    reasoning: Reasoning
    answer: str  # what this answer claims (gold, or a wrong one)
    task: str  # the prompt's instruction or question line
    options: tuple[str, ...]
    call: int  # index of the call in a multi-call strategy
    # Orca 1's styles write a state trace as it is, one bare step a line (settings.trace_lines == "bare").
    bare_steps: bool = False


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?", '"')) else text + "."


def _final(d: Draft) -> str:
    return f"So the answer is {d.answer}."


def _lines(*parts: Iterable[str]) -> str:
    return "\n".join(line for part in parts for line in part)


def _facts_list(d: Draft) -> str:
    return "Recalled facts:\n" + "\n".join(f"- {_sentence(f)}" for f in d.reasoning.facts)


def _quotes(d: Draft) -> list[str]:
    return [f'"{q}"' for q in (d.reasoning.evidence or (d.task,))]


def _others_wrong(d: Draft, simple: bool) -> list[str]:
    """Why each other option is wrong (Orca 1 #8 and #10, multiple choice only)."""
    others = [o for o in d.options if o != d.answer]
    if not others:
        return []
    if simple:
        return ["Why the other answers are wrong:"] + [
            f"- {o} is not right, because when we work it out we get {d.answer}, not {o}." for o in others]
    return ["Why the other options are wrong:"] + [
        f"- {o}: it does not match the result of the reasoning above, which is {d.answer}." for o in others]


def _steps(d: Draft, write: Callable[[int, str], str]) -> list[str]:
    """The steps as a style writes them (`write(number, step)`), or bare, one a line (Draft.bare_steps)."""
    return list(d.reasoning.steps) if d.bare_steps else [write(k, s) for k, s in enumerate(d.reasoning.steps, 1)]


def _kid(d: Draft) -> list[str]:
    words = ("First", "Then", "Next", "After that")
    return _steps(d, lambda k, s: f"{words[min(k - 1, 3)]}: {_sentence(s)}")


ORCA2: dict[str, Callable[[Draft], str]] = {
    "step-by-step": lambda d: _lines(d.reasoning.steps, [_final(d)]),
    "direct-answer": lambda d: d.answer,
    "extract-generate": lambda d: _lines(_quotes(d), d.reasoning.steps[-2:], [_final(d)]),
    "explain-then-answer": lambda d: " ".join(
        map(_sentence, (*d.reasoning.facts[:2], *d.reasoning.steps[-2:], _final(d)))),
    "recall-then-generate": lambda d: _facts_list(d) if d.call == 0 else (
        f"Using what I recalled: {_sentence(d.reasoning.steps[-1])} {_final(d)}"),
    "recall-reason-generate": lambda d: _facts_list(d) if d.call == 0 else _lines(d.reasoning.steps, [_final(d)]),
}


def _orca1_detailed(d: Draft) -> str:  # 3: "a detailed and long answer"
    r = d.reasoning
    return _lines(
        [f"The task: {d.task}", "To answer it fully, I will go through everything that matters, one piece at a time.",
         "", "What we need to know:"], (f"- {_sentence(f)}" for f in r.facts),
        ["", "What the text tells us:"] if r.evidence else [], (f'- "{e}"' for e in r.evidence),
        ["", "Working it out:"], _steps(d, lambda k, s: f"{k}. {_sentence(s)}"),
        ["", f"Summary: putting all of these pieces together, each step checked against the one before, "
             f"the result is {d.answer}.", _final(d)])


def _orca1_mc(d: Draft, simple: bool) -> str:  # 8 (five year old) and 10
    if simple:
        body = ["", f"The task asks: {d.task} Let me explain it like you are five.", *_kid(d)]
    elif d.bare_steps:
        body = ["", f"Task: {d.task}", "Explanation:", *d.reasoning.steps]
    else:
        body = ["", f"Task: {d.task}", "Explanation: " + " ".join(map(_sentence, d.reasoning.steps))]
    return _lines([f"Answer: {d.answer}"], body, _others_wrong(d, simple), [_final(d)])


def _orca1_parts(d: Draft) -> str:  # 15: "Part #: ... Usage: ..."
    parts = [s for s in re.split(r"(?<=[.?!])\s+", d.task) if s][:3]
    steps, lines = list(d.reasoning.steps), []
    for k, part in enumerate(parts, 1):
        usage = steps.pop(0) if steps and k < len(parts) else "; ".join(steps) or d.answer
        lines += [f"Part #{k}: {part}", f"Usage: {_sentence(usage)} It meets the criteria because it does what "
                                        "this part asks, using only the given input."]
    lines += [f"Part #{len(parts) + 1}: Give the final answer.",
              f"Usage: {d.answer}. It meets the criteria because it is the result of the parts above."]
    return _lines(lines, [_final(d)])


def _orca1_teacher(d: Draft, solve: bool) -> str:  # 13 and 14
    how = "Solving it and showing how I used the guidelines:" if solve else "How to use them to find the answer:"
    guidelines = "Guidelines it gives: " + " ".join(map(_sentence, d.reasoning.facts))
    return _lines([f"What the task asks: {d.task}", guidelines, how], _steps(d, lambda k, s: f"{k}. {_sentence(s)}"),
                  [_final(d)])


_JUSTIFIED = {  # message id -> (opening line, numbered steps)
    2: ("Here is a detailed answer, so you don't need to search anywhere else.", False),
    5: ("Sure, I will follow the instruction closely.", False),
    6: ("Here is the information you need, explained fully.", False),
    7: ("I will complete the task step by step and justify each step.", True),
    11: ("Let me think step by step and justify the answer.", True),
    12: ("Following the instructions step by step:", True),
    16: ("Here is what I found.", False),
}


def _orca1_justified(d: Draft, intro: str, numbered: bool) -> str:
    r = d.reasoning
    steps = [] if d.bare_steps else list(map(_sentence, r.steps))  # bare steps follow the style's own words
    lines = [*map(_sentence, r.facts), *(f'The text says: "{e}"' for e in r.evidence), *steps]
    body = [f"Step {k}: {s}" for k, s in enumerate(lines, 1)] if numbered else [" ".join(lines)]
    return _lines([intro], body, r.steps if d.bare_steps else [], [_final(d)])


ORCA1: dict[int, Callable[[Draft], str]] = {
    1: lambda d: f"{d.answer}\n{_sentence(d.reasoning.steps[-1])}",
    3: _orca1_detailed,
    4: lambda d: _lines(["Let's figure it out together, like I'm talking to a five year old!"],
                        _kid(d), ["That's all there is to it!", _final(d)]),
    8: lambda d: _orca1_mc(d, simple=True),
    9: lambda d: _lines([f'The definition says: "{d.task}"', "Here is how I used the definition:"],
                        _steps(d, lambda k, s: f"- Applying the definition: {_sentence(s)}"), [_final(d)]),
    10: lambda d: _orca1_mc(d, simple=False),
    13: lambda d: _orca1_teacher(d, solve=False),
    14: lambda d: _orca1_teacher(d, solve=True),
    15: _orca1_parts,
    **{i: (lambda d, a=args: _orca1_justified(d, *a)) for i, args in _JUSTIFIED.items()},
}

# Exact system message text -> style: an Orca 2 strategy name or "orca1-<id>".
STYLES: dict[str, str] = {
    **{text: f"orca1-{i}" for i, text in orca1_data()["system_messages"].items()},
    **{s.instruction: name for name, s in STRATEGIES.items()},
}


def render(style: str, draft: Draft) -> str:
    if style.startswith("orca1-"):
        return ORCA1[int(style.removeprefix("orca1-"))](draft)
    return ORCA2[style](draft)


def _trim(items: tuple[str, ...], depth: float, last: bool = False) -> tuple[str, ...]:
    """explain_depth < 1: keep ceil(depth * n) items (at least 1): the first ones, or the last for steps."""
    keep = max(1, math.ceil(depth * len(items)))
    return items[-keep:] if last else items[:keep]


def respond(book: OracleBook, model: str, settings: OracleSettings, messages: list[dict[str, Any]]) -> str:
    """The completion text for a chat request (deterministic)."""
    system = next((str(m.get("content") or "") for m in messages if m.get("role") == "system"), "")
    user = next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")
    row = book.find(user)
    if row is None:
        return UNKNOWN_REPLY
    known = STYLES.get(system)
    style = known or "explain-then-answer"
    answer = gold(row)
    rng = random.Random(sha256_text(f"{settings.seed}:{model}:{row['id']}:{style}"))
    if rng.random() < wrong_probability(settings, known, row["task_name"]):
        answer = wrong_answer(answer, list(row.get("options") or []), rng)
    r = book.reasoning(row)
    if settings.explain_depth < 1:
        r = replace(r, facts=_trim(r.facts, settings.explain_depth), evidence=_trim(r.evidence, settings.explain_depth),
                    steps=_trim(r.steps, settings.explain_depth, last=True))
    call = sum(1 for m in messages if m.get("role") == "assistant")
    draft = Draft(r, answer, task_line(row["inputs"]), tuple(row.get("options") or ()), call,
                  bare_steps=r.trace and settings.trace_lines == "bare")
    return render(style, draft)
