"""Row readers and per-benchmark converters: public schemas in, `Example`s out.

Readers turn a file, a folder or a hub dataset into `Row`s that remember where
they came from ("file:line" for JSON lines, "file: examples[i]" for JSON,
"file: row i" for Parquet and saved datasets), so a bad row fails with its
file, its row and the field at fault. Converters read the public schemas:

- gsm8k (openai/gsm8k): question, answer ending "#### 72"
- bbh (BIG-Bench Hard): <task>.json {"examples": [{input, target}]}, or rows {input, target[, task]}
- agieval (English MCQ jsonl): passage, question, options ["(A)...", ...], label "A"; task = file stem
- drop (ucinlp/drop): query_id, passage, question, answers_spans {spans, types};
  or the lm-eval / oe-eval processed rows: query_id, passage, question, answers [[span, ...], ...]
- crass (BIG-bench crass_ai task.json): input, target_scores {option: 0/1}
- race (ehovy/race): example_id, article, question, options [4], answer "A"
- mmlu (cais/mmlu): question, subject, choices [4], answer 0-3
- arc-challenge (allenai/ai2_arc): id, question, choices {text, label}, answerKey
- procedural-heldout: the `sources` artifact's heldout.parquet (orca_core/sources/schema.py)
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orca_core.eval.benchmarks import BBH_TASKS, BenchmarkDataError, BenchmarkSpec, Example

SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s?(.*)$")
_LETTER_PREFIX = re.compile(r"^\s*\(([A-Z])\)\s*(.*)$", re.DOTALL)
_GOLD_LETTER = re.compile(r"^\(?([A-Z])\)?$")
_INTEGER = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "file:line", "file: examples[i]", "file: row i" or "dataset[split] row i"
    stem: str  # the file's (or saved dataset folder's) name without suffix: the task of BBH and AGIEval files


# -- readers ---------------------------------------------------------------------


def read_path(path: Path, split: str | None, benchmark: str) -> list[Row]:
    if not path.exists():
        raise BenchmarkDataError(f"benchmark {benchmark}: {path} does not exist")
    if path.is_file():
        return _read_file(path)
    if _is_saved_dataset(path):
        return _read_saved(path, split)
    units = _data_units(path)
    if split:
        units = [u for u in units if _names_split(u.relative_to(path), split)]
    if not units:
        wanted = f" for split {split!r}" if split else ""
        raise BenchmarkDataError(f"benchmark {benchmark}: {path} holds no {'/'.join(SUFFIXES)} files "
                                 f"or saved datasets{wanted}")
    return [row for unit in units for row in (_read_saved(unit, split) if unit.is_dir() else _read_file(unit))]


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (
        (folder / "state.json").exists() and (folder / "dataset_info.json").exists())


def _data_units(folder: Path) -> list[Path]:
    """Data files and saved-dataset folders under `folder`, sorted by path; hidden names are skipped."""
    units = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            units += [entry] if _is_saved_dataset(entry) else _data_units(entry)
        elif entry.name.lower().endswith(SUFFIXES):
            units.append(entry)
    return units


def _names_split(relative: Path, split: str) -> bool:
    """A file or folder of that split: a path part named so, or a file named <split>[-_.]..."""
    return split in relative.parts[:-1] or re.match(rf"{re.escape(split)}([-_.]|$)", relative.name) is not None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_file(path: Path) -> list[Row]:
    name = path.name.lower()
    stem = _stem(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        rows = []
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    rows.append(Row(_json_object(line, f"{path}:{number}"), f"{path}:{number}", stem))
        return rows
    if name.endswith(".json"):
        data = _json_object(path.read_text(encoding="utf-8"), str(path), allow_list=True)
        if isinstance(data, dict):
            if not isinstance(data.get("examples"), list):
                raise BenchmarkDataError(f"{path}: expected {{\"examples\": [...]}} (BBH / BIG-bench) or a list of rows")
            data = data["examples"]
        return [Row(_as_dict(item, f"{path}: examples[{i}]"), f"{path}: examples[{i}]", stem)
                for i, item in enumerate(data)]
    if name.endswith(".parquet"):
        return [Row(item, f"{path}: row {i + 1}", stem) for i, item in enumerate(pq.read_table(path).to_pylist())]
    raise BenchmarkDataError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)} or a saved dataset folder)")


def _json_object(text: str, where: str, allow_list: bool = False) -> Any:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BenchmarkDataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    return data if allow_list and isinstance(data, list) else _as_dict(data, where)


def _as_dict(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_saved(folder: Path, split: str | None) -> list[Row]:
    import datasets

    data = datasets.load_from_disk(str(folder))
    if isinstance(data, datasets.DatasetDict):
        data, split = _pick_split(data, split, str(folder))
    return [Row(item, f"{folder}: row {i + 1}", folder.name) for i, item in enumerate(data.to_list())]


def _pick_split(data: Any, split: str | None, where: str) -> tuple[Any, str]:
    if split is None and len(data) == 1:
        split = next(iter(data))
    if split not in data:
        raise BenchmarkDataError(f"{where}: has splits {sorted(data)}; set `split:` to one of them"
                                 + (f" (not {split!r})" if split else ""))
    return data[split], split


def read_hub(spec: BenchmarkSpec) -> list[Row]:
    """The rows of a hub dataset at the commit its eval step is keyed on (`spec.hub_commit()`)."""
    import datasets

    benchmark, dataset, subset, split = spec.name, spec.dataset or "", spec.subset, spec.split
    try:
        data = datasets.load_dataset(dataset, subset, split=split, revision=spec.hub_commit())
    except Exception as error:  # offline, unpinned, unknown name, no such split: all end the same way
        raise BenchmarkDataError(
            f"benchmark {benchmark}: cannot load dataset {dataset!r}"
            f"{f' ({subset})' if subset else ''} from the hub: {type(error).__name__}: {error}. "
            "Without hub access, point `path:` at a local copy in the public schema "
            "(`make bench-data` fetches the real-offline suite into ./bench-data)") from error
    if isinstance(data, datasets.DatasetDict):
        data, split = _pick_split(data, split, dataset)
    stem = subset or dataset.rsplit("/", 1)[-1]
    return [Row(item, f"{dataset}[{split}] row {i + 1}", stem) for i, item in enumerate(data.to_list())]


def procedural_rows(sources_dir: Path | None) -> list[Row]:
    if sources_dir is None:
        raise BenchmarkDataError("benchmark procedural-heldout: needs the `sources` artifact folder (sources_dir)")
    path = Path(sources_dir) / "heldout.parquet"
    if not path.exists():
        raise BenchmarkDataError(f"benchmark procedural-heldout: {path} does not exist")
    return _read_file(path)


# -- fields and prompts ----------------------------------------------------------


def need(row: Row, name: str, kind: type | tuple[type, ...] = str) -> Any:
    value = row.data.get(name)
    if value is None:
        raise BenchmarkDataError(f"{row.where}: missing field {name!r} (the row has {sorted(row.data)})")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BenchmarkDataError(f"{row.where}: field {name!r} should be {expected}, got "
                                 f"{type(value).__name__} {str(value)[:80]!r}")
    return value


def bad(row: Row, name: str, why: str) -> BenchmarkDataError:
    return BenchmarkDataError(f"{row.where}: field {name!r} {why} (got {str(row.data.get(name))[:80]!r})")


def mc_prompt(question: str, options: list[str], passage: str | None = None) -> str:
    """[passage\\n\\n]question\\nOptions:\\n(A) ...\\n(B) ..."""
    block = "\n".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))
    parts = [passage.strip()] if passage and passage.strip() else []
    return "\n\n".join([*parts, f"{question.strip()}\nOptions:\n{block}"])


def _options(row: Row, name: str, values: Any) -> list[str]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise bad(row, name, "should be a non-empty list of strings")
    if len(values) > len(LETTERS):
        raise bad(row, name, f"has {len(values)} options; at most {len(LETTERS)} can be lettered")
    return [v.strip() for v in values]


def _letter(row: Row, name: str, value: Any, n_options: int) -> str:
    match = _GOLD_LETTER.match(value.strip()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_options:
        return LETTERS[value]
    if match is None or LETTERS.index(match.group(1)) >= n_options:
        raise bad(row, name, f"should name one of {n_options} options (a letter A-{LETTERS[n_options - 1]} or an index)")
    return match.group(1)


def _counter_ids(prefix_of: Callable[[Row], str]) -> Callable[[Row], str]:
    """Ids "<prefix>-<n>" numbered per prefix, for data without native ids."""
    counts: Counter[str] = Counter()

    def next_id(row: Row) -> str:
        prefix = prefix_of(row)
        counts[prefix] += 1
        return f"{prefix}-{counts[prefix] - 1}"
    return next_id


Pairs = list[tuple[Example, Row]]


# -- converters ------------------------------------------------------------------


def gsm8k(rows: list[Row]) -> Pairs:
    out = []
    for i, row in enumerate(rows):
        question, answer = need(row, "question"), need(row, "answer")
        if "####" not in answer:
            raise bad(row, "answer", "has no final '#### <number>' line")
        gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if not re.fullmatch(r"-?\d+(\.\d+)?", gold):
            raise bad(row, "answer", f"ends in {gold!r}, not a number")
        out.append((Example("gsm8k", "gsm8k", f"gsm8k-{i}", question.strip(), gold, "number"), row))
    return out


def bbh_options(text: str) -> list[str]:
    """The "(A) ..." lines after BBH's last "Options:" line (letters in order), else []."""
    head, sep, tail = text.rpartition("Options:\n")
    options = []
    for line in tail.splitlines() if sep else []:
        match = _OPTION_LINE.match(line.strip())
        if not match or match.group(1) != LETTERS[len(options)]:
            break
        options.append(match.group(2).strip())
    return options


