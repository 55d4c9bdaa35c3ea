"""How many optimizer steps a curriculum stage takes: one formula for the trainer and `orca plan`.

A step consumes `rows_per_step` packed rows (micro-batch x gradient accumulation x
workers). An epoch rounds up (the trainer fills the last step by cycling the
epoch's permutation); a fixed `steps` budget replaces epochs, and the data cycles.
"""

from __future__ import annotations


def steps_per_epoch(n_rows: int, rows_per_step: int) -> int:
    return -(-n_rows // rows_per_step)


def optimizer_steps(n_rows: int, rows_per_step: int, epochs: int, max_steps: int | None = None) -> int:
    return max_steps or epochs * steps_per_epoch(n_rows, rows_per_step)
