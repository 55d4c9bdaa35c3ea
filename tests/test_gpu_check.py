"""bench/gpu_check.py's pieces that run without a GPU: the model size, the FLOPs it counts, the data it trains on.

The whole check on a tiny config runs with `bench/gpu_check.py --device cpu --tiny` (a minute or two: too slow here).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))  # its `json_output` import
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_h200_preset_is_a_1b_llama_and_its_flops_per_token(gpu_check):
    preset = gpu_check.PRESETS["h200"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=preset["vocab_size"], **preset["arch"]))
    params, matmul = gpu_check.param_counts(model)
    # 16 x (4 x 2048^2 + 3 x 2048 x 5632) + lm_head 32000 x 2048; all adds the embedding and 33 norms
    assert (params, matmul) == (953_223_168, 887_619_584)
    meta = {"matmul_params": matmul, "attention_span": 500.0}
    assert gpu_check.flops_per_token(preset, meta) == 6 * 887_619_584 + 6 * 16 * 2048 * 500


def test_rows_restart_positions_at_each_example_and_keep_prompt_unlabelled(gpu_check):
    preset = {**gpu_check.PRESETS["tiny"], "examples": 5}
    chats = gpu_check.examples(preset, seed=3)
    assert chats == gpu_check.examples(preset, seed=3)  # one seed, one data set
    for chat in chats:
        assert 16 <= len(chat["input_ids"]) <= preset["max_len"]
        assert min(chat["input_ids"]) >= 3 and max(chat["input_ids"]) < preset["vocab_size"]  # no special ids
        answer = [label for label in chat["labels"] if label != -100]
        assert answer and chat["labels"][0] == -100 and answer == chat["input_ids"][-len(answer):]
    table = gpu_check.rows_table([chats[:2], chats[2:3]]).to_pylist()
    first, second = len(chats[0]["input_ids"]), len(chats[1]["input_ids"])
    assert table[0]["position_ids"] == list(range(first)) + list(range(second))
    assert table[0]["input_ids"] == chats[0]["input_ids"] + chats[1]["input_ids"]
    assert table[0]["labels"] == chats[0]["labels"] + chats[1]["labels"]
    assert table[1]["position_ids"] == list(range(len(chats[2]["input_ids"])))
