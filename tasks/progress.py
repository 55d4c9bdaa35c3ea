"""Progress of long steps: Prefect log lines with rates and ETA, and a rich bar on a terminal."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

# One rich Progress for every step running at once: rich allows one live display per console.
_BARS: dict[str, Any] = {"progress": None, "open": 0}
_BARS_LOCK = threading.Lock()


def _bar_update(state: dict[str, Any], step: str, done: int, total: int, line: str) -> None:
    with _BARS_LOCK:
        if state["task"] is None:
            if _BARS["progress"] is None:
                _BARS["progress"] = Progress(TextColumn("[bold]{task.fields[step]}"), BarColumn(),
                                             TextColumn("{task.description}"), TimeRemainingColumn(), transient=True)
                _BARS["progress"].start()
            state["task"] = _BARS["progress"].add_task(line, total=total or None, step=step)
            _BARS["open"] += 1
        bars = _BARS["progress"]
        bars.update(state["task"], completed=done, total=total or None, description=line)
        if 0 < total <= done:
            bars.remove_task(state["task"])
            state["task"] = None
            _BARS["open"] -= 1
            if not _BARS["open"]:
                bars.stop()
                _BARS["progress"] = None


def progress_sink(logger: Any, step: str, log_every_s: float = 10.0) -> Callable[[int, int, str], None]:
    """A (done, total, line) callback: logs at most every `log_every_s`, draws a bar when attached to a TTY.
    A total of 0 means not known yet (a pass that counts): the bar spins, the line is logged as usual."""
    state = {"last": 0.0, "task": None}

    def sink(done: int, total: int, line: str) -> None:
        now = time.monotonic()
        if sys.stderr.isatty():
            _bar_update(state, step, done, total, line)
        if now - state["last"] >= log_every_s or 0 < total <= done:
            logger.info("%s: %s", step, line)
            state["last"] = now

    return sink
