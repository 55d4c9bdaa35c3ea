"""Stage examples, masked ChatML encoding (one tokenization per chat), best-fit-decreasing packing, the packed table."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from orca_core import data
from orca_core.data import IGNORE, build_dataset, encode, pack, padded_efficiency, stage_examples
from orca_core.eval.benchmarks import Example
from orca_core.eval.evaluate import Job, job_prompts
from orca_core.packed import PACKED_SCHEMA, PackedRows
from orca_core.recipe.models import ORCA2_CAUTIOUS_SYSTEM_MESSAGE
from orca_core.sources.procedural import generate_suite
from orca_core.sources.schema import to_table
from orca_core.sources.serial import GENERATORS
from orca_core.sources.suite import SUITE
from orca_core.tokenizer import CHATML_TEMPLATE, IM_END, make_chatml_ready, tokenizer_corpus, train_bpe
from orca_core.traces import TRACE_SCHEMA

ORCA1_SYSTEM = "You are an AI assistant. You will be given a task. You must generate a detailed and long answer."
STRATEGY_PROMPT = "Solve it step by step, then state the final answer."


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    # the twelve reasoning-gym families the golden digests below were recorded on (not serial.py's)
    return generate_suite([n for n, f in SUITE.items() if f.generator not in GENERATORS], 20, 0, seed=0)[0]


@pytest.fixture(scope="module")
def sources(train_rows) -> pa.Table:
    heldout = {**train_rows[0], "id": "held", "split": "heldout", "inputs": "held-out question"}
    return to_table(train_rows + [heldout])


def explanation(row: dict, sentences: int) -> str:
    return " ".join([f"Step {k}: we look at the question again and compute." for k in range(sentences)]
                    + [f"The answer is {row['answer']}."])


def traces_for(rows: list[dict], stage: str, role: str, system: str, teacher_system: str) -> list[dict]:
    """One trace per source row in TRACE_SCHEMA; every fifth is dropped by the filter."""
    out = []
    for k, row in enumerate(rows):
        trace = {name: None for name in TRACE_SCHEMA.names}
        trace.update(source_id=row["id"], task_name=row["task_name"], stage=stage, teacher_role=role,
                     strategy="step-by-step" if stage == "orca2" else "",
                     system_message_id=3 if stage == "orca1" else 0,
                     teacher_system=teacher_system, student_system=system, user=row["inputs"],
                     response=explanation(row, k % 7), status="ok",
                     verdict="dropped:gold_mismatch" if k % 5 == 4 else "kept")
        out.append(trace)
    return out


@pytest.fixture(scope="module")
def orca1(train_rows) -> pa.Table:
    rows = (traces_for(train_rows, "orca1", "assistant", ORCA1_SYSTEM, ORCA1_SYSTEM)
            + traces_for(train_rows[:60], "orca1", "strong", ORCA1_SYSTEM, ORCA1_SYSTEM))
    return pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)


@pytest.fixture(scope="module")
def orca2(train_rows) -> pa.Table:
    rows = traces_for(train_rows[:100], "orca2", "strong", ORCA2_CAUTIOUS_SYSTEM_MESSAGE, STRATEGY_PROMPT)
    rows += traces_for(train_rows[100:110], "selection", "strong", "", STRATEGY_PROMPT)
    return pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)


@pytest.fixture(scope="module")
def tok(sources, orca1, orca2, tmp_path_factory) -> PreTrainedTokenizerFast:
    return train_bpe(tokenizer_corpus(sources, [orca1, orca2]), 800, tmp_path_factory.mktemp("bpe"))


LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


def llama_style_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A Llama-style SentencePiece BPE, built here: "▁" for spaces and before the first word (Metaspace),
    <0xNN> byte tokens for characters outside the vocabulary (byte fallback), ChatML-ready like the project's."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA_SPECIALS,
                                                           show_progress=False))
    vocab, merges = trained.get_vocab(with_added_tokens=False), json.loads(trained.to_str())["model"]["merges"]
    pieces = sorted((p for p in vocab if p not in LLAMA_SPECIALS), key=vocab.get)
    ids = {p: i for i, p in enumerate(LLAMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces)}  # Llama's order
    spm = Tokenizer(models.BPE(ids, [tuple(m) for m in merges], unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = trained.pre_tokenizer
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.add_special_tokens(LLAMA_SPECIALS)
    return make_chatml_ready(PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", bos_token="<s>"))


@pytest.fixture(scope="module")
def spm(sources, orca1, orca2) -> PreTrainedTokenizerFast:
    return llama_style_tokenizer(list(tokenizer_corpus(sources, [orca1, orca2])), 800)


def kept(table: pa.Table, **equal) -> list[dict]:
    return [r for r in table.to_pylist() if r["verdict"] == "kept" and all(r[k] == v for k, v in equal.items())]


def test_flan_stage_uses_original_targets(sources, train_rows):
    examples = stage_examples("flan", sources, None, None, 0.0, 0)
    assert len(examples) == len(train_rows)  # the held-out row is not trained on
    for example, row in zip(examples, train_rows):
        assert example == {"system": "", "user": row["inputs"], "assistant": row["targets"],
                           "task_name": row["task_name"], "source_id": row["id"]}


def test_flan_stage_leaves_orca2s_few_shot_and_math_rows_out(train_rows):
    """FLAN's answers are Orca 1's prompts: few-shot and math rows are only the orca2 stage's to explain."""
    origins = ["procedural", "flan", "flan_few_shot", "math"]
    rows = [{**row, "source": origins[k % 4]} for k, row in enumerate(train_rows)]
    examples = stage_examples("flan", to_table(rows), None, None, 0.0, 0)
    assert [e["source_id"] for e in examples] == [r["id"] for r in rows if r["source"] in ("procedural", "flan")]
    assert len(examples) == len(train_rows) // 2


