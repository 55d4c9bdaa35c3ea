"""Answer extraction and correctness, shared by the trace filter and evaluation.

Two extractions, as in lm-eval-harness: `strict` reads only an explicit answer
statement ("So the answer is X.", "Answer: X", "#### X", "\\boxed{X}"), so it
also measures whether the model follows the answer format; `flexible` falls
back to the last option or number the text mentions, so a terse or
direct answer still counts. Multiple-choice answers are mapped onto the
option they name (by letter or by text), so correctness compares options. A
letter names an option only in answer context ("(B)", "option B", "Answer: B",
a line that is just "B"): "A change is ..." and "I think ..." name none.

Procedural (reasoning-gym) rows are scored by their generator's own scorer,
which knows the task's answer format (times, names, ciphers); everything else
compares normalized text or numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

# Explicit answer statements, each with a word it cannot match without (a cheap pre-check);
# the statement that starts last in the text wins.
_STATEMENTS = [
    ("answer", re.compile(r"\banswer\s+is\s*:?\s*(.+?)(?:\.\s|\.?\s*$)", re.IGNORECASE | re.MULTILINE)),
    ("answer", re.compile(r"\banswer\s*\**\s*:\s*\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)),
    ("####", re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)),
    ("\\boxed", re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")),
]
_LETTER_LINE = ("(", re.compile(r"^\s*\(([A-Z])\)\s*\.?\s*$", re.MULTILINE))  # a lone "(B)" line, MC only
# A capital letter names an option only in answer context: "A change is ..." and "I think ..." open
# sentences with the article and the pronoun (BBH letters options up to R). After a context word the
# letter must end its clause, so "Answer: A change ..." stays text.
_CLAUSE_END = r"(?![\w'’-])(?=[ \t]*(?:$|[).:,;!?*])|\s+(?:because|since|as|and|or|is|was)\b)"
_LETTER = re.compile(rf"^\(?([A-Z])(?:\)|{_CLAUSE_END})")  # the letter an answer statement's text starts with
_LONE = r"[ \t*_`]*\(?([A-Z])\)?[ \t*_`]*[.:!]?[ \t*_`]*"  # "B", "B.", "(B)", "**B**"
_LETTER_MENTION = re.compile(
    rf"^{_LONE}$"  # a line that is only a letter
    r"|(?<!\w)\(([A-Z])\)"  # "(B)" anywhere but in "P(A)"
    r"|\*\*\(?([A-Z])\)?\*\*"  # "**B**"
    r"|^[ \t]*([A-Z])\)"  # "B)" at a line start
    rf"|(?i:\b(?:answer|option|choice|letter|choose|pick|select|go\s+with|is|be)\b)\s*[:=-]?\s*\**([A-Z]){_CLAUSE_END}"
    r"|(?<![\w'’])([A-Z])\s+is\s+(?:the\s+)?(?i:correct|right|best|answer)\b",  # "B is correct"
    re.MULTILINE,
)
_LONE_LETTER = re.compile(_LONE)
_NUMBER = re.compile(r"(?<!\w)(?:-?\d+(?:,\d{3})+(?:\.\d+)?|-?\d+(?::\d{2})+|-?\d+(?:\.\d+)?)(?!\w)")
_WRAPPERS = "\"'`*_$“”‘’"


@dataclass(frozen=True)
class Extraction:
    strict: str | None  # from an explicit answer statement
    flexible: str | None  # strict, else the last option / number / line the text gives

    @property
    def format_ok(self) -> bool:
        return self.strict is not None


def clean(text: str) -> str:
    """Strip whitespace, a trailing period, surrounding quotes, emphasis and backticks."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(_WRAPPERS).strip()
        text = text.removesuffix(".")
        boxed = re.fullmatch(r"\\boxed\{(.*)\}", text)
        text = boxed.group(1) if boxed else text
    return text


def normalize(text: str) -> str:
    return " ".join(clean(text).split()).casefold()


@lru_cache(maxsize=4096)  # MC rows reuse a few option sets
def _option_pattern(options: tuple[str, ...]) -> re.Pattern[str] | None:
    """Any option's text as a whole word (longest first, so 'mother-in-law' beats 'mother')."""
    texts = sorted((o for o in options if o.strip()), key=lambda o: (-len(o), o))
    alternatives = [rf"(?<!\w){re.escape(o)}(?!\w)" for o in texts]
    return re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None


def lone_letter(text: str) -> str | None:
    """The letter a text consists of ("B", "(B).", "**B**"), or None."""
    match = _LONE_LETTER.fullmatch(text.strip())
    return match.group(1) if match else None


