"""BIG-Bench Hard from its BIG-bench sources, in BBH's schema ({"examples": [{input, target}]}).

BBH (Suzgun et al., 2022) is 27 BIG-bench tasks, each at most 250 examples,
reformatted for generation: multiple-choice tasks list "Options:\\n(A) ...",
target "(X)"; binary tasks ask for Yes/No, valid/invalid, yes/no; the rest
keep an exact-match target (sorted words, a closing bracket sequence, a
number). This module rebuilds that from the bigbench 1.0.0 sdist:

- 24 tasks come from task.json files (logical_deduction and
  tracking_shuffled_objects three/five/seven_objects subtasks map to BBH's
  names, causal_judgment -> causal_judgement,
  formal_fallacies_syllogisms_negation -> formal_fallacies);
- boolean_expressions, multistep_arithmetic_two and web_of_lies are programs
  (task.py) in BIG-bench; their generators are small and self-contained, so
  they are ported here, seeded, with BBH's settings (8-token expressions; two
  parenthesised groups of four numbers in -9..9; five statements, with the
  names read from BIG-bench's own web_of_lies/task.py).

Where BIG-bench lists the correct option first in every example
(date_understanding, temporal_sequences) the options are shuffled (seeded);
elsewhere they keep the file's order. Two options that are both right
(geometric_shapes' circle/ellipse, reasoning_about_colored_objects' "3" and
"three") keep only BBH's form. Inputs are deduplicated, and tasks with more
than 250 examples are sampled (seeded) down to 250, kept in file order.
The texts follow BBH's templates, though they are not BBH's exact sample.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Callable
from typing import Any

CAP = 250
SEED = 42
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen"}
GENERATED_FROM = {
    "boolean_expressions": "boolean_expressions/task.py (expression_lengths=8, BBH's length)",
    "multistep_arithmetic_two": "multistep_arithmetic/task.py (depth_levels=[2], length=4)",
    "web_of_lies": "web_of_lies/task.py (num_sentences=5, its _names)",
}
Make = Callable[[dict[str, Any], dict[str, Any], random.Random], tuple[str, str]]


def settings() -> dict[str, Any]:
    return {"cap": CAP, "seed": SEED, "version": 1}


def _lettered(question: str, example: dict[str, Any], rng: random.Random | None = None,
              strip_period: bool = False) -> tuple[str, str]:
    scores: dict[str, float] = example["target_scores"]
    keys = list(scores)
    if NUMBER_WORDS & set(keys):  # "3" and "three": BBH keeps the words
        keys = [k for k in keys if not k.isdigit()]
    best = max(scores[k] for k in keys)
    right = [k for k in keys if scores[k] == best]
    gold = example["target"] if example.get("target") in right else right[0]
    keys = [k for k in keys if k == gold or scores[k] != best]
    if rng is not None:
        rng.shuffle(keys)
    texts = [k.strip().removesuffix(".") if strip_period else k.strip() for k in keys]
    block = "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(texts))
    return f"{question.rstrip()}\nOptions:\n{block}", f"({LETTERS[keys.index(gold)]})"


def _best(example: dict[str, Any]) -> str:
    scores = example["target_scores"]
    return max(scores, key=lambda k: scores[k])


def _binary(question: str, labels: tuple[str, str], answer: str) -> tuple[str, str]:
    return f"{question}\nOptions:\n- {labels[0]}\n- {labels[1]}", answer


def _pair(question: str, text: str, pattern: str, example: dict[str, Any]) -> tuple[str, str]:
    """Hyperbaton / snarks: the two candidates sit inside the input; make them options (A) and (B)."""
    match = re.search(pattern, text, re.DOTALL)
    if match is None:
        raise ValueError(f"unexpected input: {text[:120]!r}")
    gold = _best(example).strip("() ").lower()
    options = [match.group(1).strip(), match.group(2).strip()]
    return f"{question}\nOptions:\n(A) {options[0]}\n(B) {options[1]}", "(A)" if gold == "a" else "(B)"


def _prefix(task: dict[str, Any]) -> str:
    return task.get("task_prefix", "").strip()


# BBH task -> (BIG-bench member, how one example becomes (input, target))
FROM_JSON: dict[str, tuple[str, Make]] = {
    "causal_judgement": ("causal_judgment/task.json", lambda e, t, r: _binary(
        f"{_prefix(t)}\n{e['input'].strip()}", ("Yes", "No"), _best(e))),
    "date_understanding": ("date_understanding/task.json", lambda e, t, r: _lettered(e["input"], e, rng=r)),
    "disambiguation_qa": ("disambiguation_qa/task.json", lambda e, t, r: _lettered(
        f"{_prefix(t)}\nSentence: {e['input']}", e)),
    "dyck_languages": ("dyck_languages/task.json", lambda e, t, r: (
        f"{_prefix(t)} Input: {e['input'].strip()}", _best(e))),
    "formal_fallacies": ("formal_fallacies_syllogisms_negation/task.json", lambda e, t, r: _binary(
        e["input"].replace("\n Is the argument", "\nIs the argument").strip(), ("valid", "invalid"), _best(e))),
    "geometric_shapes": ("geometric_shapes/task.json", lambda e, t, r: _lettered(e["input"], e)),
    "hyperbaton": ("hyperbaton/task.json", lambda e, t, r: _pair(
        "Which sentence has the correct adjective order:", e["input"], r'\ba "(.+?)" b "(.+?)"', e)),
    **{f"logical_deduction_{n}_objects": (f"logical_deduction/{n}_objects/task.json", lambda e, t, r: _lettered(
        f"{_prefix(t)} {e['input'].strip()}", e, strip_period=True)) for n in ("three", "five", "seven")},
    "movie_recommendation": ("movie_recommendation/task.json", lambda e, t, r: _lettered(
        f"Find a movie similar to {e['input'].strip()}", e)),
    "navigate": ("navigate/task.json", lambda e, t, r: _binary(
        f"{_prefix(t)} {e['input'].strip()}", ("Yes", "No"), "Yes" if _best(e) == "True" else "No")),
    "object_counting": ("object_counting/task.json", lambda e, t, r: (
        e["input"].strip(), next(x for x in e["target"] if x.strip().isdigit()))),
    "penguins_in_a_table": ("penguins_in_a_table/task.json", lambda e, t, r: _lettered(
        f"{t['task_prefix']}{e['input'].strip()}", e)),
    "reasoning_about_colored_objects": ("reasoning_about_colored_objects/task.json", lambda e, t, r: _lettered(
        e["input"], e)),
    "ruin_names": ("ruin_names/task.json", lambda e, t, r: _lettered(e["input"], e)),
    "salient_translation_error_detection": ("salient_translation_error_detection/task.json", lambda e, t, r: _lettered(
        f"{t['task_prefix']}{e['input']}", e)),
    "snarks": ("snarks/task.json", lambda e, t, r: _pair(
        "Which statement is sarcastic?", e["input"], r"\(a\)(.+?)\(b\)(.+)$", e)),
    "sports_understanding": ("sports_understanding/task.json", lambda e, t, r: (
        f'Is the following sentence plausible? "{e["input"].strip().rstrip(".")}."',
        "yes" if _best(e) == "plausible" else "no")),
    "temporal_sequences": ("temporal_sequences/task.json", lambda e, t, r: _lettered(e["input"], e, rng=r)),
    **{f"tracking_shuffled_objects_{n}_objects": (f"tracking_shuffled_objects/{n}_objects/task.json",
                                                  lambda e, t, r: _lettered(e["input"], e, strip_period=True))
       for n in ("three", "five", "seven")},
    "word_sorting": ("word_sorting/task.json", lambda e, t, r: (
        f"{_prefix(t)} List: {e['input'].strip()}", e["target"])),
}


def boolean_expressions(rng: random.Random) -> list[dict[str, str]]:
    """BIG-bench's grammar (True/False, and/or/not, parentheses), every 8-token expression, shuffled."""
    start, cont = ("True", "False", "not", "("), ("or", "and", ")")

    def grow(prefix: tuple[str, ...], depth: int) -> Any:
        if len(prefix) == 8:
            if depth == 0 and prefix[-1] in ("True", "False", ")"):
                yield prefix
            return
        for token in start if not prefix or prefix[-1] in ("or", "and", "not", "(") else cont:
            if depth + (token == "(") - (token == ")") >= 0:
                yield from grow((*prefix, token), depth + (token == "(") - (token == ")"))

    expressions = sorted(" ".join(tokens) for tokens in grow((), 0))
    rng.shuffle(expressions)
    # eval is safe here: the text is our own grammar's tokens, nothing from a file.
    return [{"input": f"{e} is", "target": str(eval(e, {"__builtins__": {}}))} for e in expressions[:CAP]]


