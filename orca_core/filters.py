"""The filter step: decide, for every teacher trace, whether the student learns from it.

Orca trains only on answers worth imitating: failed, empty, truncated or
refused calls teach nothing; a wrong final answer teaches a wrong method
(Orca 2 keeps only traces that match the gold answer where one can be
checked: numbers, options, labels, generator-scored rows; a free-form gold,
a title or a summary, is kept unchecked and counted); a prompt that appears
in an evaluation set would leak it; and
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
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash, MinHashLSH

from orca_core.answers import as_number, clean, extract, is_correct, normalize
from orca_core.recipe.models import FiltersConfig
from orca_core.traces import TRACE_SCHEMA

NUM_PERM, MINHASH_SEED, SHINGLE = 128, 1, 3
BATCH_ROWS = 20_000
TEMPLATE_TEXTS = 3  # an n-gram in this many distinct evaluation passages (or prompts) is template, not content
# A task's golds form a label set (sentiment, NLI, topic: gradable by equality) when it has at most
# LABEL_SET_MAX distinct answers and LABEL_SET_ROWS rows per distinct answer; titles, translations
# and summaries are nearly all distinct, so a free-form task never qualifies.
LABEL_SET_MAX, LABEL_SET_ROWS = 20, 5
CLOSED_LABELS = frozenset({"yes", "no", "true", "false"})
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
_OPTION_LETTER = re.compile(r"\(?[A-Z]\)?")
_NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial n-gram hash below wraps mod 2**64
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
    columns = ["id", "inputs", "options", "multiple_choice", "generator", "metadata", "task_name"]
    return {row["id"]: row for row in sources.select(columns).to_pylist()}


def label_set_tasks(sources: pa.Table) -> set[str]:
    """Tasks whose golds take at most LABEL_SET_MAX values, each over LABEL_SET_ROWS rows on average."""
    answers = pc.utf8_lower(pc.utf8_trim_whitespace(pc.fill_null(sources["answer"], "")))
    counts = pa.table({"task": sources["task_name"], "answer": answers}).group_by("task").aggregate(
        [("answer", "count_distinct"), ("answer", "count")])
    distinct, rows = counts["answer_count_distinct"], counts["answer_count"]
    small = pc.and_(pc.less_equal(distinct, LABEL_SET_MAX),
                    pc.greater_equal(rows, pc.multiply(distinct, LABEL_SET_ROWS)))
    return set(counts.filter(small)["task"].to_pylist())


class _GoldCheck:
    """Grades a trace's final answer where the scorer can: "right", "wrong", "unchecked" or None (no gold).

    Gradable golds: rows with options or a generator (scored by it), numbers, option letters,
    yes/no/true/false, and the golds of label-set tasks. Anything else is free-form text that
    equality would fail on a correct paraphrase, so it is left unchecked.
    """

    def __init__(self, sources: pa.Table):
        self.lookup = _source_lookup(sources)
        self.labels = label_set_tasks(sources)

    def gradable(self, gold: str, source: dict[str, Any]) -> bool:
        if source.get("generator") or source.get("options") or source.get("multiple_choice"):
            return True
        return (source.get("task_name") in self.labels or as_number(gold) is not None
                or normalize(gold) in CLOSED_LABELS or _OPTION_LETTER.fullmatch(clean(gold)) is not None)

    def __call__(self, response: str, gold: str | None, source_id: str | None) -> str | None:
        if gold is None:
            return None
        source = self.lookup.get(source_id) or {}
        if not self.gradable(gold, source):
            return "unchecked"
        options, generator = source.get("options") or [], source.get("generator") or ""
        answer = extract(response, options).flexible
        right = is_correct(answer, gold, options=options, generator=generator,
                           metadata=source.get("metadata") or "{}", question=source.get("inputs") or "")
        return "right" if right else "wrong"


def _squash(text: str) -> str:
    """Whitespace-collapsed lowercase text (as sources.schema.normalize_question, faster)."""
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class EvalText:
    """An evaluation prompt, the (benchmark, task) group it belongs to, and the passage it quotes, if known."""

    text: str
    group: str = ""  # "<benchmark>/<task>": an n-gram in two groups is template text
    passage: str = ""  # DROP's passage, RACE's article, AGIEval's passage: shared by several prompts


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def _ngram_hashes(text: str, n: int) -> np.ndarray:
    """The distinct word n-grams of `text` as 64-bit hashes (stable across processes)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return np.empty(0, np.uint64)
    values = np.fromiter((_word_hash(w) for w in words), np.uint64, len(words))
    hashes = np.zeros(len(words) - n + 1, np.uint64)
    for j in range(n):
        hashes = hashes * _NGRAM_BASE + values[j:j + len(hashes)]
    return np.unique(hashes)


