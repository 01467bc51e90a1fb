"""A pipeline step as a timeline: every forward and backward of every micro-batch on every
stage, in the order the runtime's schedule runs them (torch's GPipe, 1F1B and interleaved
1F1B), timed from the search's per-micro-batch stage times. Pure; the plan report draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["BACKWARD_SHARE", "Box", "schedule_order", "simulate_schedule"]

BACKWARD_SHARE = 2 / 3
"""Of a stage's time per micro-batch, the backward's: the search prices forward and backward
together (`search/option_cost.py`), and a backward runs about two ops per forward op."""


class Box(NamedTuple):
    """One forward or backward of one micro-batch on one (virtual) stage."""

    stage: int
    """Position in the chain of stages; it runs on pipeline rank `stage % degree`."""
    micro_batch: int
    kind: str
    """"F" or "B"."""
    start_s: float
    end_s: float


def schedule_order(
    degree: int, chunks: int, micro_batches: int, schedule: str
) -> list[list[tuple[int, int, str]]]:
    """Per pipeline rank, the (stage, micro-batch, "F" | "B") it runs, in order."""
    p, v, m = degree, chunks, micro_batches
    if schedule in ("interleaved-1f1b", "interleaved-zb"):
        return [_interleaved(rank, p, v, m) for rank in range(p)]
    if v != 1:
        raise ValueError(f"schedule {schedule!r} runs one chunk per rank, not {v}")
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"unknown schedule {schedule!r}")
    out = []
    for k in range(p):
        # the runtime runs GPipe when 1F1B has fewer micro-batches than stages
        warmup = m if schedule == "gpipe" or m < p else min(p - k - 1, m)
        order = [(k, i, "F") for i in range(warmup)]
        for i in range(m - warmup):
            order += [(k, warmup + i, "F"), (k, i, "B")]
        out.append(order + [(k, i, "B") for i in range(m - warmup, m)])
    return out


def _interleaved(rank: int, p: int, v: int, m: int) -> list[tuple[int, int, str]]:
    """torch's ScheduleInterleaved1F1B order for one rank (depth first, rounds of p)."""
    per_round = m // max(1, m // p)
    warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)
    seen: dict[tuple[int, str], int] = {}

    def op(step: int, kind: str) -> tuple[int, int, str]:
        chunk = (step // per_round) % v
        if kind == "B":
            chunk = v - 1 - ((step - warmup) // per_round) % v
        stage = chunk * p + rank
        seen[stage, kind] = seen.get((stage, kind), 0) + 1
        return (stage, seen[stage, kind] - 1, kind)

    order = [op(s, "F") for s in range(warmup)]
    for s in range(warmup, m * v):
        order += [op(s, "F"), op(s, "B")]
    return order + [op(s, "B") for s in range(m * v, m * v + warmup)]


def simulate_schedule(
    stage_times_s: Sequence[float],
    micro_batches: int,
    schedule: str,
    degree: int,
    backward_share: float = BACKWARD_SHARE,
) -> list[Box]:
    """Every box of one step: each rank runs `schedule_order` in order, a forward waits for
    the stage before's forward of its micro-batch, a backward for the stage after's backward
    (the last stage's for its own forward). Communication adds nothing: the search puts it
    inside the stage times."""
    n = len(stage_times_s)
    if degree < 1 or n % degree:
        raise ValueError(f"{n} stage times do not split over {degree} pipeline ranks")
    orders = schedule_order(degree, n // degree, micro_batches, schedule)
    length = {
        "F": [t * (1 - backward_share) for t in stage_times_s],
        "B": [t * backward_share for t in stage_times_s],
    }
    done: dict[tuple[int, int, str], float] = {}
    free, pos = [0.0] * degree, [0] * degree
    boxes: list[Box] = []
    while len(boxes) < 2 * n * micro_batches:
        progressed = False
        for rank, order in enumerate(orders):
            while pos[rank] < len(order):
                k, i, kind = order[pos[rank]]
                dep = (k - 1, i, "F") if kind == "F" else (k + 1, i, "B")
                if kind == "B" and k == n - 1:
                    dep = (k, i, "F")
                if (kind, k) != ("F", 0) and dep not in done:
                    break
                start = max(free[rank], done.get(dep, 0.0))
                free[rank] = done[k, i, kind] = start + length[kind][k]
                boxes.append(Box(k, i, kind, start, free[rank]))
                pos[rank] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"schedule {schedule!r} deadlocks with these stages")
    return boxes