def test_orca1_stage_takes_kept_assistant_teacher_traces(sources, orca1):
    examples = stage_examples("orca1", sources, orca1, None, 0.0, 0)
    expected = kept(orca1, teacher_role="assistant")
    assert len(examples) == len(expected) == 192  # 240 rows, 48 dropped; the 48 kept strong ones are not here
    assert [e["assistant"] for e in examples] == [r["response"] for r in expected]
    assert {e["system"] for e in examples} == {ORCA1_SYSTEM}


def test_orca2_stage_erases_the_prompt_and_replays_strong_orca1(sources, orca1, orca2):
    only = stage_examples("orca2", sources, orca1, orca2, 0.0, 0)
    assert len(only) == 80  # 100 orca2 rows, 20 dropped; selection traces never train
    assert {e["system"] for e in only} == {ORCA2_CAUTIOUS_SYSTEM_MESSAGE}
    strong = {(r["source_id"], r["response"]) for r in kept(orca1, teacher_role="strong")}
    assert len(strong) == 48
    for ratio, replayed in [(0.25, 20), (0.5, 40), (1.0, 48)]:  # capped at the 48 that exist
        examples = stage_examples("orca2", sources, orca1, orca2, ratio, seed=1)
        assert examples[:80] == only
        replay = examples[80:]
        assert len(replay) == replayed
        assert {(e["source_id"], e["assistant"]) for e in replay} <= strong
        assert {e["system"] for e in replay} == {ORCA1_SYSTEM}
    by_seed = [stage_examples("orca2", sources, orca1, orca2, 0.25, seed) for seed in (1, 1, 2)]
    assert by_seed[0] == by_seed[1] != by_seed[2]


def test_encode_labels_only_the_assistant_turn(tok, orca1, sources):
    example = stage_examples("orca1", sources, orca1, None, 0.0, 0)[5]
    encoded = encode(tok, example, 4096, "truncate")
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert not encoded["truncated"] and len(ids) == len(labels)
    n_prompt = labels.count(IGNORE)
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[:n_prompt]) == (f"<|im_start|>system\n{ORCA1_SYSTEM}<|im_end|>\n"
                                         f"<|im_start|>user\n{example['user']}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids[n_prompt:]) == example["assistant"] + IM_END
    assert ids[-1] == tok.convert_tokens_to_ids(IM_END)
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": "system", "content": ORCA1_SYSTEM}, {"role": "user", "content": example["user"]},
         {"role": "assistant", "content": example["assistant"]}], tokenize=False)


@pytest.mark.parametrize("tokenizer", ["tok", "spm"])
def test_encode_overlong_truncates_or_drops(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    example = {"system": "", "user": "Count.", "assistant": " ".join(["1"] * 200), "task_name": "t", "source_id": "s"}
    full = encode(tok, example, 4096, "truncate")
    n_prompt = full["labels"].count(IGNORE)
    cut = encode(tok, example, 100, "truncate")
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][:100] and cut["labels"] == full["labels"][:100]
    assert encode(tok, example, n_prompt + 1, "truncate")["labels"][-1] != IGNORE  # one label survives
    assert encode(tok, example, n_prompt, "truncate") is None  # none would
    assert encode(tok, example, 100, "drop") is None
    assert encode(tok, example, len(full["input_ids"]), "drop") == full


