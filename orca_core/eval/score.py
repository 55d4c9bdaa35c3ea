"""Strict and flexible answer extraction per benchmark kind, and correctness.

`strict` reads only an explicit answer statement, so it also measures whether
the model follows the answer format (its rate is the format-OK rate);
`flexible` falls back to where a lenient grader would look. The two can differ
hugely (lm-eval-harness GSM8K: 0.20 vs 0.78 for one model), so both are kept.

| kind       | strict                                              | flexible                                        |
|------------|-----------------------------------------------------|-------------------------------------------------|
| number     | "#### 18", "The answer is 18", "Answer: 18", boxed  | the last number anywhere in the output          |
| mc         | a statement naming an option, "(B)" alone on a      | strict, else the last option named: its text,   |
|            | line, or an output that is just a letter            | or its letter in answer context ("(B)", "option |
|            |                                                     | B", a lone "B" line; never "A change is ...")   |
| text       | an answer statement                                 | strict, else the last non-empty line            |
| procedural | `answers.extract` (the trace filter's own rule)     | `answers.extract`                               |

MC answers are compared as option letters; text answers after DROP-style
normalization (case, punctuation, articles) against the gold and its aliases,
or as numbers; procedural answers by their generator's scorer.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from orca_core import answers
from orca_core.eval.benchmarks import Example

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Scored:
    strict: str | None
    flexible: str | None
    correct_strict: bool
    correct_flexible: bool

    @property
    def format_ok(self) -> bool:
        return self.strict is not None


def letter_of(answer: str | None, options: tuple[str, ...]) -> str | None:
    """The option letter an extracted answer names (by letter or by option text), or None."""
    if answer is None:
        return None
    lone = answers.lone_letter(answer)
    if lone:
        return lone if ord(lone) - 65 < len(options) else None
    index = answers.option_index(answer, options)
    return None if index is None else chr(65 + index)


def _mc(output: str, options: tuple[str, ...]) -> tuple[str | None, str | None]:
    raw = answers.extract(output, options, map_options=False)  # letters stay letters: option texts can be "B"
    strict = letter_of(answers.lone_letter(output) or raw.strict, options)
    return strict, strict or letter_of(raw.flexible, options)


def _number(output: str) -> tuple[str | None, str | None]:
    strict = answers.extract(output).strict
    if strict is not None:
        numbers = answers._NUMBER.findall(strict)
        strict = numbers[-1] if numbers else None
    numbers = answers._NUMBER.findall(output)
    return strict, (numbers[-1] if numbers else None)


def normalize_text(text: str) -> str:
    """DROP/SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.casefold()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _text(output: str) -> tuple[str | None, str | None]:
    strict = answers.extract(output).strict
    lines = [answers.clean(line) for line in output.splitlines() if answers.clean(line)]
    return strict, strict if strict is not None else (lines[-1] if lines else None)


def _text_correct(answer: str | None, golds: tuple[str, ...]) -> bool:
    """Normalized equality with any gold; a numeric gold also matches the answer's last number ("18 yards")."""
    if answer is None:
        return False
    for gold in golds:
        if normalize_text(answer) == normalize_text(gold):
            return True
        g = answers.as_number(gold)
        numbers = answers._NUMBER.findall(answer)
        if g is not None and numbers and _number_correct(numbers[-1], gold):
            return True
    return False


def _number_correct(answer: str | None, gold: str) -> bool:
    if answer is None:
        return False
    a, g = answers.as_number(answer), answers.as_number(gold)
    return a is not None and g is not None and abs(a - g) <= 1e-9 * max(1.0, abs(g))


def score(example: Example, output: str) -> Scored:
    """Extract `output`'s answer both ways and grade each against the example's gold."""
    if example.kind == "mc":
        strict, flexible = _mc(output, example.options)
        return Scored(strict, flexible, strict == example.gold, flexible == example.gold)
    if example.kind == "number":
        strict, flexible = _number(output)
        return Scored(strict, flexible, _number_correct(strict, example.gold), _number_correct(flexible, example.gold))
    if example.kind == "text":
        strict, flexible = _text(output)
        golds = (example.gold, *example.aliases)
        return Scored(strict, flexible, _text_correct(strict, golds), _text_correct(flexible, golds))
    if example.kind == "procedural":
        extraction = answers.extract(output, example.options)
        grade = {"options": example.options, "generator": example.generator, "metadata": example.metadata,
                 "question": example.question}
        return Scored(extraction.strict, extraction.flexible,
                      answers.is_correct(extraction.strict, example.gold, **grade),
                      answers.is_correct(extraction.flexible, example.gold, **grade))
    raise ValueError(f"{example.benchmark}/{example.id}: unknown example kind {example.kind!r}")
