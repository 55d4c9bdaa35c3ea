"""Training data of one curriculum stage: examples, ChatML encoding with masked prompts, packed rows.

The curriculum follows Orca 2: FLAN's original answers first, then the
assistant teacher's Orca 1 explanations, then the strong teacher's Orca 2
traces, whose system message is the generic cautious one (prompt erasing: the
student sees the answer a detailed strategy prompt produced, never the
prompt), mixed with a replay of strong-teacher Orca 1 traces.

Each chat is rendered once by the tokenizer's chat template and tokenized
whole, so training sees the ids inference sees (a SentencePiece tokenizer
such as Llama's starts an answer tokenized apart with a "▁" token it never
has after the prompt). The student learns only the teacher's tokens: the
loss covers the tokens that hold the assistant turn and its closing
<|im_end|>, never the system or user turn. Examples are
packed into rows of at most max_len tokens (best-fit decreasing) with
position ids restarting at each example, so the model builds a
block-diagonal mask and examples never see each other; rows are not padded
here (the collator pads).
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections import Counter
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import BatchEncoding, PreTrainedTokenizerFast

from orca_core.tokenizer import IM_END

IGNORE = -100  # label of a token without loss
ENCODE_BATCH = 1024
TABLE_CHUNK_TOKENS = 2**30


def _rows(table: pa.Table, **equal: str) -> list[dict[str, Any]]:
    mask = None
    for column, value in equal.items():
        test = pc.equal(table[column], value)
        mask = test if mask is None else pc.and_(mask, test)
    return table.filter(mask).to_pylist()


def _trace_example(row: dict[str, Any]) -> dict[str, Any]:
    return {"system": row["student_system"] or "", "user": row["user"], "assistant": row["response"],
            "task_name": row["task_name"], "source_id": row["source_id"]}


def stage_examples(stage: str, sources_train: pa.Table, orca1: pa.Table | None, orca2: pa.Table | None,
                   replay_ratio: float, seed: int) -> list[dict[str, Any]]:
    """The examples of one curriculum stage (`flan`, `orca1` or `orca2`)."""
    if stage == "flan":
        return [{"system": "", "user": row["inputs"], "assistant": row["targets"],
                 "task_name": row["task_name"], "source_id": row["id"]}
                for row in _rows(sources_train, split="train")]
    if stage == "orca1":
        if orca1 is None:
            raise ValueError("the orca1 stage needs Orca 1 traces")
        return [_trace_example(r) for r in _rows(orca1, stage="orca1", teacher_role="assistant", verdict="kept")]
    if stage == "orca2":
        if orca2 is None:
            raise ValueError("the orca2 stage needs Orca 2 traces")
        examples = [_trace_example(r) for r in _rows(orca2, stage="orca2", verdict="kept")]
        strong = [] if orca1 is None else _rows(orca1, stage="orca1", teacher_role="strong", verdict="kept")
        replay = random.Random(seed).sample(strong, min(round(replay_ratio * len(examples)), len(strong)))
        return examples + [_trace_example(r) for r in replay]
    raise ValueError(f"unknown stage data {stage!r}: expected flan, orca1 or orca2")


def _messages(example: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": example["system"]}, {"role": "user", "content": example["user"]},
            {"role": "assistant", "content": example["assistant"]}]


def _chat_texts(tokenizer: PreTrainedTokenizerFast, examples: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Each example's whole conversation as the chat template renders it, and where its labelled span starts.

    The span is the assistant's content and its closing <|im_end|>: its last
    occurrence in the rendered text (the assistant turn is the last message).
    """
    rendered = tokenizer.apply_chat_template([_messages(e) for e in examples], tokenize=False)
    texts = []
    for example, text in zip(examples, rendered):
        start = text.rfind(example["assistant"] + IM_END)
        if start < 0:
            raise ValueError(f"example {example.get('source_id')!r}: the chat template does not render the "
                             f"assistant turn verbatim, followed by {IM_END}")
        texts.append((text, start))
    return texts


def _assemble(input_ids: list[int], n_prompt: int, max_len: int, overlong: str) -> dict[str, Any] | None:
    """input_ids and labels (the first n_prompt tokens masked); None when the example is dropped for length."""
    labels = [IGNORE] * n_prompt + input_ids[n_prompt:]
    if len(input_ids) <= max_len:
        return {"input_ids": input_ids, "labels": labels, "truncated": False}
    if overlong == "drop" or n_prompt >= max_len:  # truncation would leave nothing to learn
        return None
    return {"input_ids": input_ids[:max_len], "labels": labels[:max_len], "truncated": True}


def _first_label(batch: BatchEncoding, index: int, start: int, end: int, example: dict[str, Any]) -> int:
    """The first token that holds a character of the labelled span [start, end) of text `index`.

    The fast tokenizer's character-to-token alignment (its offsets) finds it,
    without building every token's offsets as Python tuples."""
    for char in range(start, end):  # the first character, unless the tokenizer maps it to no token
        token = batch.char_to_token(index, char)
        if token is not None:
            return token
    raise ValueError(f"example {example.get('source_id')!r}: no token holds the assistant turn")


def _encode_batch(tokenizer: PreTrainedTokenizerFast, examples: list[dict[str, Any]], max_len: int,
                  overlong: str) -> list[dict | None]:
    """Each conversation tokenized whole, in one batch call: the ids inference sees (tokenized apart, a
    SentencePiece answer would start with a "▁" token it never has after the prompt). The labels start at
    the token holding the assistant span's first character (a token straddling the span is learnt)."""
    texts = _chat_texts(tokenizer, examples)
    batch = tokenizer([text for text, _ in texts], add_special_tokens=False)
    return [_assemble(ids, _first_label(batch, i, start, len(text), example), max_len, overlong)
            for i, ((text, start), ids, example) in enumerate(zip(texts, batch["input_ids"], examples))]


