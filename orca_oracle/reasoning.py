"""Per-family reasoning of the oracle teacher, rebuilt from the generator metadata.

Each procedural family's rows carry reasoning-gym's metadata (the expression,
the animals, the cipher rotation, ...). From it we compute what a good teacher
would write: the facts to recall, the real intermediate steps, and the
sentences of the prompt the answer rests on. `solver` decides the
style; this module only knows the content. Rows whose metadata does not fit
(FLAN rows, changed generator options) get generic reasoning.
"""

from __future__ import annotations

import ast
import calendar
import json
import logging
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from reasoning_gym.arithmetic.leg_counting import ANIMALS as LEGS  # the generator's own legs table

from orca_core.sources.suite import WEEKDAYS

log = logging.getLogger(__name__)

_REFERENCE = date(2000, 1, 1)  # a Saturday


@dataclass(frozen=True)
class Reasoning:
    facts: tuple[str, ...]  # what to recall: rules, tables, methods
    steps: tuple[str, ...]  # the real intermediate computations
    evidence: tuple[str, ...] = ()  # sentences quoted verbatim from the prompt
    # The steps are a fixed-width state trace (shell game, coin moves): each step as wide as the operand it
    # reads in the prompt ("F, " -> "FT", "A-B, " -> "AB>C"). The oracle's `trace_lines` setting decides whether
    # Orca 1's styles keep that width (solver.py).
    trace: bool = False


_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": operator.mul, "/": operator.truediv, "+": operator.add, "-": operator.sub}


def task_line(inputs: str) -> str:
    """The prompt's question (first line with a '?') or else its first line, options left out."""
    lines = [line.strip() for line in inputs.split("OPTIONS:")[0].splitlines() if line.strip()]
    return next((line for line in lines if "?" in line), lines[0] if lines else inputs.strip())


def _num(x: float) -> int | float:
    return int(x) if x == int(x) else round(x, 6)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "/", ast.Div: "/"}
_AST_FNS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


_PLACES = ("ones", "tens", "hundreds", "thousands", "ten thousands")


def column_addition(a: int, b: int) -> list[str]:
    """a + b by hand, one line per column: the digits, the carry in, the digit written and the carry out."""
    lines, carry = [], 0
    x, y = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(x), len(y))):
        digits = [int(n[i]) for n in (x, y) if i < len(n)]
        total = sum(digits) + carry
        terms = " + ".join(map(str, digits + ([carry] if carry else [])))
        place = _PLACES[i] if i < len(_PLACES) else f"column {i + 1}"
        carry_out = f", carry {total // 10}" if total >= 10 else ""
        lines.append(f"{place}: {terms} = {total}, write {total % 10}{carry_out}")
        carry = total // 10
    if carry:
        lines.append(f"{_PLACES[len(lines)] if len(lines) < len(_PLACES) else 'last'}: write the carry {carry}")
    return lines


def _evaluate(node: ast.AST, steps: list[str]) -> int:
    """Post-order evaluation (the order precedence and parentheses impose), one step per operation."""
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, steps)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left, right = _evaluate(node.left, steps), _evaluate(node.right, steps)
        op = _AST_OPS[type(node.op)]
        result = _AST_FNS[op](left, right)
        if op == "+" and min(left, right) >= 10:  # two numbers of several digits: by columns
            steps.extend(column_addition(left, right))
        steps.append(f"{left} {op} {right} = {result}")
        return result
    raise ValueError(f"unsupported expression node {ast.dump(node)}")


