"""Orca 2's sources: few-shot FLAN prompts, math rows, and the mixture the orca2 stage draws."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orca_core.answers import is_correct
from orca_core.generate import orca1_fanout, orca2_fanout
from orca_core.recipe import load_recipe
from orca_core.recipe.models import FewShotSources, FlanSources, MathSources, Orca2Mixture, SourcesConfig
from orca_core.sources import TRAIN_FILE, build_sources, fewshot, flan, mixture
from orca_core.sources import math as math_source
from orca_core.sources.schema import SOURCE_SCHEMA, normalize_question, row_id
from orca_core.steps import SOURCES, components

ALL = {"cot": None, "niv2": None, "flan2021": None, "t0": None, "dialog": 0}
TASKS = {"niv2_task_a": ("NIv2", 8), "niv2_task_b": ("NIv2", 6), "flan_task_c": ("Flan2021", 10)}


def _pool(path: Path, tasks: dict[str, tuple[str, int]] = TASKS) -> FlanSources:
    rows = [{"inputs": f"{task} question {i}?", "targets": f"{task} answer {i}", "task_source": source,
             "task_name": task, "template_type": "zs_noopt"}
            for task, (source, n) in tasks.items() for i in range(n)]
    rows.append({"inputs": "a dialog turn", "targets": "ok", "task_source": "Dialog", "task_name": "wow",
                 "template_type": "zs_noopt"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return FlanSources(paths=[str(path)], counts=ALL)


def _gsm8k(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GSM8K_LINES = [
    json.dumps({"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7\n#### 7"}),
    "",  # blank lines are skipped
    json.dumps({"question": "A car costs 1,000 dollars, a bike 200. Total?", "answer": "1000 + 200 = 1200\n#### 1,200"}),
]


# -- few-shot ------------------------------------------------------------------------------------
def test_few_shot_prompts_are_shots_of_the_same_task_never_the_target_nor_held_out(tmp_path):
    flan_cfg = _pool(tmp_path / "flan.parquet")
    collection = flan.read_collection(flan_cfg)
    held_out = {normalize_question("niv2_task_a question 0?")}
    cfg = FewShotSources(count=12)
    table, stats = fewshot.build_few_shot(collection, cfg, flan_cfg, seed=0, exclude=held_out)
    assert table.schema.equals(SOURCE_SCHEMA) and table.num_rows == 12 == stats["built"]
    pool = {row_id(r["task_name"], r["inputs"]): r for r in collection.to_pylist()}
    for row in table.to_pylist():
        meta = json.loads(row["metadata"])
        target, shots = pool[meta["target_id"]], [pool[i] for i in meta["shot_ids"]]
        assert 3 <= len(shots) <= 5 and meta["target_id"] not in meta["shot_ids"]
        assert {s["task_name"] for s in shots} == {target["task_name"]} == {row["task_name"]}
        assert len({s["inputs"] for s in shots}) == len(shots)  # no shot twice
        expected = "".join(f"Q: {s['inputs']}\nA: {s['targets']}\n\n" for s in shots) + f"Q: {target['inputs']}\nA:"
        assert row["inputs"] == expected and row["answer"] == row["targets"] == target["targets"]
        assert (row["source"], row["template_type"], row["sub_collection"]) == \
            ("flan_few_shot", "fs_noopt", "niv2" if target["task_source"] == "NIv2" else "flan2021")
        assert "niv2_task_a question 0?" not in row["inputs"]  # held out: neither shot nor target
        assert row["task_name"] != "wow"  # Dialog is never used
    # A task uniformly, then a target (golden for seed 0), and shot counts spread over 3-5.
    assert Counter(table["task_name"].to_pylist()) == {"niv2_task_a": 4, "niv2_task_b": 5, "flan_task_c": 3}
    assert stats["by_shots"] == {3: 2, 4: 4, 5: 6}
    again, _ = fewshot.build_few_shot(collection, cfg, flan_cfg, seed=0, exclude=held_out)
    other, _ = fewshot.build_few_shot(collection, cfg, flan_cfg, seed=1, exclude=held_out)
    assert again.equals(table) and not other.equals(table)


def test_a_task_too_small_for_the_shots_is_an_error_naming_it_or_skipped(tmp_path):
    flan_cfg = _pool(tmp_path / "flan.parquet", {**TASKS, "tiny_task": ("Flan2021", 3)})
    collection = flan.read_collection(flan_cfg)
    with pytest.raises(ValueError, match=r"sources.few_shot: 1 task.*\(4 needed\): 'tiny_task' \(3\)"):
        fewshot.build_few_shot(collection, FewShotSources(count=5), flan_cfg, seed=0)
    table, stats = fewshot.build_few_shot(collection, FewShotSources(count=5, small_tasks="skip"), flan_cfg, seed=0)
    assert table.num_rows == 5 and "tiny_task" not in table["task_name"].to_pylist()
    assert stats["skipped_tasks"] == ["tiny_task"]
    # Two shots fit it: the shots then never include the target.
    table, _ = fewshot.build_few_shot(collection, FewShotSources(count=40, min_shots=2, max_shots=2), flan_cfg, seed=0)
    tiny = [r for r in table.to_pylist() if r["task_name"] == "tiny_task"]
    assert len(tiny) == 3 and all(r["inputs"].count("Q: ") == 3 for r in tiny)


# -- math --------------------------------------------------------------------------------------
def test_math_rows_from_reasoning_gym_are_deterministic_unique_and_scored_by_their_generator():
    cfg = MathSources(generators={"chain_sum": 6, "gcd": 4}, generator_options={"gcd": {"min_value": 2, "max_value": 50}})
    rows, stats = math_source.build_math(cfg, seed=0)
    assert Counter(r["task_name"] for r in rows) == {"math/chain_sum": 6, "math/gcd": 4}
    assert stats["math/gcd"]["rows"] == 4
    assert {(r["source"], r["sub_collection"], r["split"]) for r in rows} == {("math", "math", "train")}
    assert len({r["id"] for r in rows}) == 10
    for r in rows:  # the gold is what the generator's own scorer accepts
        assert is_correct(r["answer"], r["answer"], generator=r["generator"], metadata=r["metadata"], question=r["inputs"])
    assert rows == math_source.build_math(cfg, seed=0)[0] != math_source.build_math(cfg, seed=1)[0]
    first = rows[0]["inputs"]
    held_out, _ = math_source.build_math(cfg, seed=0, exclude={normalize_question(first)})
    assert first not in [r["inputs"] for r in held_out] and len(held_out) == 10


def test_gsm8k_files_give_the_gold_after_the_marks_and_a_bad_line_names_file_and_line(tmp_path):
    path = _gsm8k(tmp_path / "gsm8k.jsonl", GSM8K_LINES)
    rows, stats = math_source.build_math(MathSources(files={"gsm8k": [str(tmp_path / "gsm*.jsonl")]}), seed=0)
    assert [r["answer"] for r in rows] == ["7", "1200"] and stats["math/gsm8k"] == {"rows": 2, "files": 1, "skipped_repeats": 0}
    assert rows[0]["targets"] == "3 + 4 = 7\n#### 7" and rows[0]["task_name"] == "math/gsm8k"
    assert math_source.gsm8k_gold("x #### y #### -3.5") == "-3.5"
    for bad, why in (('{"question": "q", "answer": "no marks"}', "no final answer after '####'"),
                     ('{"question": "q"', "not JSON"), ('["q", "a"]', "string fields 'question' and 'answer'")):
        _gsm8k(path, [*GSM8K_LINES, bad])
        with pytest.raises(ValueError, match=rf"sources.math.files.gsm8k: {path}, line 4: .*{why}"):
            math_source.build_math(MathSources(files={"gsm8k": [str(path)]}), seed=0)
    with pytest.raises(FileNotFoundError, match="sources.math.files.gsm8k: no file matches"):
        math_source.build_math(MathSources(files={"gsm8k": [str(tmp_path / "none*.jsonl")]}), seed=0)


# -- the mixture ------------------------------------------------------------------------------
def _orca2_sources(tmp_path: Path) -> SourcesConfig:
    return SourcesConfig(
        seed=0, flan=_pool(tmp_path / "flan.parquet"), few_shot=FewShotSources(count=6),
        math=MathSources(generators={"chain_sum": 5}, files={"gsm8k": [str(_gsm8k(tmp_path / "g.jsonl", GSM8K_LINES))]}),
        mixture=Orca2Mixture(flan=9, flan_few_shot=None, math=4))


def test_the_mixture_counts_are_in_the_stats_and_the_orca2_stage_draws_exactly_them(tmp_path):
    out = tmp_path / "sources"
    out.mkdir()
    counts, stats = build_sources(_orca2_sources(tmp_path), out)
    assert stats["train_by_source"] == {"flan": 24, "flan_few_shot": 6, "math": 7} and counts["train"] == 37
    assert {o: (s["pool"], s["target"], s["drawn"]) for o, s in stats["mixture"].items()} == {
        "procedural": (0, None, 0), "flan": (24, 9, 9), "flan_few_shot": (6, None, 6), "math": (7, 4, 4)}
    assert stats["mixture"]["flan"]["tasks"] == 3  # a task uniformly, then a row: every task is drawn
    drawn = pq.read_table(out / mixture.MIXTURE_FILE)
    assert Counter(drawn["source"].to_pylist()) == {"flan": 9, "flan_few_shot": 6, "math": 4}
    train_ids = pq.read_table(out / TRAIN_FILE)["id"].to_pylist()
    assert [train_ids[i] for i in drawn["row"].to_pylist()] == drawn["id"].to_pylist()  # places in train order
    assert mixture.drawn_mask(np.array([1, 5, 6, 9]), 4, 4).tolist() == [False, True, True, False]

    recipe = load_recipe("smoke").model_copy(update={"sources": _orca2_sources(tmp_path)})
    orca2 = [job.source_id for job in orca2_fanout(recipe, out, {"*": "direct-answer"}).jobs()]
    assert sorted(orca2) == sorted(drawn["id"].to_pylist())
    # Orca 1 keeps its FLAN sample: every zero-shot FLAN row, none of Orca 2's additions.
    train = pq.read_table(out / TRAIN_FILE).to_pylist()
    orca1 = {job.source_id for job in orca1_fanout(recipe, out).jobs()}
    assert orca1 == {r["id"] for r in train if r["source"] == "flan"}

    # Without a mixture there is no mixture file and the orca2 stage draws every train row.
    plain = tmp_path / "plain"
    plain.mkdir()
    build_sources(_orca2_sources(tmp_path).model_copy(update={"mixture": None}), plain)
    assert not (plain / mixture.MIXTURE_FILE).exists()
    assert len(list(orca2_fanout(recipe, plain, {"*": "direct-answer"}).jobs())) == 37


def test_the_new_fields_leave_existing_keys_alone_and_key_math_files_by_content(tmp_path):
    smoke = load_recipe("smoke")
    config = components(SOURCES, smoke)["config"]["sources"]
    assert not {"few_shot", "math", "mixture"} & set(config)  # absent: the key is the one from before
    (tmp_path / "a").mkdir()
    a = _gsm8k(tmp_path / "a" / "x.jsonl", GSM8K_LINES)
    b = _gsm8k(tmp_path / "b.jsonl", GSM8K_LINES)

    def sources_key(path):
        recipe = smoke.model_copy(update={"sources": smoke.sources.model_copy(
            update={"math": MathSources(files={"gsm8k": [str(path)]})})})
        return components(SOURCES, recipe)

    key_a, key_b = sources_key(a), sources_key(b)
    assert key_a == key_b and key_a["config"]["sources"]["math"]["files"] == ["gsm8k"]
    assert str(tmp_path) not in json.dumps(key_a)
    with pytest.raises(ValueError, match=r"mixture.math asks for rows but `math` is not set"):
        SourcesConfig(flan=_pool(tmp_path / "f.parquet"), mixture=Orca2Mixture(math=10))
