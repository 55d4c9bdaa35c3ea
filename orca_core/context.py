"""What a step may need from outside `orca_core`: a fan-out runner, the request cache, a trainer, generation
engines, progress output.

Its own module so that every step builder can take a context without importing
the others' code: step keys digest the modules a builder reaches (`code_digest`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotation: the runner's code is not part of every step's digest
    from orca_core.teacher.runner import FanoutRunner

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    fanout: FanoutRunner | None = None
    request_cache: str | Path | None = None  # the request cache folder: a path or an fsspec URL (s3://...)
    trainer: Callable[[Any, Path | None], dict[str, Any]] | None = None  # (TrainJob, resume checkpoint) -> summary
    # (checkpoint, GenerationSettings, context length) -> a context manager holding the evaluation's engine(s)
    # (eval/backends.py OpenEngine); None: vLLM in a child process, HF in this one
    generator: Callable[[Path, Any, int], Any] | None = None
    work_root: Path | None = None  # <store>/.train-work: per-step folders that survive retries
    work_dir: Path | None = None  # this step's folder under work_root (set by run_step)
    sink: Callable[[int, int, str], None] = lambda done, total, line: log.info(line)
    retry_failed: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
