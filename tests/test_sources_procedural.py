"""The procedural suite: FLAN-v2-shaped, deterministic, gold-correct, disjoint splits."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import reasoning_gym

from orca_core.answers import is_correct
from orca_core.sources import build_sources
from orca_core.sources.procedural import generate_suite
from orca_core.sources.schema import FLAN_COLUMNS, SOURCE_SCHEMA, normalize_question, parse_options
from orca_core.sources.suite import SUITE


@pytest.fixture(scope="module")
def suite_rows():
    return generate_suite(None, 40, 15, seed=0)


def test_suite_shape_matches_flan_v2():
    by_sub = Counter(f.sub_collection for f in SUITE.values())
    assert len(SUITE) >= 8 and set(by_sub) == {"cot", "niv2", "t0", "flan2021"}
    assert min(by_sub.values()) >= 2
    # Different strategies suit different families (what Orca 2 teaches).
    assert len({f.strategy for f in SUITE.values()}) >= 5
    assert all(f.choices for f in SUITE.values() if f.sub_collection == "t0")


def test_rows_carry_flan_columns_gold_and_metadata(suite_rows):
    train, heldout, stats = suite_rows
    assert len(train) == 40 * len(SUITE) and len(heldout) == 15 * len(SUITE)
    assert Counter(r["task_name"] for r in train) == {name: 40 for name in SUITE}
    for row in train + heldout:
        assert set(SOURCE_SCHEMA.names) == set(row)
        assert all(row[c] for c in FLAN_COLUMNS)
        assert row["task_source"] in {"CoT", "NIv2", "T0", "Flan2021"}
        assert row["answer"] == row["targets"]
        if row["multiple_choice"]:
            assert row["template_type"] == "zs_opt"
            assert row["answer"] in row["options"] and parse_options(row["inputs"]) == row["options"]
        else:
            assert row["template_type"] == "zs_noopt" and row["options"] == []
    assert stats["syllogism"]["strategy"] == "explain-then-answer"


def test_gold_answers_score_full_marks_with_reasoning_gym_scorers(suite_rows):
    train, heldout, _ = suite_rows
    for row in train + heldout:
        if row["multiple_choice"]:
            continue
        score = reasoning_gym.get_score_answer_fn(row["generator"])
        entry = {"question": row["inputs"], "answer": row["answer"], "metadata": json.loads(row["metadata"])}
        assert score(row["answer"], entry) == 1.0, row["task_name"]
        assert score("definitely wrong", entry) < 1.0, row["task_name"]


def test_arithmetic_gold_follows_operator_precedence(suite_rows):
    train, heldout, _ = suite_rows
    rows = [r for r in train + heldout if r["task_name"] == "basic_arithmetic"]
    assert rows
    for row in rows:
        expression = json.loads(row["metadata"])["expression"]
        assert int(row["answer"]) == eval(expression.replace("/", "//")), expression  # noqa: S307 (generated digits and + - * only)


def test_splits_are_disjoint_and_questions_unique(suite_rows):
    train, heldout, _ = suite_rows
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    questions = lambda rows: {(r["task_name"], normalize_question(r["inputs"].split("\n\nOPTIONS:")[0])) for r in rows}  # noqa: E731
    assert not questions(train) & questions(heldout)
    assert len({r["id"] for r in train}) == len(train) and len({r["id"] for r in heldout}) == len(heldout)


def test_small_question_spaces_still_give_disjoint_splits():
    # Two-digit sums over + only: few distinct questions, so the split check really bites.
    options = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"]}}
    train, heldout, stats = generate_suite(["basic_arithmetic"], 40, 20, seed=3, overrides=options)
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert stats["basic_arithmetic"]["skipped_repeats"] > 0


def test_deterministic_by_seed(suite_rows):
    again, _, _ = generate_suite(None, 40, 15, seed=0)
    assert again == suite_rows[0]
    other, _, _ = generate_suite(None, 40, 15, seed=1)
    assert [r["id"] for r in other] != [r["id"] for r in again]


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown families.*nope"):
        generate_suite(["nope"], 1, 1, seed=0)
    with pytest.raises(ValueError, match="spell_backward.*yields only"):
        generate_suite(["spell_backward"], 5000, 0, seed=0, overrides={"spell_backward": {"max_word_len": 3}})


def test_build_writes_parquet_with_counts(smoke, tmp_path):
    rows, stats = build_sources(smoke.sources, tmp_path)
    train, heldout = pq.read_table(tmp_path / "train.parquet"), pq.read_table(tmp_path / "heldout.parquet")
    assert rows == {"train": train.num_rows, "heldout": heldout.num_rows} == {"train": 160, "heldout": 40}
    assert train.schema.equals(SOURCE_SCHEMA)
    assert stats["train_by_sub_collection"] == {"cot": 40, "flan2021": 40, "niv2": 40, "t0": 40}
    assert stats["heldout_by_task"]["syllogism"] == 5
    assert set(train["split"].to_pylist()) == {"train"} and set(heldout["split"].to_pylist()) == {"heldout"}


# -- our own serial generators (orca_core/sources/serial.py) ---------------------------------------
SERIAL = ("shell_game", "coin_moves", "max_of_two")


def test_serial_generators_are_seeded_golden_and_fixed_width():
    shell = reasoning_gym.create_dataset("shell_game", size=3, seed=5)
    assert shell[0]["question"] == ("Cups A-E; a ball is under cup E. Swaps: C-E, E-A, D-B, A-B, A-C. "
                                    "Which cup is the ball under?")
    assert shell[0]["answer"] == "A" and shell[0]["metadata"]["path"] == ["C", "C", "C", "C", "A"]
    coin = reasoning_gym.create_dataset("coin_moves", size=3, seed=5)
    assert coin[0]["question"] == ("A coin shows T. Moves (F flips it, K keeps it): "
                                   "K, F, K, F, F, F, F, K, K, F. Which side is up?")
    assert coin[0]["answer"] == "T"  # six flips from T
    largest = reasoning_gym.create_dataset("max_of_two", size=1, seed=5)[0]
    assert largest["question"] == "Which number is larger, 737 or 361?"
    for name in SERIAL:  # same seed, same items; every question of a family as wide as the others
        items = list(reasoning_gym.create_dataset(name, size=200, seed=11))
        assert items == list(reasoning_gym.create_dataset(name, size=200, seed=11))
        assert len({len(item["question"]) for item in items}) == 1, name


def test_serial_golds_replay_the_moves(suite_rows):
    train, heldout, _ = suite_rows
    rows = {name: [r for r in train + heldout if r["task_name"] == name] for name in SERIAL}
    for row in rows["shell_game"]:
        meta = json.loads(row["metadata"])
        cup = meta["start"]
        for a, b in meta["swaps"]:
            cup = {a: b, b: a}.get(cup, cup)
        assert row["answer"] == cup and len(meta["swaps"]) == 5
    for row in rows["coin_moves"]:
        meta = json.loads(row["metadata"])
        flipped = {"H": "T", "T": "H"}[meta["start"]]
        assert row["answer"] == (meta["start"] if meta["moves"].count("F") % 2 == 0 else flipped)
    for row in rows["max_of_two"]:
        meta = json.loads(row["metadata"])
        assert row["answer"] == str(max(meta["a"], meta["b"])) and meta["a"] != meta["b"]
    row = rows["coin_moves"][0]  # evaluation finds our scorers by generator name, like reasoning-gym's own
    other = {"H": "T", "T": "H"}[row["answer"]]
    assert is_correct(row["answer"], row["answer"], generator="coin_moves", metadata=row["metadata"])
    assert not is_correct(other, row["answer"], generator="coin_moves", metadata=row["metadata"])


def test_serial_options_are_checked_by_name():
    with pytest.raises(ValueError, match="shell_game: cups must be 2..8, got 9"):
        reasoning_gym.create_dataset("shell_game", size=1, seed=0, cups=9)
    with pytest.raises(ValueError, match="coin_moves: moves must be >= 1"):
        generate_suite(["coin_moves"], 5, 5, seed=0, overrides={"coin_moves": {"moves": 0}})
    # 2 sides x 2^3 move strings: 16 questions, fewer than asked for
    with pytest.raises(ValueError, match="coin_moves.*yields only"):
        generate_suite(["coin_moves"], 20, 5, seed=0, overrides={"coin_moves": {"moves": 3}})