def messages_of(example: dict) -> list[dict]:
    return [{"role": "system", "content": example["system"]}, {"role": "user", "content": example["user"]},
            {"role": "assistant", "content": example["assistant"]}]


def chats(sources, orca1, orca2) -> list[dict]:
    """FLAN (no system), Orca 1 and Orca 2 chats, and answers that start with a space or a newline, hold
    characters outside the vocabulary (byte fallback), or are empty."""
    picked = [stage_examples(stage, sources, orca1, orca2, 0.0, 0)[k] for stage in ("flan", "orca1", "orca2")
              for k in (0, 7)]
    odd = [" The answer is 42.", "\nStep 1: add.\n\nThe answer is 7.", "Ünïcode ✓ 世界 🙂 is 3.", ""]
    return picked + [{**picked[1], "assistant": answer, "source_id": f"odd{k}"} for k, answer in enumerate(odd)]


def test_training_tokens_are_what_inference_sees_with_a_sentencepiece_tokenizer(spm, sources, orca1, orca2):
    examples = chats(sources, orca1, orca2)
    split_apart = straddling = 0
    for example in examples:
        encoded = encode(spm, example, 4096, "drop")
        full = spm.apply_chat_template(messages_of(example), tokenize=True)["input_ids"]
        prompt = spm.apply_chat_template(messages_of(example)[:2], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]
        assert encoded["input_ids"] == full
        # The labels are the tokens that hold the answer and its <|im_end|>: those after the generation prompt,
        # and the prompt's last token when it merged with the answer's first characters (e.g. "\n-").
        straddles = full[:len(prompt)] != prompt
        straddling += straddles
        n_prompt = len(prompt) - straddles
        assert full[:n_prompt] == prompt[:n_prompt] and full[-1] == spm.eos_token_id
        assert encoded["labels"] == [IGNORE] * n_prompt + full[n_prompt:]
        rendered = spm.apply_chat_template(messages_of(example), tokenize=False)
        assert spm.decode(full) == rendered  # (decoding the labels alone would drop a leading space, as Llama's does)
        assert rendered[len(spm.decode(full[:n_prompt])):] == "\n" * straddles + example["assistant"] + IM_END
        apart = spm(example["assistant"] + IM_END, add_special_tokens=False)["input_ids"]
        split_apart += prompt + apart != full
    # This tokenizer shows the bug: tokenized apart, an answer gets a "▁" it never has after the prompt (all
    # but the answer that starts with a space and the empty one).
    assert split_apart == len(examples) - 2
    assert straddling == 3  # the FLAN answers "-5" and "-3" ("\n-" is a token), and the one that starts with "\n"
    table, stats = build_dataset(examples, spm, 1024, "drop", seed=0)
    packed = [ids for row in table.to_pylist() for ids, _ in examples_of_row(row)]
    assert stats["kept"] == len(examples)
    assert Counter(map(tuple, packed)) == Counter(
        tuple(spm.apply_chat_template(messages_of(e), tokenize=True)["input_ids"]) for e in examples)


def test_a_template_that_alters_the_answer_is_refused(tok):
    upper = copy.deepcopy(tok)
    upper.chat_template = CHATML_TEMPLATE.replace("message['content']", "message['content'] | upper")
    example = {"system": "", "user": "Say hi.", "assistant": "hi", "task_name": "t", "source_id": "row-9"}
    with pytest.raises(ValueError, match="'row-9'.*does not render the assistant turn verbatim"):
        encode(upper, example, 64, "drop")


def realistic_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(40, 400) for _ in range(n)]