def multistep_arithmetic_two(rng: random.Random) -> list[dict[str, str]]:
    """"((a op b op c op d) op (e op f op g op h)) =", numbers in -9..9, ops + - *."""
    numbers, ops = [str(n) for n in range(-9, 10)], ["+", "-", "*"]

    def group() -> str:
        return "(" + " ".join(f"{rng.choice(numbers)} {rng.choice(ops)}" for _ in range(3)) + f" {rng.choice(numbers)})"

    seen: dict[str, str] = {}
    while len(seen) < CAP:
        expression = f"({group()} {rng.choice(ops)} {group()})"
        seen.setdefault(expression, str(eval(expression, {"__builtins__": {}})))  # our own arithmetic text
    return [{"input": f"{e} =", "target": t} for e, t in seen.items()]


def web_of_lies(rng: random.Random, names: list[str]) -> list[dict[str, str]]:
    """Five statements, each person saying whether the previous one lies; does the last tell the truth?"""
    out: dict[str, str] = {}
    while len(out) < CAP:
        people, answer, sentences = rng.sample(names, 5), True, []
        for i, person in enumerate(people):
            truth = rng.choice((True, False))
            answer = answer if truth else not answer
            statement = "tells the truth" if truth else "lies"
            sentences.append(f"{person} {statement}." if i == 0 else f"{person} says {people[i - 1]} {statement}.")
        question = f"Question: {' '.join(sentences)} Does {people[-1]} tell the truth?"
        out.setdefault(question, "Yes" if answer else "No")
    return [{"input": q, "target": t} for q, t in out.items()]


