"""Progress of long steps: Prefect log lines with rates and ETA, and a rich bar on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def progress_sink(logger: Any, step: str, log_every_s: float = 10.0) -> Callable[[int, int, str], None]:
    """A (done, total, line) callback: logs at most every `log_every_s`, draws a bar when attached to a TTY.
    A total of 0 means not known yet (a pass that counts): the bar spins, the line is logged as usual."""
    state = {"last": 0.0, "bar": None, "task": None}

    def sink(done: int, total: int, line: str) -> None:
        now = time.monotonic()
        if sys.stderr.isatty():
            if state["bar"] is None:
                state["bar"] = Progress(TextColumn(f"[bold]{step}"), BarColumn(), TextColumn("{task.description}"),
                                        TimeRemainingColumn(), transient=True)
                state["bar"].start()
                state["task"] = state["bar"].add_task(line, total=total or None)
            state["bar"].update(state["task"], completed=done, total=total or None, description=line)
            if 0 < total <= done:
                state["bar"].stop()
                state["bar"] = None
        if now - state["last"] >= log_every_s or 0 < total <= done:
            logger.info("%s: %s", step, line)
            state["last"] = now

    return sink
