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

The build streams, so a stage of millions of examples fits in bounded memory:
examples are read from the source and trace tables in Arrow batches and
tokenized a batch at a time; their tokens are spilled to a temporary file and
only per-example numbers (lengths, prompt lengths, places) stay in memory, as
numpy arrays. Packing works on the lengths; packed rows are written a chunk at
a time to an Arrow IPC file, each chunk's examples read back from the spill
with positioned reads (a memory map's pages would count against the build
until unmapped, and its read-around maps far more than an example).
"""

from __future__ import annotations

import os
import random
import tempfile
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import reduce
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from transformers import BatchEncoding, PreTrainedTokenizerFast

from orca_core.packed import PACKED_SCHEMA, PackedRows
from orca_core.prompts import student_chat
from orca_core.sources.schema import ORCA1_SOURCES
from orca_core.tokenizer import IM_END

IGNORE = -100  # label of a token without loss
ENCODE_BATCH = 1024  # examples read, rendered and tokenized at a time
CHUNK_TOKENS = 2**21  # packed tokens built and written at a time (one record batch): bounds the build's memory
EXAMPLE_COLUMNS = ["system", "user", "assistant", "task_name", "source_id"]
# An example batch also carries `index`: the example's place in the stage (packing breaks length ties by it).
EXAMPLE_SCHEMA = pa.schema([(name, pa.string()) for name in EXAMPLE_COLUMNS] + [("index", pa.int64())])
Source = pa.Table | str | Path  # a table in memory, or a Parquet file (read batch by batch)

# What an example is made of: (columns read, projection) for source rows and for traces.
_FROM_SOURCE = (["inputs", "targets", "task_name", "id"],
                {"system": pc.scalar(""), "user": pc.field("inputs"), "assistant": pc.field("targets"),
                 "task_name": pc.field("task_name"), "source_id": pc.field("id")})
_FROM_TRACE = (["student_system", "user", "response", "task_name", "source_id"],
               {"system": pc.coalesce(pc.field("student_system"), pc.scalar("")), "user": pc.field("user"),
                "assistant": pc.field("response"), "task_name": pc.field("task_name"),
                "source_id": pc.field("source_id")})


def _batches(source: Source, what: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """`columns` of `source`, ENCODE_BATCH rows at a time, in order (a Parquet file a row group at a time: Arrow's
    dataset scanner reads ahead, and its memory grows with the file)."""
    schema = source.schema if isinstance(source, pa.Table) else pq.read_schema(source)
    if missing := [name for name in columns if name not in schema.names]:
        raise ValueError(f"{what}: no column {', '.join(map(repr, missing))}")
    if isinstance(source, pa.Table):
        return iter(source.select(columns).to_batches(ENCODE_BATCH))
    return pq.ParquetFile(source).iter_batches(ENCODE_BATCH, columns=columns)


def _equal(**equal: str) -> pc.Expression:
    return reduce(lambda a, b: a & b, [pc.field(column) == value for column, value in equal.items()])


def _scan(source: Source, what: str, made_of: tuple[list[str], dict], among: dict[str, tuple[str, ...]] | None = None,
          **equal: str) -> Iterator[pa.RecordBatch]:
    """The rows of `source` whose columns equal `equal` (and whose `among` columns hold one of the values given),
    as examples (EXAMPLE_COLUMNS), in order, in batches."""
    read, projection = made_of
    among = among or {}
    where = reduce(lambda a, b: a & b, [pc.field(c).isin(list(v)) for c, v in among.items()], _equal(**equal))
    for batch in _batches(source, what, [*read, *equal, *among]):
        yield from ds.dataset(batch).to_batches(columns=projection, filter=where)


def _count(source: Source, what: str, **equal: str) -> int:
    """How many rows of `source` have columns equal to `equal` (reading those columns only)."""
    return sum(ds.dataset(batch).count_rows(filter=_equal(**equal)) for batch in _batches(source, what, [*equal]))


def _indexed(batches: Iterable[pa.RecordBatch], first: int = 0) -> Iterator[pa.RecordBatch]:
    """The batches with `index` first, first + 1, ... (their place in the stage)."""
    for batch in batches:
        if batch.num_rows:
            yield batch.append_column("index", pa.array(np.arange(first, first + batch.num_rows)))
            first += batch.num_rows


def _sampled(batches: Iterable[pa.RecordBatch], n: int, k: int, seed: int, first: int) -> Iterator[pa.RecordBatch]:
    """random.Random(seed).sample of k of the n rows of `batches`, read in order, each with `index` first + its
    place in the sample: the rows and order sample() picks from a list of them, without the list."""
    place = np.full(n, -1, np.int64)
    place[random.Random(seed).sample(range(n), k)] = np.arange(k)  # sample() picks by position only
    seen = 0
    for batch in batches:
        places = place[seen:seen + batch.num_rows]
        seen += batch.num_rows
        if (picked := places >= 0).any():
            yield batch.filter(pa.array(picked)).append_column("index", pa.array(places[picked] + first))


def stage_example_batches(stage: str, sources_train: Source, orca1: Source | None, orca2: Source | None,
                          replay_ratio: float, seed: int) -> Iterator[pa.RecordBatch]:
    """The examples of one curriculum stage (`flan`, `orca1` or `orca2`) as EXAMPLE_SCHEMA batches."""
    if stage == "flan":
        # FLAN's answers: Orca 1's prompts only (Orca 2's few-shot and math rows are the orca2 stage's to explain).
        return _indexed(_scan(sources_train, "sources", _FROM_SOURCE, among={"source": ORCA1_SOURCES}, split="train"))
    if stage == "orca1":
        if orca1 is None:
            raise ValueError("the orca1 stage needs Orca 1 traces")
        return _indexed(_scan(orca1, "orca1 traces", _FROM_TRACE, stage="orca1", teacher_role="assistant",
                              verdict="kept"))
    if stage == "orca2":
        if orca2 is None:
            raise ValueError("the orca2 stage needs Orca 2 traces")
        own = {"stage": "orca2", "verdict": "kept"}
        examples = _indexed(_scan(orca2, "orca2 traces", _FROM_TRACE, **own))
        if orca1 is None:
            return examples
        strong = {"stage": "orca1", "teacher_role": "strong", "verdict": "kept"}
        n_own, n_strong = _count(orca2, "orca2 traces", **own), _count(orca1, "orca1 traces", **strong)
        replay = _sampled(_scan(orca1, "orca1 traces", _FROM_TRACE, **strong), n_strong,
                          min(round(replay_ratio * n_own), n_strong), seed, first=n_own)
        return chain(examples, replay)
    raise ValueError(f"unknown stage data {stage!r}: expected flan, orca1 or orca2")


def stage_examples(stage: str, sources_train: Source, orca1: Source | None, orca2: Source | None,
                   replay_ratio: float, seed: int) -> list[dict[str, Any]]:
    """stage_example_batches as a list of example dicts, in stage order (small stages: tests, benches)."""
    batches = list(stage_example_batches(stage, sources_train, orca1, orca2, replay_ratio, seed))
    table = pa.Table.from_batches(batches, EXAMPLE_SCHEMA)
    return table.sort_by("index").select(EXAMPLE_COLUMNS).to_pylist()


def example_batches(examples: list[dict[str, Any]]) -> Iterator[pa.RecordBatch]:
    """A list of example dicts as EXAMPLE_SCHEMA batches, `index` their place in the list."""
    for start in range(0, len(examples), ENCODE_BATCH):
        part = [{**e, "index": start + k} for k, e in enumerate(examples[start:start + ENCODE_BATCH])]
        yield pa.RecordBatch.from_pylist(part, EXAMPLE_SCHEMA)


def _messages(example: dict[str, Any]) -> list[dict[str, str]]:
    return student_chat(example["system"], example["user"]) + [{"role": "assistant", "content": example["assistant"]}]


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


def _first_label(batch: BatchEncoding, index: int, start: int, end: int, example: dict[str, Any]) -> int:
    """The first token that holds a character of the labelled span [start, end) of text `index`.

    The fast tokenizer's character-to-token alignment (its offsets) finds it,
    without building every token's offsets as Python tuples."""
    for char in range(start, end):  # the first character, unless the tokenizer maps it to no token
        token = batch.char_to_token(index, char)
        if token is not None:
            return token
    raise ValueError(f"example {example.get('source_id')!r}: no token holds the assistant turn")