def bbh(rows: list[Row]) -> Pairs:
    out = []
    next_id = _counter_ids(lambda row: str(row.data.get("task") or row.stem))
    for row in rows:
        text, target = need(row, "input"), need(row, "target", (str, int))
        task = str(row.data.get("task") or row.stem)
        if task not in BBH_TASKS:
            raise BenchmarkDataError(f"{row.where}: BBH task {task!r} is unknown: name files <task>.json or add a "
                                     f"'task' field with one of {', '.join(BBH_TASKS)}")
        target, options = str(target).strip(), bbh_options(text)
        if options:
            kind, gold = "mc", _letter(row, "target", target, len(options))
        else:
            kind, gold = ("number" if _INTEGER.match(target) else "text"), target
        out.append((Example("bbh", task, next_id(row), text, gold, kind, tuple(options)), row))
    return out


def agieval(rows: list[Row]) -> Pairs:
    out = []
    next_id = _counter_ids(lambda row: row.stem)
    for row in rows:
        question, label = need(row, "question"), need(row, "label", (str, list))
        options = [_LETTER_PREFIX.sub(r"\2", o).strip() for o in _options(row, "options", need(row, "options", list))]
        if isinstance(label, list):
            raise bad(row, "label", "is a list (multi-answer questions are not supported)")
        gold = _letter(row, "label", label, len(options))
        passage = row.data.get("passage")
        out.append((Example("agieval", row.stem, next_id(row), mc_prompt(question, options, passage), gold, "mc",
                            tuple(options)), row))
    return out


