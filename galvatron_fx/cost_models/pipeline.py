"""Pipeline terms: the bubble, micro-batches in flight per stage, point-to-point volume.

With p stages and m micro-batches, GPipe and 1F1B both idle a fraction (p - 1) / m of the
ideal time (Narayanan et al. 2021, section 2.2); the interleaved schedule with v chunks per
rank divides it by v. These are for balanced stages: the search prices unbalanced ones by
equation (1) of `search/dp.py`, where one heavy stage costs only its own device. GPipe keeps
all m micro-batches' activations in flight; 1F1B keeps at most p - stage of them on stage
`stage` (0-based), interleaved 1F1B a little more. Written as sympy expressions, compiled to
numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy

from galvatron_fx.plan import Schedule

__all__ = ["BUBBLE", "bubble_fraction", "in_flight_micro_batches"]

p, m, v = sympy.symbols("stages micro_batches chunks", positive=True, integer=True)

BUBBLE: dict[Schedule, sympy.Expr] = {
    Schedule.GPIPE: (p - 1) / m,
    Schedule.ONE_F_ONE_B: (p - 1) / m,
    Schedule.INTERLEAVED_1F1B: (p - 1) / (m * v),
    Schedule.INTERLEAVED_ZB: (p - 1) / (m * v),
}
"""Idle time over ideal time, per schedule. Zero-bubble is priced as interleaved 1F1B, an
upper bound: how much of the bubble the deferred weight gradients fill is not modelled (the
search does not pick it; a user's plan may)."""

_BUBBLE: dict[Schedule, Callable[..., Any]] = {
    s: sympy.lambdify((p, m, v), e, "numpy") for s, e in BUBBLE.items()
}


def bubble_fraction(
    stages: int, micro_batches: int, schedule: Schedule | str, chunks: int = 1
) -> float:
    if stages == 1:
        return 0.0
    return float(_BUBBLE[Schedule(schedule)](stages, micro_batches, chunks))


def in_flight_micro_batches(
    stage: int, stages: int, micro_batches: int, schedule: Schedule | str, chunks: int = 1
) -> float:
    """Micro-batches whose activations stage `stage` holds at its peak."""
    schedule = Schedule(schedule)
    if schedule is Schedule.GPIPE:
        return float(micro_batches)
    warmup: float = stages - stage
    if schedule in (
        Schedule.INTERLEAVED_1F1B,
        Schedule.INTERLEAVED_ZB,
    ):  # Megatron: (p - stage) + (v - 1) p / v extra
        warmup = (stages - stage) + (chunks - 1) * stages / chunks
    return float(min(warmup, micro_batches))