def _mentions(text: str, options: Sequence[str]) -> list[tuple[int, str]]:
    """Where `text` names an option, in order: (position, the option's text as written, or "(B)")."""
    pattern = _option_pattern(tuple(options))
    found = [(m.start(), m.group(0)) for m in pattern.finditer(text)] if pattern else []
    for m in _LETTER_MENTION.finditer(text):
        group = m.lastindex or 0  # each alternative captures just the letter
        if ord(m.group(group)) - 65 < len(options):  # "(E)" with four options names none
            found.append((m.start(group), f"({m.group(group)})"))
    return sorted(found)


def _index_of(mention: str, options: Sequence[str]) -> int | None:
    """The index of the option a mention names: by its exact text, or by its letter."""
    for index, option in enumerate(options):
        if normalize(option) == normalize(mention):
            return index
    letter = _LETTER.match(mention.strip())
    if letter and ord(letter.group(1)) - 65 < len(options):
        return ord(letter.group(1)) - 65
    return None


def option_index(answer: str, options: Sequence[str]) -> int | None:
    """The index of the option an MC answer names (letter, exact text, or the one option it contains).

    An index, not a text: a letter must keep naming its own option where two options read the same.
    """
    named = _index_of(answer, options)
    if named is not None:
        return named
    mentioned = {_index_of(mention, options) for _, mention in _mentions(answer, options)} - {None}
    return mentioned.pop() if len(mentioned) == 1 else None


def to_option(answer: str, options: Sequence[str]) -> str:
    """An MC answer as the option it names, or as it is if it names none (or there are no options)."""
    index = option_index(answer, options) if options else None
    return answer if index is None else options[index]


def _strict(text: str, options: Sequence[str]) -> str | None:
    lowered = text.lower()
    patterns = _STATEMENTS + ([_LETTER_LINE] if options else [])
    matches = [m for word, pattern in patterns if word in lowered for m in pattern.finditer(text)]
    if not matches:
        return None
    last = max(matches, key=lambda m: m.start(1))
    return clean(last.group(1)) or None


def _flexible(text: str, options: Sequence[str]) -> str | None:
    if options:  # the last option named; a last line naming none is no option ("A: ..." is not A)
        mentions = _mentions(text, options)
        return mentions[-1][1] if mentions else None
    lines = [clean(line) for line in text.splitlines() if clean(line)]
    if not lines:
        return None
    numbers = _NUMBER.findall(lines[-1])  # whole tokens only: a bare "1a" or "e7" stays whole
    return numbers[-1] if numbers else lines[-1]


def extract(text: str, options: Sequence[str] = (), map_options: bool = True) -> Extraction:
    """The answer `text` states (strict) and the one a lenient reader finds (flexible).

    With `options`, answers are mapped onto the option they name unless `map_options` is off
    (evaluation maps to letters itself: an option whose text is "B" must not pass for letter B).
    """
    strict = _strict(text, options)
    # A statement naming no option ("the answer is to number 8" in an echoed question) leaves the lenient
    # reader free to find one elsewhere.
    names_option = strict is not None and (not options or option_index(strict, options) is not None)
    flexible = strict if names_option else (_flexible(text, options) or strict)
    if options and map_options:
        strict = to_option(strict, options) if strict is not None else None
        flexible = to_option(flexible, options) if flexible is not None else None
    return Extraction(strict, flexible)


def as_number(text: str) -> float | None:
    candidate = clean(text).replace(",", "").removeprefix("$").removesuffix("%")
    try:
        value = float(candidate)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _same_number(answer: str, gold: str) -> bool:
    """Equal as numbers; an answer with words ("62 legs", "x = 7") counts by its last number."""
    numbers = _NUMBER.findall(answer)
    a, g = as_number(answer if not numbers else numbers[-1]), as_number(gold)
    return a is not None and g is not None and math.isclose(a, g, rel_tol=1e-9, abs_tol=1e-9)


@cache
def _scorer(generator: str) -> Any:
    import reasoning_gym

    import orca_core.sources.serial  # noqa: F401  registers the suite's own generators and scorers

    return reasoning_gym.get_score_answer_fn(generator)


def _generator_score(answer: str, gold: str, generator: str, metadata: str, question: str) -> float:
    try:
        entry = {"question": question, "answer": gold, "metadata": json.loads(metadata or "{}")}
        return float(_scorer(generator)(answer, entry))
    except Exception:  # a scorer that chokes on an odd answer scores it wrong
        return 0.0


def is_correct(
    answer: str | None,
    gold: str,
    *,
    options: Sequence[str] = (),
    generator: str = "",
    metadata: str = "{}",
    question: str = "",
) -> bool:
    """Whether an extracted answer matches the gold answer."""
    if answer is None:
        return False
    if options:
        return normalize(to_option(answer, options)) == normalize(gold)
    # Scorers compare strings exactly; "2,120" or "2120.0" for 2120 is still right.
    if generator:
        return _generator_score(answer, gold, generator, metadata, question) >= 1.0 or _same_number(answer, gold)
    return normalize(answer) == normalize(gold) or _same_number(answer, gold)