def _drop_answers(row: Row) -> list[str]:
    if "answers_spans" in row.data:
        spans = need(row, "answers_spans", dict).get("spans")
        if not isinstance(spans, list) or not spans:
            raise bad(row, "answers_spans", "should hold a non-empty 'spans' list")
        alternatives = [spans]
    elif "answers" in row.data:
        alternatives = need(row, "answers", list)
    else:
        raise BenchmarkDataError(f"{row.where}: missing field 'answers_spans' (ucinlp/drop) or 'answers' "
                                 f"(lm-eval) (the row has {sorted(row.data)})")
    texts = [", ".join(str(s).strip() for s in a) if isinstance(a, list | tuple) else str(a).strip()
             for a in alternatives]
    texts = list(dict.fromkeys(t for t in texts if t))
    if not texts:
        raise bad(row, "answers", "has no non-empty answer")
    return texts


def drop(rows: list[Row]) -> Pairs:
    out = []
    for row in rows:
        query_id, passage, question = need(row, "query_id"), need(row, "passage"), need(row, "question")
        gold, *aliases = _drop_answers(row)
        prompt = f"Passage: {passage.strip()}\nQuestion: {question.strip()}"
        out.append((Example("drop", "drop", query_id, prompt, gold, "text", aliases=tuple(aliases)), row))
    return out


