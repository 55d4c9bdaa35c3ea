"""The student's tokenizer: ChatML turns, a local byte-level BPE, or a base model's tokenizer made ChatML-ready.

Orca 2 trains on ChatML conversations and adds `[PAD]`, `<|im_start|>` and
`<|im_end|>` to the base vocabulary; `<|im_end|>` ends every turn, so it is
also the end-of-sequence token the student learns to emit. A small student
trained from scratch gets its own byte-level BPE (any text encodes, nothing
maps to an unknown token) with digits split one per token, the usual choice
for arithmetic: a number's tokens are its digits, whatever the merges learnt
(or, with `characters`, every character but lowercase letters: see PRE_TOKENIZERS).
A base model's tokenizer loads from a local folder, or from the hub (or its
local cache) at the commit the tokenizer step is keyed on (orca_core/hub.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, IM_START, IM_END = "[PAD]", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# <|im_start|>{role}\n{content}<|im_end|>, turns joined by "\n"; the generation
# prompt opens the assistant turn. The prompt of [system, user] plus the
# response and <|im_end|> is exactly the training text of one example.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def make_chatml_ready(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Add the special tokens that are missing; pad, eos and chat template as Orca 2 uses them."""
    tokenizer.add_special_tokens(
        {"pad_token": PAD, "eos_token": IM_END, "extra_special_tokens": [IM_START]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# How text is cut before BPE merges. "digits": digits one per token, other characters merge freely.
# "characters": every character but a lowercase letter is a token of its own (digits, capitals,
# punctuation, newlines, a space before any of them), so a fixed-width trace ("AB>C", one per line)
# is as many tokens as it has characters, whatever the merges learnt, and operands sit at constant
# token offsets. A lowercase word with its leading space may still merge: words are the instructions
# and Orca 1's wrappers, not operands, and merged words keep long system messages short in the budget.
PRE_TOKENIZERS = ("digits", "characters")


def _pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    if kind == "digits":
        first = pre_tokenizers.Digits(individual_digits=True)
    elif kind == "characters":
        first = pre_tokenizers.Split(Regex(r" ?[a-z]+|[^a-z]"), behavior="isolated")
    else:
        raise ValueError(f"model.tokenizer.pre_tokenizer: {kind!r} is not one of {list(PRE_TOKENIZERS)}")
    return pre_tokenizers.Sequence([first, pre_tokenizers.ByteLevel(add_prefix_space=False)])


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path, pre_tokenizer: str = "digits"
              ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it to `out_dir` (loadable with AutoTokenizer)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = _pre_tokenizer(pre_tokenizer)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2; never split, never merged
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = make_chatml_ready(PreTrainedTokenizerFast(tokenizer_object=bpe))
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def prepare_pretrained(path: str, out_dir: Path, revision: str | None = None,
                       gguf_file: str | None = None) -> PreTrainedTokenizerFast:
    """A base model's tokenizer (a local folder, or a hub name at commit `revision`) made ChatML-ready, saved.

    `gguf_file`: the tokenizer is the one inside that GGUF file of `path`. New tokens
    get new ids: the model's embeddings must be resized to len(tokenizer).
    """
    tokenizer = make_chatml_ready(AutoTokenizer.from_pretrained(path, revision=revision, gguf_file=gguf_file))
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _strings(table: pa.Table, column: str) -> Iterator[str]:
    for batch in table.select([column]).to_batches():
        yield from (text for text in batch.column(0).to_pylist() if text)


def tokenizer_corpus(source_train: pa.Table, traces: list[pa.Table]) -> Iterator[str]:
    """What the student will read: source inputs and targets, then kept traces.

    A system message repeats on thousands of traces; it is yielded once, so
    boilerplate does not buy merges that the questions and answers need more.
    """
    yield from _strings(source_train, "inputs")
    yield from _strings(source_train, "targets")
    systems: set[str] = set()
    for table in traces:
        kept = table.filter(pc.equal(table["verdict"], "kept"))
        for system in _strings(kept, "student_system"):
            if system not in systems:
                systems.add(system)
                yield system
        yield from _strings(kept, "user")
        yield from _strings(kept, "response")
