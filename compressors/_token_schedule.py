"""What the two token schedules share (compressors/random_ltd.py, compressors/seqlen_warmup.py): the
linear ramp of a length from ``start`` to the full length, in multiples of ``multiple``, and the
checks of such a schedule against the run, made at plan time (one line, nothing written).

Both follow DeepSpeed's ``fixed_linear`` schedule (data efficiency library: ``random_ltd_schedule``
with ``min_value``, ``max_value``, ``require_steps``, ``seq_per_step``; curriculum learning's
``min_difficulty``, ``max_difficulty``, ``total_curriculum_step``, ``difficulty_step``): the value
grows linearly with the global step and is rounded *down* to a multiple of the step size (hardware
likes multiples of 8), never below the start, and is the full length from ``ramp_steps`` on.
Being a function of the global step alone, a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math
from typing import Any

from effml.compressors.base import RunContext
from effml.errors import EffmlError


def ramp_length(step: int, start: int, full: int, ramp_steps: int, multiple: int) -> int:
    """The length at ``step``: ``start`` at step 0, linear to ``full`` at ``ramp_steps``, floored to a
    multiple of ``multiple`` (but >= ``start``)."""
    if step >= ramp_steps or start >= full:
        return full
    value = start + (full - start) * step / ramp_steps
    return min(full, max(start, int(value // multiple) * multiple))


def run_steps(ctx: RunContext, datamodule: Any) -> int:
    """The optimizer steps of one plain training stage of this run (``trainer.max_epochs`` epochs of
    the training loader, under ``limit_train_batches``), as Lightning will count them."""
    from effml.compressors.imp import train_batches

    return ctx.trainer.max_epochs * train_batches(datamodule, ctx.trainer.limit_train_batches)


def resolve_ramp(field: str, given: int | None, default_fraction: float, steps: int) -> int:
    """``given`` steps, or ``default_fraction`` of the run's; a schedule longer than the run is one line."""
    if given is None:
        return max(1, math.ceil(default_fraction * steps))
    if given > steps:
        raise EffmlError(f"compressor.{field} ({given}) is longer than the run ({steps} training steps); "
                         f"choose at most {steps} (or raise trainer.max_epochs)")
    return given


def check_start(field: str, start: int, full: int, what: str) -> None:
    if start > full:
        raise EffmlError(f"compressor.{field} ({start}) is longer than the {what} ({full} tokens, data.seq_len); "
                         f"choose at most {full}")


def check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise EffmlError(f"compressor.{name} must be >= 1, got {value}")