def _content_ngrams(texts: Sequence[EvalText], n: int) -> np.ndarray:
    """Sorted hashes of the n-grams that are content: in under TEMPLATE_TEXTS units, all of one group.

    A unit is a distinct passage (or, where none is known, a distinct prompt): a DROP passage
    asked about 14 times is one unit, so its n-grams stay content, while a task's instruction
    ("Answer the question based on the passage") recurs across units and is template; so is an
    n-gram that two groups share. A unit belongs to the group that first shows it.
    """
    units: dict[str, int] = {}
    groups: dict[str, int] = {}
    unit_group: list[int] = []
    hashes, owners = [], []
    for item in {(t.text, t.group, t.passage): t for t in texts}.values():
        unit = units.setdefault(_squash(item.passage or item.text), len(units))
        if unit == len(unit_group):
            unit_group.append(groups.setdefault(item.group, len(groups)))
        grams = _ngram_hashes(item.text, n)
        hashes.append(grams)
        owners.append(np.full(len(grams), unit, np.int64))
    if not hashes:
        return np.empty(0, np.uint64)
    gram, unit = np.concatenate(hashes), np.concatenate(owners)
    order = np.lexsort((unit, gram))
    gram, unit = gram[order], unit[order]
    first = np.ones(len(gram), bool)
    first[1:] = (gram[1:] != gram[:-1]) | (unit[1:] != unit[:-1])
    gram, unit = gram[first], unit[first]  # one (n-gram, unit) pair per unit that has it
    if not len(gram):
        return gram
    starts = np.flatnonzero(np.r_[True, gram[1:] != gram[:-1]])
    group = np.asarray(unit_group, np.int64)[unit]
    n_units = np.diff(np.r_[starts, len(gram)])
    one_group = np.minimum.reduceat(group, starts) == np.maximum.reduceat(group, starts)
    return gram[starts][(n_units < TEMPLATE_TEXTS) & one_group]


class _Contamination:
    """Word n-gram overlap with evaluation texts, or equality for prompts too short to share one.

    Template n-grams (see `_content_ngrams`: "Your task is to count how many legs there are in
    total when given a list of animals") are shared by every train question of the family too,
    so they are ignored; a passage's n-grams count however many questions it serves.
    """

    def __init__(self, texts: Sequence[str | EvalText], n: int, exact_texts: Sequence[str] = ()):
        self.n = n
        items = [t if isinstance(t, EvalText) else EvalText(t) for t in texts]
        self.exact = {_squash(t.text) for t in items} | {_squash(t) for t in exact_texts}
        self.grams = _content_ngrams(items, n)
        self.seen: dict[str, bool] = {}  # many traces share one prompt

    def _overlaps(self, user: str) -> bool:
        if not len(self.grams):
            return False
        grams = _ngram_hashes(user, self.n)
        at = np.searchsorted(self.grams, grams).clip(max=len(self.grams) - 1)
        return bool(np.any(self.grams[at] == grams))

    def __call__(self, user: str) -> bool:
        if user not in self.seen:
            self.seen[user] = _squash(user) in self.exact or self._overlaps(user)
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


def _stats(traces: pa.Table, verdicts: np.ndarray, unchecked: np.ndarray) -> dict[str, Any]:
    """Counts per reason, overall and per (stage, role); `unchecked`: kept rows whose free-form gold was not graded."""
    kept_unchecked = (verdicts == "kept") & unchecked

    def summary(rows: np.ndarray) -> dict[str, Any]:
        counts = Counter(verdicts[rows].tolist())
        dropped = {v.removeprefix("dropped:"): c for v, c in sorted(counts.items()) if v != "kept"}
        return {"total": int(rows.size), "kept": counts["kept"], "dropped": dropped,
                "unchecked": int(np.count_nonzero(kept_unchecked[rows]))}

    groups: dict[str, list[int]] = {}
    for i, (stage, role) in enumerate(zip(traces["stage"].to_pylist(), traces["teacher_role"].to_pylist())):
        groups.setdefault(f"{stage}/{role}", []).append(i)
    tasks = traces["task_name"].take(np.flatnonzero(kept_unchecked)).to_pylist()
    return {**summary(np.arange(len(verdicts))),
            "by_stage_role": {k: summary(np.asarray(v)) for k, v in sorted(groups.items())},
            "unchecked_by_task": dict(sorted(Counter(tasks).items()))}


class _LateChecks:
    """The checks that need each row in Python, in order; dedup ones remember kept rows."""

    def __init__(self, cfg: FiltersConfig, sources: pa.Table, contamination_texts: Sequence[str | EvalText],
                 exact_texts: Sequence[str] = ()):
        self.gold = _GoldCheck(sources) if cfg.gold_check else None
        self.unchecked: list[int] = []  # rows whose gold is free-form text
        self.contaminated = (_Contamination(contamination_texts, cfg.contamination_ngram, exact_texts)
                             if cfg.contamination_ngram is not None else None)
        self.seen: set[bytes] | None = set() if cfg.exact_dedup else None
        self.near = None if cfg.near_dup_threshold is None else _NearDuplicates(cfg.near_dup_threshold)

    def reason(self, index: int, row: dict[str, Any]) -> str | None:
        graded = self.gold(row["response"], row["reference"], row["source_id"]) if self.gold is not None else None
        if graded == "wrong":
            return "wrong_answer"
        if graded == "unchecked":
            self.unchecked.append(index)
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
    traces: pa.Table, cfg: FiltersConfig, sources: pa.Table, contamination_texts: Sequence[str | EvalText] = (),
    exact_texts: Sequence[str] = (),
) -> tuple[pa.Table, dict[str, Any]]:
    """The same rows in the same order with `verdict` set on each, and counts per reason.

    contamination_texts: evaluation items (`EvalText`s, or bare prompts: one group, no passages),
    checked by word n-gram overlap and by equality.
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

    unchecked = np.zeros(traces.num_rows, bool)
    unchecked[checks.unchecked] = True
    table = traces.set_column(TRACE_SCHEMA.get_field_index("verdict"), "verdict", pa.array(verdicts, pa.string()))
    return table, _stats(traces, verdicts, unchecked)
