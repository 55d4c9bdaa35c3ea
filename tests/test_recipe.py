"""Recipes: the shipped ones validate; bad ones fail before any work, naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from orca_core.recipe import RecipeError, load_recipe, recipe_hash
from orca_core.recipe.load import apply_override, parse_field_path


def test_shipped_recipes_validate_with_their_values():
    tiny, smoke, prod = load_recipe("tiny"), load_recipe("smoke"), load_recipe("orca2-7b")
    assert len(tiny.sources.procedural.families) >= 3 and tiny.eval.headline_system_message in tiny.eval.system_messages
    assert [s.name for s in tiny.curriculum.stages] == ["flan", "orca1", "orca2"]
    assert [s.epochs for s in prod.curriculum.stages] == [1, 3, 4]  # Orca 2's schedule
    # smoke extends tiny: its own fields win, the rest is inherited.
    assert smoke.sources.procedural.train_per_family == 20
    assert smoke.teachers.strong.model == tiny.teachers.strong.model == "oracle-strong"
    assert prod.teachers.strong.kind == "azure" and prod.teachers.strong.rpm == 18
    assert prod.teachers.strong.api_key_env == "AZURE_OPENAI_API_KEY"
    assert prod.train.zero_stage == 3 and prod.train.precision == "bf16" and prod.train.max_len == 4096
    assert prod.sources.flan.counts["niv2"] == 440_000 and prod.sources.flan.niv2_max_per_task == 300


def test_the_answers_only_ablation_has_tinys_token_budget_and_answers_only():
    tiny, ablation = load_recipe("tiny"), load_recipe("tiny-answers-only")
    assert [s.data for s in ablation.curriculum.stages] == ["flan"] * 3
    assert [(s.name, s.steps, s.epochs, s.lr) for s in ablation.curriculum.stages] == \
        [(s.name, s.steps, s.epochs, s.lr) for s in tiny.curriculum.stages]
    assert all(s.steps or s.data == "flan" for s in tiny.curriculum.stages)  # step budgets: the same rows of max_len tokens per step
    assert ablation.train == tiny.train and ablation.model == tiny.model and ablation.seed == tiny.seed
    assert ablation.sources == tiny.sources and ablation.eval == tiny.eval and ablation.store == tiny.store


def test_tiny_curriculum_is_tiny_with_bare_orca1_step_lines_and_a_longer_orca1_stage():
    tiny, longer = load_recipe("tiny"), load_recipe("tiny-curriculum")
    assert [(s.name, s.data, s.steps) for s in longer.curriculum.stages] == \
        [("flan", "flan", 60), ("orca1", "orca1", 3500), ("orca2", "orca2", 1800)]
    assert longer.curriculum.stages[0] == tiny.curriculum.stages[0] and longer.curriculum.stages[2] == tiny.curriculum.stages[2]
    for name in ("assistant", "strong"):  # the teachers differ only in how Orca 1 writes a state trace
        ours, theirs = getattr(longer.teachers, name), getattr(tiny.teachers, name)
        assert ours.oracle.trace_lines == "bare" and theirs.oracle.trace_lines == "styled"
        assert ours.oracle.model_copy(update={"trace_lines": "styled"}) == theirs.oracle
    assert (longer.sources, longer.prompts, longer.model, longer.train, longer.eval, longer.seed) == \
        (tiny.sources, tiny.prompts, tiny.model, tiny.train, tiny.eval, tiny.seed)
    assert longer.control is None


def test_a_stage_takes_epochs_or_steps_not_both(tmp_path):
    for stage, ok in [("{name: a, data: flan, epochs: 1}", True), ("{name: a, data: flan, steps: 9}", True),
                      ("{name: a, data: flan}", False), ("{name: a, data: flan, epochs: 1, steps: 9}", False)]:
        path = _write(tmp_path, f"extends: tiny\neval: {{models: null}}\ncurriculum:\n  stages:\n    - {stage}\n")
        if ok:
            load_recipe(str(path))
        else:
            with pytest.raises(RecipeError, match="curriculum.stages\\[0\\].*set exactly one of epochs and steps"):
                load_recipe(str(path))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_a_head_size_vllm_cannot_serve_is_refused_before_any_work():
    with pytest.raises(RecipeError, match="model.architecture: head size 16 .* vLLM"):
        load_recipe("tiny", ["model.architecture.hidden_size=64", "model.architecture.num_attention_heads=4"])
    assert load_recipe("tiny", ["model.architecture.hidden_size=64", "model.architecture.num_attention_heads=4",
                                "eval.backend=hf"]).eval.backend == "hf"


def test_bad_field_names_file_and_field_path(tmp_path):
    path = _write(tmp_path, f"""
