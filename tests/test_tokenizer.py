"""The student tokenizer: byte-level BPE with single-digit tokens, ChatML specials and template, offline round trip."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from orca_core.recipe.models import ORCA2_CAUTIOUS_SYSTEM_MESSAGE
from orca_core.sources.procedural import generate_suite
from orca_core.sources.schema import to_table
from orca_core.tokenizer import (
    CHATML_TEMPLATE, IM_END, IM_START, PAD, SPECIAL_TOKENS, prepare_pretrained, tokenizer_corpus, train_bpe,
)
from orca_core.traces import TRACE_SCHEMA

VOCAB = 600
SYSTEM, USER, ANSWER = "You are a helpful assistant.", "What is 17 + 25?", "17 + 25 = 42. The answer is 42."
CHATML = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"
          f"<|im_start|>assistant\n{ANSWER}<|im_end|>")


def trace(**fields) -> dict:
    row = {name: None for name in TRACE_SCHEMA.names}
    row.update(stage="orca1", teacher_role="assistant", student_system=SYSTEM, user=USER, response=ANSWER,
               status="ok", verdict="kept", task_name="basic_arithmetic", source_id="s0")
    return {**row, **fields}


@pytest.fixture(scope="module")
def sources() -> pa.Table:
    train, _, _ = generate_suite(None, 20, 0, seed=0)
    return to_table(train)


@pytest.fixture(scope="module")
def trained(sources: pa.Table, tmp_path_factory) -> tuple[Path, PreTrainedTokenizerFast]:
    out = tmp_path_factory.mktemp("bpe")
    return out, train_bpe(tokenizer_corpus(sources, []), VOCAB, out)


@pytest.fixture(scope="module")
def folder(trained) -> Path:
    return trained[0]


@pytest.fixture(scope="module")
def tok(folder: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def messages(system: str = SYSTEM, answer: str | None = ANSWER) -> list[dict]:
    turns = [{"role": "system", "content": system}, {"role": "user", "content": USER}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def test_chat_template_renders_exact_chatml(tok):
    assert tok.apply_chat_template(messages(), tokenize=False) == CHATML
    prompt = tok.apply_chat_template(messages(answer=None), tokenize=False, add_generation_prompt=True)
    assert prompt == CHATML[: -len(f"{ANSWER}<|im_end|>")]
    empty = tok.apply_chat_template(messages(system="", answer=None), tokenize=False)
    assert empty == f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>"
    user_only = tok.apply_chat_template(messages()[1:2], tokenize=False, add_generation_prompt=True)
    assert user_only == f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"


def test_digits_are_one_token_each(tok):
    for text in ["12345", "x = 2024", "3.14159 and 1000000"]:
        pieces = [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert "".join(digit_pieces) == "".join(c for c in text if c.isdigit())


def test_special_tokens_are_single_ids(tok):
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == [0, 1, 2]
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert (tok.pad_token, tok.eos_token) == (PAD, IM_END)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert tok(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)["input_ids"][0] == 1
    assert len(tok) <= VOCAB


def test_byte_level_encodes_any_text(tok):
    text = "héllo wörld ✓ 世界 🙂\ttabs\n\nnew lines"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_round_trip_from_folder(trained, tok):
    fresh = trained[1]  # the object train_bpe returned; `tok` was loaded from its folder
    for text in [CHATML, "Calculate 79 - 92 + 8.", "  leading spaces"]:
        assert tok(text)["input_ids"] == fresh(text)["input_ids"]
    for add in (False, True):
        assert (tok.apply_chat_template(messages(), tokenize=False, add_generation_prompt=add)
                == fresh.apply_chat_template(messages(), tokenize=False, add_generation_prompt=add))


def test_training_is_deterministic(folder, sources, tmp_path):
    train_bpe(tokenizer_corpus(sources, []), VOCAB, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_corpus_reads_sources_and_kept_traces(sources):
    traces = pa.Table.from_pylist([
        trace(response="kept one"),
        trace(response="dropped one", verdict="dropped:gold_mismatch", user="dropped user"),
        trace(stage="orca2", teacher_role="strong", student_system=ORCA2_CAUTIOUS_SYSTEM_MESSAGE,
              teacher_system="secret strategy prompt", response="kept two"),
    ], schema=TRACE_SCHEMA)
    texts = list(tokenizer_corpus(sources, [traces]))
    n = sources.num_rows
    assert texts[:n] == sources["inputs"].to_pylist()
    assert texts[n:2 * n] == [t for t in sources["targets"].to_pylist() if t]
    rest = texts[2 * n:]
    assert rest.count(SYSTEM) == 1 and rest.count(ORCA2_CAUTIOUS_SYSTEM_MESSAGE) == 1
    assert "kept one" in rest and "kept two" in rest and rest.count(USER) == 2
    assert "dropped one" not in rest and "dropped user" not in rest and "secret strategy prompt" not in rest


def base_tokenizer(out: Path) -> None:
    """A base model's tokenizer: its own end-of-text token, none of ChatML's."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([CHATML.replace("<|", "").replace("|>", "")] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(out)