def _names(source: bytes) -> list[str]:
    """WebOfLiesTask._names, read from BIG-bench's task.py without importing it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_names" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError("web_of_lies/task.py: no _names list")


def members() -> set[str]:
    """The BIG-bench files (under benchmark_tasks/) the conversion reads."""
    return {member for member, _ in FROM_JSON.values()} | {"web_of_lies/task.py", "boolean_expressions/task.py",
                                                            "multistep_arithmetic/task.py"}


def _cap(task: str, examples: list[dict[str, str]]) -> list[dict[str, str]]:
    unique = list({e["input"]: e for e in examples}.values())
    if len(unique) <= CAP:
        return unique
    keep = sorted(random.Random(f"{SEED}:{task}:sample").sample(range(len(unique)), CAP))
    return [unique[i] for i in keep]


def convert(files: dict[str, bytes]) -> tuple[dict[str, list[dict[str, str]]], list[str]]:
    """BBH task -> examples, from the BIG-bench files found; notes say what was left out and why."""
    tasks: dict[str, list[dict[str, str]]] = {}
    notes = []
    for task, (member, make) in FROM_JSON.items():
        if member not in files:
            notes.append(f"{task}: left out ({member} is not in the sdist)")
            continue
        source = json.loads(files[member])
        rng = random.Random(f"{SEED}:{task}:options")
        tasks[task] = _cap(task, [dict(zip(("input", "target"), make(e, source, rng)))
                                  for e in source["examples"]])
    generators = {"boolean_expressions": boolean_expressions, "multistep_arithmetic_two": multistep_arithmetic_two}
    for task, generate in generators.items():
        tasks[task] = generate(random.Random(f"{SEED}:{task}"))
    if "web_of_lies/task.py" in files:
        tasks["web_of_lies"] = web_of_lies(random.Random(f"{SEED}:web_of_lies"), _names(files["web_of_lies/task.py"]))
    else:
        notes.append("web_of_lies: left out (web_of_lies/task.py, which holds its names, is not in the sdist)")
    return dict(sorted(tasks.items())), notes