extends: {Path(__file__).resolve().parents[1] / 'configs' / 'tiny.yaml'}
curriculum:
  stages:
    - {{name: flan, data: flan, epochs: 1}}
    - {{name: orca1, data: orca1, epochs: 0}}
""")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    assert "curriculum.stages[1].epochs: must be > 0 (got 0)" in str(err.value)


def test_unknown_field_and_several_errors_are_all_reported(tmp_path):
    path = _write(tmp_path, "extends: tiny\ntrain: {lrr: 0.1, lr: -1}\nteachers: {strong: {rpm: 0}}\n")
    message = str(pytest.raises(RecipeError, load_recipe, path).value)
    assert "train.lrr: unknown field" in message
    assert "train.lr: must be > 0 (got -1)" in message
    assert "teachers.strong.rpm: must be > 0 (got 0)" in message


def test_adam_betas_are_checked_and_reach_the_deepspeed_optimizer(tmp_path):
    from orca_core.train import TrainJob, deepspeed_config

    with pytest.raises(RecipeError, match=r"train.adam_betas.*\[0, 1\)"):
        load_recipe("tiny", ["train.adam_betas=[0.9,1.0]"])
    recipe = load_recipe("tiny", ["train.adam_betas=[0.8,0.9]"])
    assert recipe.train.adam_betas == (0.8, 0.9)
    job = TrainJob(init_dir=tmp_path, dataset=tmp_path, out_dir=tmp_path, checkpoint_dir=tmp_path, epochs=1, lr=1e-3,
                   max_len=8, micro_batch_size=1, adam_betas=recipe.train.adam_betas)
    assert deepspeed_config(job, world_size=1)["optimizer"]["params"]["betas"] == [0.8, 0.9]


def test_an_api_key_in_the_recipe_is_refused():
    with pytest.raises(RecipeError, match="teachers.strong.api_key_env: must name an environment variable"):
        load_recipe("tiny", ["teachers.strong.api_key_env=sk-live-123-abc"])


def test_overrides_parse_values_and_paths():
    recipe = load_recipe("tiny", ["train.lr=1e-4", "curriculum.stages[1].steps=5", "sources.procedural.families=[syllogism]"])
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)
    assert recipe.curriculum.stages[1].steps == 5
    assert recipe.sources.procedural.families == ["syllogism"]
    assert parse_field_path("curriculum.stages.1.epochs") == ["curriculum", "stages", 1, "epochs"]


def test_bad_overrides_name_the_field():
    with pytest.raises(RecipeError, match=r"curriculum.stages\[1\].steps: must be > 0"):
        load_recipe("tiny", ["curriculum.stages[1].steps=0"])
    with pytest.raises(RecipeError, match=r"curriculum.stages\[7\] does not exist"):
        load_recipe("tiny", ["curriculum.stages[7].epochs=1"])
    with pytest.raises(RecipeError, match="expected FIELD=VALUE"):
        apply_override({}, "train.lr")


def test_missing_recipe_lists_the_known_ones():
    with pytest.raises(RecipeError, match="not found.*smoke.*tiny"):
        load_recipe("no-such-recipe")


def test_extends_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


def test_recipe_hash_follows_content_not_source():
    assert recipe_hash(load_recipe("tiny")) == recipe_hash(load_recipe("tiny"))
    assert recipe_hash(load_recipe("tiny")) != recipe_hash(load_recipe("tiny", ["seed=1"]))


def test_cli_recipe_show_prints_resolved_recipe_and_errors_exit_2():
    runner = CliRunner()
    shown = runner.invoke(app, ["recipe", "show", "smoke", "--set", "seed=7"])
    assert shown.exit_code == 0, shown.output
    assert "name: smoke" in shown.output and "seed: 7" in shown.output and "oracle-strong" in shown.output
    bad = runner.invoke(app, ["recipe", "show", "smoke", "--set", "train.max_len=0"])
    assert bad.exit_code == 2
    assert "train.max_len: must be > 0" in bad.output