def test_pack_best_fit_decreasing():
    lengths = realistic_lengths(2000)
    bins = pack(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    efficiency = sum(lengths) / (len(bins) * 1024)
    assert efficiency >= 0.98
    assert padded_efficiency(lengths, 8) < efficiency - 0.2
    assert pack(lengths, 1024) == bins
    assert pack([5, 3, 4, 2, 6], 10) == [[4, 2], [0, 1, 3]]  # 6+4, then 5+3+2: each into its tightest bin
    assert pack([], 10) == []
    with pytest.raises(ValueError, match="more than max_len"):
        pack([3, 11], 10)


def test_padded_efficiency_pads_each_batch_to_its_longest():
    assert padded_efficiency([1, 3, 2, 2], 2) == pytest.approx(8 / 10)
    assert padded_efficiency([4, 4, 4], 2) == 1.0


def examples_of_row(row: dict) -> list[tuple[list[int], list[int]]]:
    starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_build_dataset_packs_and_resets_positions(tok, sources, orca1):
    examples = stage_examples("flan", sources, None, None, 0.0, 0) + stage_examples("orca1", sources, orca1, None, 0, 0)
    table, stats = build_dataset(examples, tok, 256, "truncate", seed=3)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("n_examples").type == pa.int32()
    rows = table.to_pylist()
    packed = []
    for row in rows:
        parts = examples_of_row(row)
        assert all(row["position_ids"][k] == row["position_ids"][k - 1] + 1 or row["position_ids"][k] == 0
                   for k in range(1, row["n_tokens"]))
        assert row["n_examples"] == len(parts) and row["n_tokens"] == len(row["input_ids"]) <= 256
        assert row["n_label_tokens"] == sum(label != IGNORE for label in row["labels"])
        packed += parts
    encoded = [encode(tok, e, 256, "truncate") for e in examples]
    assert Counter(map(repr, packed)) == Counter(repr((e["input_ids"], e["labels"])) for e in encoded if e)
    assert stats["kept"] + stats["dropped_overlong"] == stats["examples"] == len(examples)
    assert stats["rows"] == len(rows) and stats["tokens"] == sum(r["n_tokens"] for r in rows)
    assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (len(rows) * 256))
    assert stats["examples_per_row"]["max"] == max(r["n_examples"] for r in rows)
    assert stats["label_tokens"] == sum(r["n_label_tokens"] for r in rows)
    assert sum(stats["by_task"].values()) == stats["kept"] == sum(r["n_examples"] for r in rows)
    json.dumps(stats)
    again, _ = build_dataset(examples, tok, 256, "truncate", seed=3)
    other, _ = build_dataset(examples, tok, 256, "truncate", seed=4)
    assert again.equals(table) and not other.equals(table)


def test_build_dataset_counts_truncated_and_dropped(tok):
    def example(n_words: int) -> dict:
        return {"system": "", "user": "Say it.", "assistant": " ".join(["word"] * n_words), "task_name": "t",
                "source_id": str(n_words)}
    examples = [example(n) for n in (5, 10, 300, 400)] + [{**example(5), "user": "long " * 400}]
    truncated, stats = build_dataset(examples, tok, 128, "truncate", seed=0)
    assert (stats["kept"], stats["truncated"], stats["dropped_overlong"]) == (4, 2, 1)
    assert max(truncated["n_tokens"].to_pylist()) == 128
    dropped, stats = build_dataset(examples, tok, 128, "drop", seed=0)
    assert (stats["kept"], stats["truncated"], stats["dropped_overlong"]) == (2, 0, 3)
    assert dropped.num_rows == 1 and dropped["n_examples"].to_pylist() == [2]


def test_build_dataset_of_nothing(tok):
    table, stats = build_dataset([], tok, 64, "drop", seed=0)
    assert table.num_rows == 0 and stats["rows"] == 0 and stats["packing_efficiency"] == 0.0
    assert table.schema.field("labels").type == pa.list_(pa.int32())


# -- streaming build: the same packed rows and stats as the in-memory build it replaced -------------------------
def content_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def golden_examples(case: str, sources, orca1, orca2) -> list[dict]:
    if case == "flan+orca1":
        return stage_examples("flan", sources, None, None, 0.0, 0) + stage_examples("orca1", sources, orca1, None, 0, 0)
    return stage_examples("orca2", sources, orca1, orca2, 0.5, seed=1)


# Digests of (packed rows, stats) from the list-based build (every token a Python int) before it streamed.
GOLDEN_PACKED = {
    ("flan+orca1", 256, "truncate", 3): ("cb44478d582ef8ae", "3c941972aaf8cfe8"),
    ("orca2", 96, "drop", 7): ("b3e86d7d85573b3e", "ca2e1d6bc6e73b5c"),
    ("orca2", 80, "truncate", 0): ("d58c227078cfe12b", "d7fa575fa0ec51ba"),
}


@pytest.mark.parametrize("case, max_len, overlong, seed", list(GOLDEN_PACKED))
def test_packed_rows_and_stats_are_golden(tok, sources, orca1, orca2, case, max_len, overlong, seed):
    table, stats = build_dataset(golden_examples(case, sources, orca1, orca2), tok, max_len, overlong, seed)
    assert (content_digest(table.to_pylist()), content_digest(stats)) == GOLDEN_PACKED[(case, max_len, overlong, seed)]


