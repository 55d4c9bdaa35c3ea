"""The filter step: decide, for every teacher trace, whether the student learns from it.

Orca trains only on answers worth imitating: failed, empty, truncated or
refused calls teach nothing; a wrong final answer teaches a wrong method
(Orca 2 keeps only traces that match the gold answer where one can be
checked); a prompt that appears in an evaluation set would leak it; and
repeated or near-repeated traces over-weight one example. Every row keeps
its place and gets a verdict, "kept" or "dropped:<reason>", so the reasons
can be counted and audited; the first check that fires names the reason.

Cheap per-row checks run vectorised in Arrow; answer checks and dedup run
once per row in Python, the dedup ones in order, since "duplicate" means
"of an earlier kept row". Near duplicates use MinHash LSH, never all pairs.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash, MinHashLSH

from orca_core.answers import extract, is_correct
from orca_core.recipe.models import FiltersConfig
from orca_core.traces import TRACE_SCHEMA

NUM_PERM, MINHASH_SEED, SHINGLE = 128, 1, 3
BATCH_ROWS = 20_000
TEMPLATE_TEXTS = 3  # an n-gram in this many evaluation texts is template, not content
REFUSAL_HEAD = 200  # a refusal opens the response; later "I cannot ..." is usually reasoning
_APOSTROPHE = "(?:'|’)"
REFUSAL = "|".join([
    rf"I(?:{_APOSTROPHE}m| am) sorry, but I (?:can{_APOSTROPHE}?t|cannot|am unable|won{_APOSTROPHE}t)",
    rf"I (?:cannot|can{_APOSTROPHE}t|won{_APOSTROPHE}t) (?:help|assist|provide|answer|comply)",
    rf"As an AI(?: language model)?, I (?:cannot|can{_APOSTROPHE}t|am unable|do not|don{_APOSTROPHE}t)",
    rf"I(?:{_APOSTROPHE}m| am) unable to",
    r"I (?:must|have to) (?:decline|refuse)",
])
_WORD = re.compile(r"\w+")
_TOKEN = re.compile(r"\w+|[^\w\s]")  # shingles keep operators: "2 + 3" and "2 * 3" differ
_LATE_COLUMNS = ["source_id", "stage", "teacher_role", "student_system", "user", "reference", "response"]


def _mask(values: pa.ChunkedArray | pa.Array, default: bool = True) -> np.ndarray:
    return pc.fill_null(values, default).to_numpy(zero_copy_only=False)


def _cheap_checks(traces: pa.Table, cfg: FiltersConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(reason, mask) of the per-row checks that need no Python loop, in order."""
    response = pc.fill_null(traces["response"], "")
    length = pc.utf8_length(response)
    yield "failed", _mask(pc.not_equal(traces["status"], "ok"))
    yield "empty", _mask(pc.equal(pc.utf8_trim_whitespace(response), ""))
    if cfg.drop_truncated:
        yield "truncated", _mask(pc.equal(traces["finish_reason"], "length"), False)
    if cfg.drop_refusals:
        head = pc.utf8_slice_codeunits(response, 0, REFUSAL_HEAD)
        yield "refusal", _mask(pc.match_substring_regex(head, REFUSAL, ignore_case=True))
    yield "too_short", _mask(pc.less(length, cfg.min_response_chars))
    yield "too_long", _mask(pc.greater(length, cfg.max_response_chars))


def _source_lookup(sources: pa.Table) -> dict[str, dict[str, Any]]:
    columns = ["id", "inputs", "options", "generator", "metadata"]
    return {row["id"]: row for row in sources.select(columns).to_pylist()}


def _wrong_answer(response: str, gold: str | None, source: dict[str, Any] | None) -> bool:
    """Whether the gold is checkable and the response's (flexible) answer misses it."""
    source = source or {}
    options, generator = source.get("options") or [], source.get("generator") or ""
    if gold is None or not (generator or options or len(gold.split()) <= 5):
        return False
    answer = extract(response, options).flexible
    return not is_correct(answer, gold, options=options, generator=generator,
                          metadata=source.get("metadata") or "{}", question=source.get("inputs") or "")


def _squash(text: str) -> str:
    """Whitespace-collapsed lowercase text (as sources.schema.normalize_question, faster)."""
    return " ".join(text.split()).lower()


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class _Contamination:
    """Word n-gram overlap with evaluation texts, or equality for prompts too short to share one.

    An n-gram found in TEMPLATE_TEXTS or more evaluation texts is the task's template
    ("Your task is to count how many legs there are in total when given a list of
    animals"), shared by every train question of the family too, so it is ignored.
    """

    def __init__(self, texts: Sequence[str], n: int, exact_texts: Sequence[str] = ()):
        self.n = n
        ngram_texts = {_squash(t) for t in texts}
        self.exact = ngram_texts | {_squash(t) for t in exact_texts}
        counts = Counter(gram for text in ngram_texts for gram in _ngrams(text, n))
        self.grams = {gram for gram, count in counts.items() if count < TEMPLATE_TEXTS}
        self.seen: dict[str, bool] = {}  # many traces share one prompt

    def __call__(self, user: str) -> bool:
        if user not in self.seen:
            self.seen[user] = _squash(user) in self.exact or not self.grams.isdisjoint(_ngrams(user, self.n))
        return self.seen[user]