def encode(tokenizer: PreTrainedTokenizerFast, example: dict[str, Any], max_len: int,
           overlong: str) -> dict[str, Any] | None:
    """{"input_ids", "labels", "truncated"} of one example, or None when it is dropped as overlong."""
    return _encode_batch(tokenizer, [example], max_len, overlong)[0]


def _encode_all(tokenizer: PreTrainedTokenizerFast, examples: list[dict[str, Any]], max_len: int,
                overlong: str) -> list[dict | None]:
    """`encode` of every example, tokenizing in batches (the fast tokenizer then runs in parallel)."""
    return [encoded for start in range(0, len(examples), ENCODE_BATCH)
            for encoded in _encode_batch(tokenizer, examples[start:start + ENCODE_BATCH], max_len, overlong)]


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes to the open bin it fills most tightly.

    Open bins are bucketed by remaining capacity; the distinct capacities (at
    most max_len of them) stay sorted, so a best fit is one bisect.
    """
    bins: list[list[int]] = []
    capacities: list[int] = []  # sorted distinct remaining capacities of open bins
    by_capacity: dict[int, list[int]] = {}  # remaining capacity -> open bins
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > max_len:
            raise ValueError(f"example {index} has {length} tokens, more than max_len {max_len}")
        slot = bisect_left(capacities, length)
        if slot < len(capacities):
            capacity = capacities[slot]
            bin_id = by_capacity[capacity].pop()
            if not by_capacity[capacity]:
                del by_capacity[capacity]
                capacities.pop(slot)
        else:
            capacity, bin_id = max_len, len(bins)
            bins.append([])
        bins[bin_id].append(index)
        left = capacity - length
        if left > 0:
            if left not in by_capacity:
                by_capacity[left] = []
                insort(capacities, left)
            by_capacity[left].append(bin_id)
    return bins


def padded_efficiency(lengths: list[int], micro_batch_size: int) -> float:
    """Real / padded tokens when examples are batched in order, each batch padded to its longest."""
    padded = sum(len(batch) * max(batch) for batch in
                 (lengths[i:i + micro_batch_size] for i in range(0, len(lengths), micro_batch_size)))
    return sum(lengths) / padded if padded else 0.0


def _packed_table(encoded: list[dict[str, Any]], rows: list[list[int]]) -> pa.Table:
    """One table row per bin: the bin's examples concatenated, position ids restarting at each."""
    order = [i for row in rows for i in row]
    sizes = np.array([len(encoded[i]["input_ids"]) for i in order], dtype=np.int64)
    example_bounds = np.concatenate([[0], np.cumsum(sizes)])
    row_bounds = example_bounds[np.concatenate([[0], np.cumsum([len(row) for row in rows], dtype=np.int64)])]
    total = int(example_bounds[-1])
    input_ids = np.fromiter(chain.from_iterable(encoded[i]["input_ids"] for i in order), np.int32, total)
    labels = np.fromiter(chain.from_iterable(encoded[i]["labels"] for i in order), np.int32, total)
    position_ids = np.arange(total) - np.repeat(example_bounds[:-1], sizes)
    labelled = np.concatenate([[0], np.cumsum(labels != IGNORE)])[row_bounds]
    offsets = pa.array(row_bounds, pa.int32())
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(input_ids)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
        "position_ids": pa.ListArray.from_arrays(offsets, pa.array(position_ids, pa.int32())),
        "n_examples": pa.array([len(row) for row in rows], pa.int32()),
        "n_tokens": pa.array(np.diff(row_bounds), pa.int32()),
        "n_label_tokens": pa.array(np.diff(labelled), pa.int32()),
    })


def build_dataset(examples: list[dict[str, Any]], tokenizer: PreTrainedTokenizerFast, max_len: int,
                  overlong: str, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """Encode, pack and shuffle (by `seed`) one stage's examples: (packed table, stats)."""
    encoded = _encode_all(tokenizer, examples, max_len, overlong)
    kept = [i for i, e in enumerate(encoded) if e is not None]
    kept_encoded = [encoded[i] for i in kept]
    rows = pack([len(e["input_ids"]) for e in kept_encoded], max_len)
    random.Random(seed).shuffle(rows)
    step = max(1, TABLE_CHUNK_TOKENS // max_len)  # rows per chunk: list offsets are int32
    table = pa.concat_tables([_packed_table(kept_encoded, rows[i:i + step]) for i in range(0, len(rows), step)]
                             or [_packed_table(kept_encoded, [])])
    tokens = int(pc.sum(table["n_tokens"]).as_py() or 0)
    per_row = table["n_examples"].to_numpy()
    stats = {
        "examples": len(examples),
        "kept": len(kept),
        "truncated": sum(e["truncated"] for e in kept_encoded),
        "dropped_overlong": len(examples) - len(kept),
        "rows": table.num_rows,
        "tokens": tokens,
        "packing_efficiency": tokens / (table.num_rows * max_len) if table.num_rows else 0.0,
        "examples_per_row": {"mean": float(per_row.mean()) if len(per_row) else 0.0,
                             "max": int(per_row.max()) if len(per_row) else 0},
        "label_tokens": int(pc.sum(table["n_label_tokens"]).as_py() or 0),
        "by_task": dict(sorted(Counter(examples[i]["task_name"] for i in kept).items())),
    }
    return table, stats