def _arithmetic(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    """Parentheses first, then * and /, then + and -, each left to right (reasoning-gym's `/` is floor division)."""
    steps: list[str] = []
    _evaluate(ast.parse(meta["expression"].replace("/", "//"), mode="eval").body, steps)
    return Reasoning(("Parentheses come first; then multiplication and division; then addition and subtraction, "
                      "each from left to right.",), tuple(steps))


def _legs(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    animals = sorted(meta["animals"].items(), key=lambda a: row["inputs"].find(f" {a[0]}"))
    totals = [count * LEGS[name] for name, count in animals]
    return Reasoning(
        tuple(f"{_article(name).capitalize()} has {LEGS[name]} legs." for name, _ in animals),
        (*(f"{name} ({count}): {count} * {LEGS[name]} = {total} legs" for (name, count), total in zip(animals, totals)),
         f"Total: {' + '.join(map(str, totals))} = {sum(totals)} legs"))


def _time_intervals(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    start, end = (datetime.fromisoformat(meta[k]) for k in ("start_time", "end_time"))
    if start.date() != end.date() or start.microsecond or end.microsecond:
        raise ValueError("only same-day, whole-second intervals")
    seconds = meta.get("expected_format") != "HH:MM"
    steps = []
    for moment in (start, end):
        terms = f"{moment.hour} * 3600 + {moment.minute} * 60" + (f" + {moment.second}" if moment.second else "")
        clock = moment.strftime("%H:%M:%S" if seconds else "%H:%M")
        steps.append(f"{clock} is {terms} = {moment.hour * 3600 + moment.minute * 60 + moment.second} seconds "
                     "after midnight")
    a, b = (m.hour * 3600 + m.minute * 60 + m.second for m in (start, end))
    h, m, s = (b - a) // 3600, (b - a) % 3600 // 60, (b - a) % 60
    steps += [f"{b} - {a} = {b - a} seconds",
              f"{b - a} seconds = {h} hours, {m} minutes and {s} seconds, that is "
              + (f"{h:02d}:{m:02d}:{s:02d}" if seconds else f"{h:02d}:{m:02d}")]
    return Reasoning(("An hour has 3600 seconds and a minute has 60 seconds.",
                      "A duration is the end time minus the start time."), tuple(steps))


def _gsm(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    steps = [line.strip() for line in meta["answer_cot"].splitlines() if line.strip() and not line.startswith("####")]
    given = [s for s in _SENTENCE_END.split(row["inputs"]) if re.search(r"\d", s) and "?" not in s]
    facts = tuple(f"Given: {s}" for s in given) or ("Each quantity in the problem and how they relate.",)
    return Reasoning(facts, tuple(steps))


def _spell_backward(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    word = meta["word"]
    return Reasoning(("Spelling a word backward means writing its letters from the last one to the first.",),
                     (f"The letters of {word} are {', '.join(word)}", f"From last to first: {', '.join(word[::-1])}",
                      f"Joined together: {word[::-1]}"))


def _letter_counting(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    letter, words = meta["target_letter"], meta["span"]
    counts = [w.lower().count(letter) for w in words]
    return Reasoning((f'Count "{letter}" in every word, in upper and lower case alike.',),
                     (*(f'"{w}" has {c}' for w, c in zip(words, counts)),
                      f"{' + '.join(map(str, counts))} = {sum(counts)}"))


def _base_conversion(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    source, base, target, value = meta["source_repr"].lower(), meta["source_base"], meta["target_base"], meta[
        "decimal_value"]
    if base == 10:
        steps = [f"{source} is already in base 10"]
    else:
        terms = " + ".join(f"{_DIGITS.index(d)} * {base}^{p}" for p, d in reversed(list(enumerate(source[::-1]))))
        steps = [f"{source} in base {base} = {terms} = {value} in decimal"]
    n, digits = value, ""
    while True:
        n, remainder = divmod(n, target)
        steps.append(f"{n * target + remainder} / {target} = {n} remainder {remainder}")
        digits = _DIGITS[remainder] + digits
        if n == 0:
            break
    steps.append(f"Reading the remainders from last to first gives {digits}")
    return Reasoning((f"A base-{base} digit is worth its value times a power of {base}; digits above 9 are "
                      "letters (a = 10, b = 11, ...).",
                      f"To write a number in base {target}, divide it by {target} repeatedly and read the "
                      "remainders from last to first."), tuple(steps))


def _caesar(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    rotation, words = meta["rotation"], meta["cipher_text"].split()

    def back(text: str) -> str:
        return "".join(chr((ord(c) - 65 - rotation) % 26 + 65) if "A" <= c <= "Z" else c for c in text)

    first = words[0]
    return Reasoning(
        ("A Caesar cipher shifts every letter forward by the same number of places; decrypting shifts each "
         "letter back by that number, wrapping around from A to Z.",),
        (f"Trying shifts, moving {first} back by {rotation} gives the English word {back(first)}",
         "Letter by letter: " + ", ".join(f"{c} -> {back(c)}" for c in first[:4]),
         *(f"{w} -> {back(w)}" for w in words[1:]),
         f"The decrypted text is {back(meta['cipher_text'])}"))


def _weekday(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    day = date.fromisoformat(meta["target_date"])
    total = (day - _REFERENCE).days
    long = f"{day:%B} {day.day}, {day.year}"
    steps = []
    if day.year > _REFERENCE.year:
        years, leaps = day.year - 2000, sum(calendar.isleap(y) for y in range(2000, day.year))
        steps += [f"From January 1, 2000 to January 1, {day.year} is {years} years, {leaps} of them leap years: "
                  f"{years} * 365 + {leaps} = {years * 365 + leaps} days",
                  f"From January 1, {day.year} to {long} is {day.timetuple().tm_yday - 1} more days, {total} in all"]
    else:
        steps.append(f"From January 1, 2000 to {long} is {total} days")
    shift = total % 7
    steps += [f"{total} mod 7 = {shift}", f"Saturday plus {shift} days is {WEEKDAYS[(5 + shift) % 7]}"]
    return Reasoning(("January 1, 2000 was a Saturday.",
                      "Weekdays repeat every 7 days, so only the number of days modulo 7 matters."), tuple(steps))


def _family(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    story = [s.strip() for s in _SENTENCE_END.split(row["inputs"].split("\n\n")[0]) if s.strip()]
    links: dict[str, list[tuple[str, str]]] = {}  # person -> [(relative, "X is ... of Y")]
    couple: tuple[str, ...] = ()
    for sentence in story:
        if married := re.fullmatch(r"([\w-]+) is married to ([\w-]+)\.", sentence):
            couple = married.groups()
            links.setdefault(couple[0], []).append((couple[1], "is married to"))
            links.setdefault(couple[1], []).append((couple[0], "is married to"))
        elif kids := re.fullmatch(r"They have (?:a child|children) called (.+)\.", sentence):
            for child in re.split(r", | and ", kids.group(1)):
                for parent in couple:
                    links.setdefault(child, []).append((parent, "is a child of"))
                    links.setdefault(parent, []).append((child, "is a parent of"))
    first, second = meta["person1"], meta["person2"]
    path = _path(links, first, second)
    mentions = tuple(s for s in story if re.search(rf"\b({re.escape(first)}|{re.escape(second)})\b", s))
    return Reasoning(("A parent's father or mother is a grandparent; a parent's sibling is an aunt or uncle; "
                      "a spouse's parent is a father- or mother-in-law.",),
                     (*path, f"That makes {first} {second}'s {answer}"), mentions)


def _path(links: dict[str, list[tuple[str, str]]], start: str, goal: str) -> list[str]:
    """The chain of family links from start to goal (breadth first)."""
    previous: dict[str, tuple[str, str]] = {start: ("", "")}
    queue = [start]
    for person in queue:
        for relative, link in links.get(person, []):
            if relative not in previous:
                previous[relative] = (person, link)
                queue.append(relative)
    if goal not in previous:
        raise ValueError(f"no family link from {start} to {goal}")
    chain, person = [], goal
    while person != start:
        before, link = previous[person]
        chain.append(f"{before} {link} {person}")
        person = before
    return chain[::-1]


def _needle(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    wanted = re.fullmatch(r"Who (.+?)\?.*", meta["question"]).group(1)
    statements = _SENTENCE_END.split(row["inputs"].splitlines()[0].strip())
    quoted = tuple(s for s in statements if wanted in s and s.startswith(answer)) or tuple(
        s for s in statements if wanted in s)
    return Reasoning(("Each statement names one person and one thing they feel about; the answer is the person "
                      "in the statement that matches the question.",),
                     (f"The question asks who {wanted}",
                      f'The only statement with "{wanted}" is about {answer}'), quoted)


@dataclass(frozen=True)
class _Claim:
    quantifier: str  # All | No | Some | Some-not
    subject: str
    predicate: str


def _claim(text: str) -> _Claim:
    q, subject, negated, predicate = re.fullmatch(r"(All|No|Some) (.+?) are (not )?(.+?)\.?", text.strip()).groups()
    return _Claim("Some-not" if negated else q, subject, predicate)


def _form(quantifier: str, subject: str, predicate: str) -> str:
    if quantifier == "Some-not":
        return f"Some {subject} are not {predicate}"
    return f"{quantifier} {subject} are {predicate}"


_NEGATIVE, _PARTICULAR = {"No", "Some-not"}, {"Some", "Some-not"}
_DISTRIBUTES = {"All": (True, False), "No": (True, True), "Some": (False, False), "Some-not": (False, True)}
_CONVERSIONS = {("No", "No"): "'No A are B' can be reversed: no B are A either",
                ("All", "Some"): "'All A are B' means that some B are A",
                ("Some", "Some"): "'Some A are B' can be reversed: some B are A"}


def _syllogism_flaw(one: _Claim, two: _Claim, conclusion: _Claim) -> str | None:
    """The classical rule a two-premise syllogism breaks, if any."""
    terms_one, terms_two = {one.subject, one.predicate}, {two.subject, two.predicate}
    middle = terms_one & terms_two
    if len(middle) != 1 or {conclusion.subject, conclusion.predicate} != (terms_one | terms_two) - middle:
        return "the premises do not link the conclusion's terms through one shared middle term"
    major, minor = (one, two) if conclusion.predicate in terms_one else (two, one)
    quantifiers = {one.quantifier, two.quantifier}
    if one.quantifier in _NEGATIVE and two.quantifier in _NEGATIVE:
        return "two negative premises prove nothing"
    if one.quantifier in _PARTICULAR and two.quantifier in _PARTICULAR:
        return "two particular premises prove nothing"
    if conclusion.quantifier in ("All", "No") and quantifiers & _PARTICULAR:
        return "a universal conclusion cannot follow from a particular premise"
    if (conclusion.quantifier in _NEGATIVE) != bool(quantifiers & _NEGATIVE):
        return "a conclusion is negative exactly when one premise is negative"
    for at, term, premise in ((0, conclusion.subject, minor), (1, conclusion.predicate, major)):
        # (subject, predicate) distribution; the term sits in its premise as subject (0) or predicate (1)
        if _DISTRIBUTES[conclusion.quantifier][at] and not _DISTRIBUTES[premise.quantifier][premise.subject != term]:
            return f"'{term}' covers all of its class in the conclusion but not in its premise"
    return None


def _syllogism(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    premises, conclusion = (meta["premise1"], meta["premise2"]), meta["conclusion"]
    one, two, claim = _claim(premises[0]), _claim(premises[1]), _claim(conclusion)
    valid = bool(meta["is_valid"])
    if meta.get("type") == "inversion":
        n = int(meta.get("selected_premise", 1))
        source = (one, two)[n - 1]
        rule = _CONVERSIONS.get((source.quantifier, claim.quantifier),
                                f"'{_form(source.quantifier, 'A', 'B')}' does not tell us that "
                                f"'{_form(claim.quantifier, 'B', 'A')}'")
        steps = [f'The conclusion "{conclusion}" swaps the two terms of premise {n}: "{premises[n - 1]}"', rule]
    else:
        middle = sorted({one.subject, one.predicate} & {two.subject, two.predicate})
        flaw = _syllogism_flaw(one, two, claim)
        steps = [f"The middle term shared by both premises is {' and '.join(middle) or 'missing'}",
                 f'The conclusion "{conclusion}" links {claim.subject} and {claim.predicate}',
                 (flaw if not valid and flaw else "no rule of the syllogism is broken" if valid
                  else "the premises leave room for the conclusion to be false")]
    steps.append("Therefore the conclusion follows" if valid else "Therefore the conclusion does not follow")
    return Reasoning(("A conclusion follows only if it must be true whenever the premises are true.",
                      "'No A are B' and 'Some A are B' can be reversed; 'All A are B' gives only 'Some B are A'.",
                      "Two negative or two particular premises prove nothing, and a negative premise needs a "
                      "negative conclusion."), tuple(steps), premises)


def _shell_game(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    """One fixed-width step per swap: the two cups, then where the ball is after it ("AB>C")."""
    return Reasoning(("Each swap exchanges the two cups it names; the ball moves only when its cup is one of them.",),
                     tuple(f"{swap}>{cup}" for swap, cup in zip(meta["swaps"], meta["path"], strict=True)), trace=True)


def _coin_moves(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    """One step per move: the move, then the side up after it ("FT"), as wide as the move's "F, " in the prompt.

    Copying the move into the step keeps both operands of the next step local (the side and the move
    just before it): the side alone per step ("T") was not learnt within tiny's budget (probe: 52% on
    10 moves, chance, against 100% for the shell game's "AB>C" steps).
    """
    steps = tuple(f"{move}{side}" for move, side in zip(meta["moves"], meta["sides"], strict=True))
    return Reasoning(("F turns the coin over and K leaves it as it is, so each move decides the side from the one "
                      "before it.",), steps, trace=True)


def _max_of_two(row: dict[str, Any], meta: dict[str, Any], answer: str) -> Reasoning:
    a, b = str(meta["a"]), str(meta["b"])
    place = next(i for i in range(len(a)) if a[i] != b[i])  # same digit count: the first digit that differs
    return Reasoning(("Of two numbers with the same number of digits, the larger one has the larger digit at the "
                      "first place where they differ.",),
                     (f"{a} and {b} first differ at digit {place + 1}: {a[place]} against {b[place]}",
                      f"{max(a[place], b[place])} is the larger digit, so {max(int(a), int(b))} is the larger number"))


def generic(row: dict[str, Any]) -> Reasoning:
    """Rows without usable metadata (FLAN rows, unknown families)."""
    return Reasoning(("Read the instruction and the input closely; the answer must satisfy the instruction.",),
                     (f"The task asks: {task_line(row['inputs'])}",
                      "Checking the input against what it asks settles the answer"))


_FAMILIES: dict[str, Callable[[dict[str, Any], dict[str, Any], str], Reasoning]] = {
    "basic_arithmetic": _arithmetic, "leg_counting": _legs, "time_intervals": _time_intervals, "gsm_symbolic": _gsm,
    "spell_backward": _spell_backward, "letter_counting": _letter_counting, "base_conversion": _base_conversion,
    "caesar_cipher": _caesar, "calendar_weekday_mc": _weekday, "family_relationships_mc": _family,
    "needle_haystack": _needle, "syllogism": _syllogism,
    "shell_game": _shell_game, "coin_moves": _coin_moves, "max_of_two": _max_of_two,
}


def reason(row: dict[str, Any], answer: str) -> Reasoning:
    """Facts, steps and evidence for a row; the generic ones when its metadata does not fit."""
    family = _FAMILIES.get(row["task_name"])
    if family is None:
        return generic(row)
    try:
        return family(row, json.loads(row.get("metadata") or "{}"), answer)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, ArithmeticError) as error:
        log.debug("oracle: generic reasoning for %s (%s)", row["id"], error)
        return generic(row)