def _exact_key(row: dict[str, Any]) -> bytes:
    text = "\x00".join([row["teacher_role"] or "", row["stage"] or ""] + [
        _squash(row[c] or "") for c in ("student_system", "user", "response")])
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _shingles(text: str) -> list[bytes]:
    tokens = _TOKEN.findall(text.lower())
    width = min(SHINGLE, len(tokens))
    return list({" ".join(tokens[i:i + width]).encode() for i in range(len(tokens) - width + 1)})


class _NearDuplicates:
    """MinHash LSH over kept rows, one index per (stage, teacher_role)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.template = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, hashfunc=zlib.crc32)  # C-fast, deterministic
        self.indexes: dict[tuple[str, str], tuple[MinHashLSH, dict[int, np.ndarray]]] = {}

    def is_near_duplicate(self, key: int, group: tuple[str, str], text: str) -> bool:
        """Whether `text` is near an earlier kept text of its group; if not, it joins the group."""
        minhash = self.template.copy()
        minhash.update_batch(_shingles(text))
        if group not in self.indexes:
            self.indexes[group] = (MinHashLSH(self.threshold, NUM_PERM), {})
        lsh, kept = self.indexes[group]
        for candidate in lsh.query(minhash):
            if np.count_nonzero(kept[candidate] == minhash.hashvalues) / NUM_PERM >= self.threshold:
                return True
        lsh.insert(key, minhash, check_duplication=False)
        kept[key] = minhash.hashvalues
        return False


def _stats(traces: pa.Table, verdicts: np.ndarray) -> dict[str, Any]:
    def summary(values: Sequence[str]) -> dict[str, Any]:
        counts = Counter(values)
        dropped = {v.removeprefix("dropped:"): c for v, c in sorted(counts.items()) if v != "kept"}
        return {"total": len(values), "kept": counts["kept"], "dropped": dropped}

    groups: dict[str, list[str]] = {}
    for stage, role, verdict in zip(traces["stage"].to_pylist(), traces["teacher_role"].to_pylist(), verdicts):
        groups.setdefault(f"{stage}/{role}", []).append(verdict)
    return {**summary(list(verdicts)), "by_stage_role": {k: summary(v) for k, v in sorted(groups.items())}}


class _LateChecks:
    """The checks that need each row in Python, in order; dedup ones remember kept rows."""

    def __init__(self, cfg: FiltersConfig, sources: pa.Table, contamination_texts: Sequence[str],
                 exact_texts: Sequence[str] = ()):
        self.lookup = _source_lookup(sources) if cfg.gold_check else None
        self.contaminated = (_Contamination(contamination_texts, cfg.contamination_ngram, exact_texts)
                             if cfg.contamination_ngram is not None else None)
        self.seen: set[bytes] | None = set() if cfg.exact_dedup else None
        self.near = None if cfg.near_dup_threshold is None else _NearDuplicates(cfg.near_dup_threshold)

    def reason(self, index: int, row: dict[str, Any]) -> str | None:
        if self.lookup is not None and _wrong_answer(row["response"], row["reference"],
                                                     self.lookup.get(row["source_id"])):
            return "wrong_answer"
        if self.contaminated is not None and self.contaminated(row["user"] or ""):
            return "contaminated"
        key = _exact_key(row) if self.seen is not None else None
        if key is not None and key in self.seen:
            return "duplicate"
        group, text = (row["stage"], row["teacher_role"]), f"{row['user'] or ''}\n{row['response']}"
        if self.near is not None and self.near.is_near_duplicate(index, group, text):
            return "near_duplicate"
        if key is not None:
            self.seen.add(key)  # only kept rows make later ones duplicates
        return None


def filter_traces(
    traces: pa.Table, cfg: FiltersConfig, sources: pa.Table, contamination_texts: Sequence[str] = (),
    exact_texts: Sequence[str] = (),
) -> tuple[pa.Table, dict[str, Any]]:
    """The same rows in the same order with `verdict` set on each, and counts per reason.

    contamination_texts: evaluation items, checked by word n-gram overlap and by equality.
    exact_texts: items checked by equality only (the procedural held-out split: its family
    templates are shared with train by design, and the splits are already disjoint by question).
    """
    traces = traces.cast(TRACE_SCHEMA)
    verdicts = np.full(traces.num_rows, "", dtype=object)
    for reason, mask in _cheap_checks(traces, cfg):
        verdicts[mask & (verdicts == "")] = f"dropped:{reason}"

    checks = _LateChecks(cfg, sources, contamination_texts, exact_texts)
    pending = np.flatnonzero(verdicts == "")
    for start in range(0, len(pending), BATCH_ROWS):  # batches bound the Python copies of the text
        batch = pending[start:start + BATCH_ROWS]
        columns = {c: traces[c].take(batch).to_pylist() for c in _LATE_COLUMNS}
        for j, i in enumerate(batch.tolist()):
            reason = checks.reason(i, {c: values[j] for c, values in columns.items()})
            verdicts[i] = f"dropped:{reason}" if reason else "kept"

    table = traces.set_column(TRACE_SCHEMA.get_field_index("verdict"), "verdict", pa.array(verdicts, pa.string()))
    return table, _stats(traces, verdicts)