def test_the_step_streams_from_parquet_files_to_the_golden_rows(tok, sources, orca1, orca2, tmp_path, monkeypatch):
    # Small batches and chunks, so the tables are read, tokenized and written in many pieces.
    monkeypatch.setattr(data, "ENCODE_BATCH", 7)
    monkeypatch.setattr(data, "CHUNK_TOKENS", 3 * 80)
    files = {}
    for name, table in (("sources", sources), ("orca1", orca1), ("orca2", orca2)):
        pq.write_table(table, files.setdefault(name, tmp_path / f"{name}.parquet"), row_group_size=16)
    examples = data.stage_example_batches("orca2", files["sources"], files["orca1"], files["orca2"], 0.5, seed=1)
    stats = data.write_dataset(examples, tok, 80, "truncate", 0, tmp_path / "packed.arrow")
    rows = PackedRows(tmp_path / "packed.arrow")
    assert [batch.num_rows for batch in rows.batches][:3] == [3, 3, 3]
    golden = GOLDEN_PACKED[("orca2", 80, "truncate", 0)]
    assert (content_digest(rows.table().to_pylist()), content_digest(stats)) == golden


def test_the_replay_is_the_sample_of_the_listed_strong_traces(sources, orca1, orca2):
    strong = kept(orca1, teacher_role="strong")
    for ratio, seed in [(0.25, 1), (0.5, 9), (1.0, 3)]:
        replay = stage_examples("orca2", sources, orca1, orca2, ratio, seed)[80:]
        expected = random.Random(seed).sample(strong, min(round(ratio * 80), len(strong)))  # what it did on a list
        assert [(e["source_id"], e["assistant"]) for e in replay] == [(r["source_id"], r["response"]) for r in expected]


def test_a_table_without_a_needed_column_is_named(sources, orca1, tmp_path):
    pq.write_table(orca1.drop_columns(["response"]), tmp_path / "traces.parquet")
    with pytest.raises(ValueError, match=r"orca1 traces: no column 'response'"):
        stage_examples("orca1", sources, tmp_path / "traces.parquet", None, 0.0, 0)
    with pytest.raises(ValueError, match=r"sources: no column 'split'"):
        stage_examples("flan", sources.drop_columns(["split"]), None, None, 0.0, 0)


def test_packed_rows_are_taken_from_the_memory_map_without_reading_the_file(tmp_path):
    n_rows, width = 2000, 4096  # 2000 rows x 3 lists of 4096 int32: ~94 MiB
    ids = pa.array(np.arange(n_rows * width, dtype=np.int32) % 50000)
    offsets = pa.array(np.arange(0, n_rows * width + 1, width, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, ids)
    counts = pa.array(np.full(n_rows, width, np.int32))
    table = pa.Table.from_arrays([lists, lists, lists, counts, counts, counts], schema=PACKED_SCHEMA)
    with pa.OSFile(str(tmp_path / "packed.arrow"), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=100)
    del table, lists, ids
    allocated = pa.total_allocated_bytes()
    rows = PackedRows(tmp_path / "packed.arrow", ["input_ids", "labels", "position_ids"])
    taken = rows.take([1999, 0, 1234])
    assert pa.total_allocated_bytes() - allocated < 2**20  # Arrow allocated nothing for the file: it is mapped
    assert len(rows) == 2000 and len(rows.batches) == 20
    assert taken.column_names == ["input_ids", "labels", "position_ids"]
    assert [row[0] for row in taken["input_ids"].to_pylist()] == [1999 * width % 50000, 0, 1234 * width % 50000]
    with pytest.raises(IndexError, match="out of range 0..1999"):
        rows.take([2000])
    with pytest.raises(ValueError, match=r"packed.arrow: no column 'weights'"):
        PackedRows(tmp_path / "packed.arrow", ["input_ids", "weights"])


def test_evaluation_prompts_the_student_as_its_training_examples_did(tok, sources, orca1, orca2, tmp_path):
    """The eval's prompt is the training example's prompt, token for token, with the empty system message too:
    a FLAN or erased Orca 2 example keeps its empty system turn, and so must the prompt the eval sends."""
    tok.save_pretrained(tmp_path)
    flan, orca1_example, orca2_example = (stage_examples(stage, sources, orca1, orca2, 0.0, 0)[0]
                                          for stage in ("flan", "orca1", "orca2"))
    erased = {**orca2_example, "system": ""}
    assert flan["system"] == "" and orca1_example["system"] and orca2_example["system"]
    for example in (flan, orca1_example, orca2_example, erased):
        encoded = encode(tok, example, 4096, "drop")
        n_prompt = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE)
        question = Example("procedural-heldout", "t", "t-0", example["user"], "", "procedural")
        job = Job("procedural-heldout", "native", (question,), (example["system"],))
        assert job_prompts(tmp_path, job) == [encoded["input_ids"][:n_prompt]]