def crass(rows: list[Row]) -> Pairs:
    out = []
    for i, row in enumerate(rows):
        question, scores = need(row, "input"), need(row, "target_scores", dict)
        options = _options(row, "target_scores", list(scores))
        best = [j for j, value in enumerate(scores.values()) if value == max(scores.values())]
        if len(best) != 1 or not max(scores.values()):
            raise bad(row, "target_scores", "should score exactly one option highest (1)")
        out.append((Example("crass", "crass", f"crass-{i}", mc_prompt(question, options), LETTERS[best[0]], "mc",
                            tuple(options)), row))
    return out


def race(rows: list[Row]) -> Pairs:
    out = []
    next_id = _counter_ids(lambda row: str(row.data.get("example_id")))
    for row in rows:
        need(row, "example_id")
        article, question = need(row, "article"), need(row, "question")
        options = _options(row, "options", need(row, "options", list))
        gold = _letter(row, "answer", need(row, "answer"), len(options))
        out.append((Example("race", "race", next_id(row), mc_prompt(question, options, article), gold, "mc",
                            tuple(options)), row))
    return out


def mmlu(rows: list[Row]) -> Pairs:
    out = []
    next_id = _counter_ids(lambda row: str(row.data.get("subject")))
    for row in rows:
        question, subject = need(row, "question"), need(row, "subject")
        options = _options(row, "choices", need(row, "choices", list))
        gold = _letter(row, "answer", need(row, "answer", (int, str)), len(options))
        out.append((Example("mmlu", subject, next_id(row), mc_prompt(question, options), gold, "mc",
                            tuple(options)), row))
    return out


def arc(rows: list[Row]) -> Pairs:
    out = []
    for row in rows:
        native_id, question, choices = need(row, "id"), need(row, "question"), need(row, "choices", dict)
        options = _options(row, "choices", choices.get("text"))
        labels = [str(label).strip() for label in choices.get("label") or []]
        if len(labels) != len(options):
            raise bad(row, "choices", f"has {len(options)} texts but {len(labels)} labels")
        key = str(need(row, "answerKey", (str, int))).strip()
        if key not in labels:
            raise bad(row, "answerKey", f"is not one of the labels {labels}")
        out.append((Example("arc-challenge", "arc-challenge", native_id, mc_prompt(question, options),
                            LETTERS[labels.index(key)], "mc", tuple(options)), row))
    return out


def procedural(rows: list[Row]) -> Pairs:
    out = []
    for row in rows:
        inputs, options = need(row, "inputs"), need(row, "options", list)
        out.append((Example("procedural-heldout", need(row, "task_name"), need(row, "id"), inputs, need(row, "answer"),
                            "procedural", tuple(options), generator=need(row, "generator"),
                            metadata=need(row, "metadata"), question=inputs), row))
    return out


CONVERTERS: dict[str, Callable[[list[Row]], Pairs]] = {
    "gsm8k": gsm8k, "bbh": bbh, "agieval": agieval, "drop": drop, "crass": crass, "race": race, "mmlu": mmlu,
    "arc-challenge": arc, "procedural-heldout": procedural,
}