def _tokenize(tokenizer: PreTrainedTokenizerFast, examples: list[dict[str, Any]]) -> list[tuple[list[int], int]]:
    """Each conversation tokenized whole, in one batch call: (the ids inference sees, the first labelled token).

    Tokenized apart, a SentencePiece answer would start with a "▁" token it never
    has after the prompt. The labels start at the token holding the assistant
    span's first character (a token straddling the span is learnt)."""
    texts = _chat_texts(tokenizer, examples)
    batch = tokenizer([text for text, _ in texts], add_special_tokens=False)
    return [(ids, _first_label(batch, i, start, len(text), example))
            for i, ((text, start), ids, example) in enumerate(zip(texts, batch["input_ids"], examples))]


def _kept_length(n_tokens: int, n_prompt: int, max_len: int, overlong: str) -> int | None:
    """How many of an example's tokens are trained on: all, the first max_len (truncated), or None (dropped)."""
    if n_tokens <= max_len:
        return n_tokens
    if overlong == "drop" or n_prompt >= max_len:  # truncation would leave nothing to learn
        return None
    return max_len


def encode(tokenizer: PreTrainedTokenizerFast, example: dict[str, Any], max_len: int,
           overlong: str) -> dict[str, Any] | None:
    """{"input_ids", "labels", "truncated"} of one example, or None when it is dropped as overlong."""
    [(ids, n_prompt)] = _tokenize(tokenizer, [example])
    kept = _kept_length(len(ids), n_prompt, max_len, overlong)
    if kept is None:
        return None
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids[:kept], "labels": labels[:kept], "truncated": kept < len(ids)}


