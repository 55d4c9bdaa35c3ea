"""Extraction and scoring checked on the real benchmark data (`make bench-data`).

Scoring the gold itself as the model's output must give 100 %; a shuffled gold
about 0 %; a constant option letter exactly that letter's base rate. A
benchmark whose loader or extraction is off shows here, on real rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from orca_core.eval.benchmarks import BenchmarkSpec, Example, load_benchmark
from orca_core.eval.score import score

BENCH_DATA = Path(__file__).resolve().parents[1] / "bench-data"
MC_BENCHMARKS = [("arc-challenge", "arc-challenge"), ("mmlu", "mmlu"), ("crass", "crass/task.json"), ("bbh", "bbh")]


@pytest.fixture(scope="module")
def bench_data() -> Path:
    if not (BENCH_DATA / "SOURCES.json").is_file():
        pytest.fail("bench-data/ is missing: run `make bench-data` (make test does)")
    return BENCH_DATA


def _rates(examples: list[Example], outputs: list[str]) -> tuple[float, float]:
    scored = [score(e, o) for e, o in zip(examples, outputs, strict=True)]
    return float(np.mean([s.correct_strict for s in scored])), float(np.mean([s.correct_flexible for s in scored]))


def test_gsm8k_gold_rationales_score_100_percent_strict_and_flexible_and_shuffled_about_0(bench_data):
    examples = load_benchmark(BenchmarkSpec(name="gsm8k", path=str(bench_data / "gsm8k")))
    rows = [json.loads(line) for line in (bench_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(examples) == len(rows) == 1319
    assert [e.prompt for e in examples] == [r["question"] for r in rows]  # native order: rationale i is example i
    rationales = [r["answer"] for r in rows]  # "...<<9*2=18>>18 every day...\n#### 18"
    assert _rates(examples, rationales) == (1.0, 1.0)
    shuffled = rationales[1:] + rationales[:1]
    strict, flexible = _rates(examples, shuffled)
    assert strict < 0.02 and flexible < 0.02  # a neighbour's answer is right only by coincidence


def test_gsm8k_strict_and_flexible_differ_as_in_lm_eval(bench_data):
    """The rationale without its '#### N' line: strict finds nothing, flexible still takes the last number."""
    examples = load_benchmark(BenchmarkSpec(name="gsm8k", path=str(bench_data / "gsm8k"), limit=200))
    rows = [json.loads(line) for line in (bench_data / "gsm8k" / "test.jsonl").read_text().splitlines()][:200]
    bare = [r["answer"].rsplit("####", 1)[0].strip() for r in rows]
    strict, flexible = _rates(examples, bare)
    assert strict == 0.0 and flexible > 0.9


@pytest.mark.parametrize("name, path", MC_BENCHMARKS)
def test_mc_gold_letters_score_100_percent_and_a_constant_letter_its_base_rate(bench_data, name, path):
    examples = [e for e in load_benchmark(BenchmarkSpec(name=name, path=str(bench_data / path))) if e.kind == "mc"]
    assert len(examples) > 40
    assert _rates(examples, [e.gold for e in examples]) == (1.0, 1.0)
    assert _rates(examples, [f"The answer is ({e.gold})." for e in examples]) == (1.0, 1.0)
    base_rate = float(np.mean([e.gold == "A" for e in examples]))
    assert 0.0 < base_rate < 0.9
    assert _rates(examples, ["A"] * len(examples)) == (base_rate, base_rate)


def test_bbh_and_drop_text_golds_score_100_percent(bench_data):
    bbh = [e for e in load_benchmark(BenchmarkSpec(name="bbh", path=str(bench_data / "bbh"))) if e.kind != "mc"]
    drop = load_benchmark(BenchmarkSpec(name="drop", path=str(bench_data / "drop")))
    for examples in (bbh, drop):
        assert _rates(examples, [f"So the answer is {e.gold}." for e in examples]) == (1.0, 1.0)
        assert _rates(examples, [e.gold for e in examples])[1] == 1.0  # the bare answer: flexible
    aliased = [e for e in drop if e.aliases]
    assert aliased and _rates(aliased, [f"The answer is {e.aliases[0]}." for e in aliased])[0] == 1.0


def _names_an_option(text: str, options: tuple[str, ...]) -> bool:
    return any(o.strip().casefold() in text.casefold() for o in options if o.strip())  # even inside a word


def _no_answer_outputs(example: Example) -> list[str]:
    """Outputs that name no option: the question's own sentences, alone and inside rambling that opens
    sentences with "A" and "I" (the article and the pronoun, not option letters)."""
    stem = example.prompt.rpartition("\nOptions:\n")[0]
    sentences = [s for s in re.split(r"(?<=[.?!])\s+|\n+", stem) if s.strip()]
    kept = " ".join(s for s in sentences if not _names_an_option(s, example.options))
    ramblings = [
        f"{kept}",
        f"A careful reading comes first.\n{kept}\nA question like this needs care.",
        f"I read the question twice. {kept}\nI think it is tricky, and I am not sure.",
    ]
    return [r for r in ramblings if r.strip() and not _names_an_option(r, example.options)]


@pytest.mark.parametrize("name, path", MC_BENCHMARKS)
def test_mc_outputs_without_an_answer_extract_no_option(bench_data, name, path):
    """The article "A" and the pronoun "I" opening a sentence are not option letters (issue 12)."""
    limit = 40 if name == "mmlu" else None  # per subject: 2,280 of its 14,042 questions keep the test fast
    spec = BenchmarkSpec(name=name, path=str(bench_data / path), limit=limit)
    examples = [e for e in load_benchmark(spec) if e.kind == "mc"]
    outputs = [(e, o) for e in examples for o in _no_answer_outputs(e)]
    assert len(outputs) > 2 * len(examples)
    extracted = [(e.id, o) for e, o in outputs if score(e, o).flexible is not None]
    assert len(extracted) <= 0.005 * len(outputs), (len(extracted), len(outputs), extracted[:5])
    # (measured on all rows: ARC, CRASS, BBH 0 %; MMLU 0.07 %, questions that label alleles "(D)" or "(B)")
    endings = ["\nSo I pick option {}.", "\n**{}**", "\nThe answer is {} because the rest fail."]
    answered = [(e, o + endings[i % 3].format(e.gold)) for i, (e, o) in enumerate(outputs)]
    assert all(score(e, o).correct_flexible for e, o in answered)
