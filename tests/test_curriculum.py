"""The training half of the DAG in-process: tokenizer -> base model -> three stages, each from the last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from orca_core import steps
from orca_core.context import StepContext
from orca_core.curriculum import DATASET_FILE
from orca_core.packed import PackedRows
from orca_core.store import ArtifactStore
from orca_core.teacher.runner import LocalFanoutRunner
from orca_core.train import fit


def local_trainer(job, resume):
    summary = fit(job, resume_from=resume)
    return {k: v for k, v in summary.items() if k != "metrics"}


def run_all(recipe, store):
    ctx = StepContext(fanout=LocalFanoutRunner(recipe), request_cache=Path(store.url("requests")),
                      trainer=local_trainer, work_root=Path(store.url(".train-work")))
    return {name: steps.run_step(store, step, recipe, ctx=ctx) for name, step in steps.steps_for(recipe).items()
            if not name.startswith("eval-") and name != "report"}  # training is what this file tests


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from orca_core.recipe import load_recipe

    root = tmp_path_factory.mktemp("curriculum") / "store"
    recipe = load_recipe("smoke", [f"store.root={root}", "train.checkpoint_every=2",
                                    "train.keep_training_state=true"])  # the resume tests copy it back
    store = ArtifactStore(recipe.store.root)
    return recipe, store, run_all(recipe, store)


def test_three_stages_export_loadable_checkpoints_each_from_the_last(trained):
    recipe, store, results = trained
    names = [s.name for s in recipe.curriculum.stages]
    assert [n for n in results if n.startswith("train-")] == [f"train-{n}" for n in names]
    previous = Path(results["base-model"].ref.url)
    for name in names:
        folder = Path(results[f"train-{name}"].ref.url)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert "<|im_start|>" in tokenizer.get_vocab() and tokenizer.chat_template
        assert (folder / "metrics.parquet").is_file() and (folder / "loss_curve.png").is_file()
        assert json.loads((folder / "recipe.json").read_text())["stage"]["name"] == name
        assert (folder / "training_state").is_dir()
        key = json.loads((folder / "key.json").read_text())
        assert key["upstream"][previous.parent.name] == previous.name  # initialised from the previous stage
        before, after = load_file(previous / "model.safetensors"), load_file(folder / "model.safetensors")
        assert any(not torch.equal(before[k], after[k]) for k in after)  # and it trained
        assert model.config.vocab_size == len(tokenizer)
        previous = folder


def test_only_teacher_tokens_are_labelled_in_every_stage_dataset(trained):
    recipe, store, results = trained
    tokenizer = AutoTokenizer.from_pretrained(Path(results["tokenizer"].ref.url))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for name in ("flan", "orca1", "orca2"):
        table = PackedRows(Path(results[f"dataset-{name}"].ref.url) / DATASET_FILE).table()
        manifest = store.manifest(results[f"dataset-{name}"].ref)
        stats = manifest["stats"]
        assert stats["packing_efficiency"] > 0.8
        ends = sum([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100].count(end)
                   for row in table.select(["input_ids", "labels"]).to_pylist())
        # Every answer ends with a labelled <|im_end|>, except those truncated at max_len.
        assert ends == stats["kept"] - stats["truncated"] and sum(table["n_examples"].to_pylist()) == stats["kept"]


def test_second_run_trains_nothing_and_a_corrupt_checkpoint_is_rebuilt(trained, caplog):
    recipe, store, first = trained
    again = run_all(recipe, store)
    assert all(r.cached for r in again.values())
    # A killed run leaves a checkpoint in the work folder; a corrupt one is detected and training restarts.
    last = first["train-orca2"].ref
    work = Path(store.url(".train-work", "train-orca2", last.key, "checkpoints"))
    shutil.copytree(Path(last.url) / "training_state", work / "step2")
    for pt in (work / "step2").glob("*.pt"):
        pt.write_bytes(b"not a checkpoint")
    store.supersede("train-orca2", last.key)
    with caplog.at_level("WARNING", logger="orca_core"):
        rebuilt = run_all(recipe, store)["train-orca2"]
    assert not rebuilt.cached and "does not validate" in caplog.text
    assert store.lookup("train-orca2", last.key) is not None


def test_a_retry_resumes_from_the_checkpoint_in_the_work_folder(trained):
    recipe, store, first = trained
    done = first["train-flan"].ref
    before = load_file(Path(done.url) / "model.safetensors")
    state = Path(done.url) / "training_state"
    steps_done = pq.read_table(Path(done.url) / "metrics.parquet").num_rows
    work = Path(store.url(".train-work", "train-flan", done.key, "checkpoints"))
    shutil.copytree(state, work / f"step{steps_done}")  # what a killed attempt leaves behind
    store.supersede("train-flan", done.key)
    results = run_all(recipe, store)
    again = results["train-flan"]
    assert not again.cached and store.manifest(again.ref)["stats"]["resumed_from"] == f"step{steps_done}"
    after = load_file(Path(again.ref.url) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same weights: nothing trained twice
    assert pq.read_table(Path(again.ref.url) / "metrics.parquet").num_rows == steps_done
    assert not work.exists()  # the work folder is removed once the stage is published
    # Nothing upstream of training reruns. (Later stages do: the export's timing metrics are new, so its
    # content digest changed, and what was built from it is rebuilt; that is the conservative rule.)
    assert all(r.cached for name, r in results.items() if not name.startswith("train-"))


VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    prompts = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, skip_special_tokens=False))
    print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def test_the_exported_stage_loads_in_vllm_with_the_same_greedy_tokens(trained, tmp_path, python):
    import os
    import subprocess

    recipe, store, results = trained
    folder = Path(results["train-orca2"].ref.url)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    messages = [[{"role": "system", "content": ""}, {"role": "user", "content": q}] for q in ("Calculate 3 + 4.", "Spell this word backward: cat")]
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    expected = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        expected.append(out[0, ids.shape[1]:].tolist())
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm"), "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run([python, "-c", VLLM_SCRIPT, str(folder), json.dumps(prompts)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("TOKENS"))[7:])
    assert got == expected
