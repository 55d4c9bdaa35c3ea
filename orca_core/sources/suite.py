"""The procedural offline suite: reasoning-gym generators shaped like FLAN-v2.

Fifteen task families in four sub-collections, each chosen so that a
different Orca 2 strategy suits it: arithmetic and word problems want
step-by-step, passage questions want extract-generate, facts want recall,
trivial transforms want a direct answer. `strategy` is the suite's default
task -> strategy map; a recipe may override it (`prompts.strategies`).

Three families come from our own generators (`serial.py`), sized for tiny:
two inherently serial ones (shell_game, coin_moves) whose compact step trace
a 1M-parameter student learns while the direct answer stays near chance, and
max_of_two, a one-comparison task a direct answer solves best.

Unique questions per family with these settings (20,000 draws): most give
16K-20K; calendar_weekday_mc ~8.5K; caesar_cipher ~1.7K (its text corpus is
small). Asking for more fails with a clear error; widen the options instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
RELATIONSHIPS = (
    "mother", "father", "sister", "brother", "daughter", "son", "wife", "husband",
    "grandmother", "grandfather", "aunt", "uncle", "niece", "nephew", "mother-in-law", "father-in-law",
)


@dataclass(frozen=True)
class Family:
    name: str  # the task_name of its rows
    generator: str  # the reasoning-gym dataset
    sub_collection: str  # cot | niv2 | t0 | flan2021
    strategy: str  # the Orca 2 strategy that suits it
    options: dict[str, Any] = field(default_factory=dict)  # generator settings
    choices: tuple[str, ...] = ()  # non-empty: a multiple-choice task over this pool
    n_choices: int = 4


# FLAN-v2's spelling of each sub-collection in `task_source`.
TASK_SOURCE = {"cot": "CoT", "niv2": "NIv2", "t0": "T0", "flan2021": "Flan2021", "dialog": "Dialog"}

SUITE: dict[str, Family] = {
    family.name: family
    for family in [
        # CoT-like: math and word problems -> show the computation.
        # Parentheses stay on: reasoning-gym evaluates that form with real precedence, while its
        # parenthesis-free form computes strictly left to right (77 - 63 * 76 -> 1064), a wrong gold.
        Family("basic_arithmetic", "basic_arithmetic", "cot", "step-by-step",
               {"min_terms": 2, "max_terms": 4, "max_digits": 2, "operators": ("+", "-", "*"), "allow_negation": False}),
        Family("leg_counting", "leg_counting", "cot", "recall-reason-generate",
               {"min_animals": 2, "max_animals": 4, "max_instances": 9}),
        Family("time_intervals", "time_intervals", "cot", "step-by-step", {"task_types": ["time"]}),
        Family("gsm_symbolic", "gsm_symbolic", "cot", "step-by-step"),
        # NIv2-like: an instruction (task definition) plus an input.
        Family("spell_backward", "spell_backward", "niv2", "direct-answer", {"max_word_len": 7}),
        Family("letter_counting", "letter_counting", "niv2", "step-by-step", {"min_words": 3, "max_words": 6}),
        Family("base_conversion", "base_conversion", "niv2", "recall-then-generate", {"max_value": 255}),
        Family("caesar_cipher", "caesar_cipher", "niv2", "step-by-step", {"min_words": 2, "max_words": 4}),
        # T0-like: multiple choice.
        Family("calendar_weekday_mc", "calendar_arithmetic", "t0", "explain-then-answer",
               {"tasks": ["weekday_of_date"]}, choices=WEEKDAYS),
        Family("family_relationships_mc", "family_relationships", "t0", "extract-generate",
               {"max_family_size": 6}, choices=RELATIONSHIPS),
        # Flan2021-like: extraction from a passage, classification.
        Family("needle_haystack", "needle_haystack", "flan2021", "extract-generate", {"max_num_statements": 12}),
        Family("syllogism", "syllogism", "flan2021", "explain-then-answer", choices=("Yes", "No"), n_choices=2),
        # Inherently serial (our generators): one fixed-width step per state change. CoT, so Orca 1
        # explains them in its step-by-step messages (#6, #11, #16).
        Family("shell_game", "shell_game", "cot", "step-by-step", {"cups": 5, "swaps": 5}),
        Family("coin_moves", "coin_moves", "cot", "step-by-step", {"moves": 10}),
        # One comparison: answered directly. Flan 2021, whose Orca 1 messages (#3, #4, #7) all ask for
        # long explanations, the contrast Orca 2's per-task strategy is about.
        Family("max_of_two", "max_of_two", "flan2021", "direct-answer", {"digits": 3}),
    ]
}
