"""The source row: FLAN-v2's five columns plus gold answer and provenance."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orca_core.keys import sha256_text

FLAN_COLUMNS = ("inputs", "targets", "task_source", "task_name", "template_type")

SOURCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # sha256(task_name + normalized question)[:16]
        ("inputs", pa.string()),
        ("targets", pa.string()),
        ("task_source", pa.string()),  # FLAN-v2's spelling: CoT, NIv2, T0, Flan2021
        ("task_name", pa.string()),
        ("template_type", pa.string()),  # zs_opt, zs_noopt; fs_opt, fs_noopt for the few-shot builder's prompts
        ("sub_collection", pa.string()),  # cot, niv2, t0, flan2021 (math: math rows): picks Orca 1 system messages
        ("split", pa.string()),  # train | heldout
        ("answer", pa.string()),  # gold
        ("options", pa.list_(pa.string())),  # multiple choice options, [] otherwise
        ("multiple_choice", pa.bool_()),
        ("source", pa.string()),  # the row's origin: procedural | flan (zero-shot) | flan_few_shot | math
        ("generator", pa.string()),  # reasoning-gym dataset ("" for FLAN rows)
        ("metadata", pa.string()),  # JSON: generator metadata (what the oracle and scorers need)
    ]
)

# The origins of the Orca 1 pool: the rows the Orca 1 traces are asked for. Few-shot and math rows are
# Orca 2's additions, for the orca2 stage (which draws from every origin: sources.mixture).
ORCA1_SOURCES = ("procedural", "flan")

_SPACE = re.compile(r"\s+")
# FLAN's zero-shot-with-options templates end with an "OPTIONS:" dash list.
_DASH_OPTIONS = re.compile(r"(?:OPTIONS|Options|Choose from|Choices)\s*:?\s*\n((?:[ \t]*[-*][^\n]*(?:\n|$))+)")
_LETTER_OPTIONS = re.compile(r"^\s*\(?([A-J])[).:]\s+(.+?)\s*$", re.MULTILINE)


def normalize_question(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def row_id(task_name: str, question: str) -> str:
    return sha256_text(f"{task_name}\n{normalize_question(question)}")[:16]


def format_options(options: list[str]) -> str:
    return "OPTIONS:\n" + "\n".join(f"- {option}" for option in options)


def parse_options(inputs: str) -> list[str]:
    """Options of a multiple-choice prompt: FLAN's dash list, or lettered (A) ... lines."""
    dash = _DASH_OPTIONS.search(inputs)
    if dash:
        return [line.strip()[1:].strip() for line in dash.group(1).splitlines() if line.strip()]
    letters = _LETTER_OPTIONS.findall(inputs)
    if len(letters) >= 2 and [letter for letter, _ in letters] == [chr(65 + i) for i in range(len(letters))]:
        return [text for _, text in letters]
    return []


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


ROW_GROUP_ROWS = 65_536  # readers stream row group by row group: a 5M-prompt pool never decodes at once


def write_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table.cast(SOURCE_SCHEMA), path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