def test_prepare_pretrained_adds_missing_tokens(tmp_path):
    base_tokenizer(tmp_path / "base")
    base = AutoTokenizer.from_pretrained(tmp_path / "base", local_files_only=True)
    prepared = prepare_pretrained(str(tmp_path / "base"), tmp_path / "ready")
    assert len(prepared) == len(base) + 3
    loaded = AutoTokenizer.from_pretrained(tmp_path / "ready", local_files_only=True)
    assert (loaded.pad_token, loaded.eos_token, loaded.chat_template) == (PAD, IM_END, CHATML_TEMPLATE)
    for token in SPECIAL_TOKENS:
        assert len(loaded(token, add_special_tokens=False)["input_ids"]) == 1
    assert loaded(CHATML)["input_ids"] == prepared(CHATML)["input_ids"]
    assert loaded.apply_chat_template(messages(), tokenize=False) == CHATML


def test_prepare_pretrained_keeps_tokens_already_there(folder, tok, tmp_path):
    base = tmp_path / "base"
    tok.save_pretrained(base)
    (base / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(base, local_files_only=True).chat_template is None
    prepared = prepare_pretrained(str(base), tmp_path / "ready")
    assert len(prepared) == len(tok)
    assert prepared.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    assert prepared.apply_chat_template(messages(), tokenize=False) == CHATML
    assert prepared(CHATML)["input_ids"] == tok(CHATML)["input_ids"]


# -- the "characters" pre-tokenizer (tiny): content characters are single tokens --------------------
TRACE = "BD>E\nEA>A\nEB>A\nBC>A\nCA>C\nSo the answer is C."


@pytest.fixture(scope="module")
def chars(sources, tmp_path_factory) -> PreTrainedTokenizerFast:
    corpus = [*tokenizer_corpus(sources, []), *[TRACE] * 50]
    return train_bpe(corpus, VOCAB, tmp_path_factory.mktemp("chars"), pre_tokenizer="characters")


def test_characters_pre_tokenizer_keeps_traces_fixed_width(chars):
    pieces = lambda text: [chars.decode([i]) for i in chars(text, add_special_tokens=False)["input_ids"]]  # noqa: E731
    # every step line is its 4 characters, however often the corpus repeats it
    assert [pieces(line) for line in TRACE.split("\n")[:5]] == [list(line) for line in TRACE.split("\n")[:5]]
    question = "Cups A-E; a ball is under cup E. Swaps: C-E, E-A, D-B, A-B, A-C. Which cup is the ball under?"
    content = [p for p in pieces(question) if not p.strip().islower()]
    assert all(len(p.strip()) <= 1 for p in content), content  # capitals, digits, symbols: one token each
    assert " ball" in pieces(question) and " answer" in pieces(TRACE)  # lowercase words still merge
    assert pieces("12 + 345 = 357") == ["1", "2", " ", "+", " ", "3", "4", "5", " ", "=", " ", "3", "5", "7"]
    assert chars.decode(chars(question + "\n" + TRACE)["input_ids"]) == question + "\n" + TRACE


def test_the_default_pre_tokenizer_merges_capitals_and_keeps_its_keys(tok):
    from orca_core.curriculum import tokenizer_reads
    from orca_core.recipe import load_recipe

    assert tok.tokenize("Which A-E") == ["Which", "ĠA", "-", "E"]  # "digits" merges capitals and spaces in
    assert "pre_tokenizer" not in tokenizer_reads(load_recipe("smoke"))["tokenizer"]  # smoke's keys stay
    assert tokenizer_reads(load_recipe("tiny"))["tokenizer"]["pre_tokenizer"] == "characters"
    with pytest.raises(ValueError, match="model.tokenizer.pre_tokenizer: 'words'"):
        train_bpe(["text"], VOCAB, Path("unused"), pre_tokenizer="words")