def _best_fit(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: each example, longest first (ties: lower index first), goes to the open bin it fills
    most tightly. Returns the examples in bin order and each bin's number of examples.

    Open bins are bucketed by remaining capacity; the distinct capacities (at
    most max_len of them) stay sorted, so a best fit is one bisect. Bins are
    numbered as they open and an example's bin is recorded in a numpy array,
    so a million examples cost a few arrays, not a list per bin."""
    by_length = np.argsort(-lengths, kind="stable")
    bin_of = np.empty(len(lengths), np.int32)  # bin of the k-th example placed
    capacities: list[int] = []  # sorted distinct remaining capacities of open bins
    by_capacity: dict[int, list[int]] = {}  # remaining capacity -> open bins
    n_bins = 0
    for start in range(0, len(lengths), 1 << 16):  # Python ints a slice at a time
        part = by_length[start:start + (1 << 16)]
        for k, (index, length) in enumerate(zip(part.tolist(), lengths[part].tolist()), start):
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
                capacity, bin_id, n_bins = max_len, n_bins, n_bins + 1
            bin_of[k] = bin_id
            left = capacity - length
            if left > 0:
                if left not in by_capacity:
                    by_capacity[left] = []
                    insort(capacities, left)
                by_capacity[left].append(bin_id)
    return by_length[np.argsort(bin_of, kind="stable")], np.bincount(bin_of, minlength=n_bins)


def pack(lengths: list[int] | np.ndarray, max_len: int) -> list[list[int]]:
    """Best-fit decreasing packing of examples of `lengths` tokens into bins of max_len: each bin's examples."""
    order, per_bin = _best_fit(np.asarray(lengths, dtype=np.int64), max_len)
    return [part.tolist() for part in np.split(order, np.cumsum(per_bin)[:-1])] if len(order) else []


def padded_efficiency(lengths: list[int], micro_batch_size: int) -> float:
    """Real / padded tokens when examples are batched in order, each batch padded to its longest."""
    padded = sum(len(batch) * max(batch) for batch in
                 (lengths[i:i + micro_batch_size] for i in range(0, len(lengths), micro_batch_size)))
    return sum(lengths) / padded if padded else 0.0


def _packed_batch(input_ids: np.ndarray, n_prompt: np.ndarray, sizes: np.ndarray,
                  per_row: np.ndarray) -> pa.RecordBatch:
    """Packed rows of examples (their ids concatenated, `sizes` tokens each, the first n_prompt unlabelled),
    per_row examples a row: position ids restart at each example."""
    example_bounds = np.concatenate([[0], np.cumsum(sizes)])
    row_bounds = example_bounds[np.concatenate([[0], np.cumsum(per_row)])]
    position_ids = np.arange(example_bounds[-1]) - np.repeat(example_bounds[:-1], sizes)
    labels = np.where(position_ids < np.repeat(n_prompt, sizes), IGNORE, input_ids).astype(np.int32)
    labelled = np.concatenate([[0], np.cumsum(labels != IGNORE)])[row_bounds]
    offsets = pa.array(row_bounds, pa.int32())
    return pa.record_batch([
        pa.ListArray.from_arrays(offsets, pa.array(input_ids, pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(labels)),
        pa.ListArray.from_arrays(offsets, pa.array(position_ids, pa.int32())),
        pa.array(per_row, pa.int32()),
        pa.array(np.diff(row_bounds), pa.int32()),
        pa.array(np.diff(labelled), pa.int32()),
    ], schema=PACKED_SCHEMA)


class _TokenSpill:
    """Examples' token ids appended to a file and read back by (start, size) with positioned reads."""

    def __init__(self, path: Path):
        self.file = open(path, "w+b")  # noqa: SIM115 (closed by close())
        self.written = 0  # tokens

    def append(self, ids: np.ndarray) -> int:
        """Write ids (int32); return where they start (in tokens)."""
        start = self.written
        self.file.write(ids.astype(np.int32).tobytes())
        self.written += len(ids)
        return start

    def read(self, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The examples at starts (tokens), sizes tokens each, concatenated."""
        self.file.flush()
        fd = self.file.fileno()
        parts = [os.pread(fd, 4 * size, 4 * start) for start, size in zip(starts.tolist(), sizes.tolist())]
        return np.frombuffer(b"".join(parts), np.int32)

    def close(self) -> None:
        self.file.close()


@dataclass
class _Encoded:
    """The kept examples in stage order: where their tokens start in the spill, how many, how many unlabelled."""
    starts: np.ndarray
    sizes: np.ndarray
    prompts: np.ndarray
    examples: int  # read, kept or not
    truncated: int
    by_task: Counter


def _encode_into(spill: _TokenSpill, examples: Iterable[pa.RecordBatch], tokenizer: PreTrainedTokenizerFast,
                 max_len: int, overlong: str) -> _Encoded:
    """Tokenize the examples a batch at a time, their kept tokens appended to the spill."""
    n_examples, truncated, by_task = 0, 0, Counter()
    places, starts, sizes, prompts = [], [], [], []  # a numpy array a batch
    for batch in examples:
        rows = batch.select(EXAMPLE_COLUMNS).to_pylist()
        n_examples += len(rows)
        kept, kept_ids = [], []
        for k, (ids, n_prompt) in enumerate(_tokenize(tokenizer, rows)):
            if (length := _kept_length(len(ids), n_prompt, max_len, overlong)) is not None:
                kept.append((k, length, n_prompt))
                kept_ids.append(ids[:length])
                truncated += length < len(ids)
                by_task[rows[k]["task_name"]] += 1
        if kept:
            at, lengths, n_prompt = (np.array(column, np.int32) for column in zip(*kept))  # < max_len
            start = spill.append(np.fromiter(chain.from_iterable(kept_ids), np.int32, int(lengths.sum())))
            places.append(batch["index"].to_numpy()[at])
            starts.append(start + np.concatenate([[0], np.cumsum(lengths)[:-1]]))
            sizes.append(lengths)
            prompts.append(n_prompt)
    stage_order = np.argsort(np.concatenate(places or [np.empty(0, np.int64)]), kind="stable")
    starts, sizes, prompts = (np.concatenate(a or [np.empty(0, dtype)])[stage_order]
                              for a, dtype in ((starts, np.int64), (sizes, np.int32), (prompts, np.int32)))
    return _Encoded(starts, sizes, prompts, n_examples, truncated, by_task)


def _write_rows(path: Path, spill: _TokenSpill, encoded: _Encoded, order: np.ndarray, per_bin: np.ndarray,
                bins: np.ndarray, max_len: int) -> tuple[int, int]:
    """Write the bins in `bins` order as packed rows, a chunk (one record batch) at a time, gathering each chunk's
    examples from the spill; returns (tokens, label tokens)."""
    bin_starts = np.concatenate([[0], np.cumsum(per_bin)])[:-1]
    tokens = labelled = 0
    step = max(1, CHUNK_TOKENS // max_len)  # rows a chunk
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA) as writer:
        for first in range(0, len(bins), step):
            chunk = bins[first:first + step]
            per_row = per_bin[chunk]
            within = np.arange(per_row.sum()) - np.repeat(np.cumsum(per_row) - per_row, per_row)
            members = order[np.repeat(bin_starts[chunk], per_row) + within]  # the chunk's examples, row by row
            sizes = encoded.sizes[members]
            packed = _packed_batch(spill.read(encoded.starts[members], sizes), encoded.prompts[members], sizes,
                                   per_row)
            writer.write_batch(packed)
            tokens += int(sizes.sum())
            labelled += int(pc.sum(packed["n_label_tokens"]).as_py())
    return tokens, labelled


def write_dataset(examples: Iterable[pa.RecordBatch], tokenizer: PreTrainedTokenizerFast, max_len: int,
                  overlong: str, seed: int, path: Path) -> dict[str, Any]:
    """Encode, pack and shuffle (by `seed`) one stage's examples (EXAMPLE_SCHEMA batches) into the Arrow IPC
    file `path`; returns the stats. Memory: a batch of examples, a chunk of rows, and a few numbers an example
    (their tokens wait in a temporary file beside `path`, on the disk that holds the dataset)."""
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=Path(path).parent) as tmp:
        spill = _TokenSpill(Path(tmp) / "tokens.i32")
        try:
            encoded = _encode_into(spill, examples, tokenizer, max_len, overlong)
            order, per_bin = _best_fit(encoded.sizes, max_len)
            shuffled = list(range(len(per_bin)))
            random.Random(seed).shuffle(shuffled)  # the rows' order (shuffle() moves items by position only)
            bins = np.array(shuffled, np.int64)
            tokens, labelled = _write_rows(Path(path), spill, encoded, order, per_bin, bins, max_len)
        finally:
            spill.close()
    per_row, kept = per_bin[bins], len(encoded.sizes)
    return {
        "examples": encoded.examples,
        "kept": kept,
        "truncated": encoded.truncated,
        "dropped_overlong": encoded.examples - kept,
        "rows": len(bins),
        "tokens": tokens,
        "packing_efficiency": tokens / (len(bins) * max_len) if len(bins) else 0.0,
        "examples_per_row": {"mean": float(per_row.mean()) if len(per_row) else 0.0,
                             "max": int(per_row.max()) if len(per_row) else 0},
        "label_tokens": labelled,
        "by_task": dict(sorted(encoded.by_task.items())),
    }


def build_dataset(examples: list[dict[str, Any]], tokenizer: PreTrainedTokenizerFast, max_len: int,
                  overlong: str, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """write_dataset of a list of examples, the packed rows returned as a table (small stages: tests, benches)."""
    with tempfile.TemporaryDirectory(prefix="orca-dataset-") as tmp:
        stats = write_dataset(example_batches(examples), tokenizer, max_len, overlong, seed, Path(tmp) / "packed")
        table = PackedRows(Path(tmp) / "packed").table()  # memory-mapped: stays readable once the file is gone
    return table, stats
