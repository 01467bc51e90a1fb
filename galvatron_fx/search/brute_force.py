"""Exhaustive search for small problems: the oracle `tests/test_search.py` checks `dp.py` with.

It shares nothing with `dp.py` but the problem it is given (the per-unit cost tables of a
`Problem`): no bucketing, pricing or step-time helper of `dp.py` is called, so a bug in one
of those makes the two disagree. The arithmetic is written from `dp.py`'s module docstring
and `Problem`'s fields, in plain Python over plain lists:

- a bucket is `budget_bytes / (chunks * buckets)` bytes; a stage holds `buckets` of them;
- a candidate of a unit in stage k takes `ceil((state + in_flight[k] * act) / bucket)`
  buckets, and its transient `ceil(transient / bucket)` buckets rounded up to the next
  transient level; the levels are `transient_levels` when given, else the distinct
  transient bucket counts, at most three of them, evenly spaced over the sorted counts
  with the smallest and the largest kept (an index `(count - 1) / 2` rounds half to even);
- a stage fits when its units' buckets plus its largest transient level are at most
  `buckets`;
- a stage's time per micro-batch is the sum of its candidates' times, plus the
  boundary receive (`p2p_s` of its first candidate's layout) when it is not the first
  stage, plus a layout switch (`switch_s[previous layout, this layout]`) between every two
  adjacent units inside it;
- the step takes `sum_k f_k / v + (m v - 1) f_(2) + (m - 1/v) (f_(1) - f_(2))`, with
  `f_(1)` the slowest stage's time and `f_(2)` the second slowest's (0 with one stage)
  (equation (1) of `dp.py`).

Every cut of the units into the problem's stages and every assignment of a candidate to
every unit is priced in full. Exponential: a few units, a few candidates.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from galvatron_fx.search.dp import Problem

__all__ = ["Priced", "brute_force", "price"]

LEVELS = 3
"""Transient levels a problem distinguishes when it does not give its own."""


@dataclass(frozen=True)
class Priced:
    """One cut and assignment under the bucketed model."""

    time_s: float
    stage_time_s: tuple[float, ...]
    stage_buckets: tuple[int, ...]
    """Buckets each stage takes (its units' plus its largest transient level)."""
    bucket_bytes: float


class _Tables:
    """A problem's inputs as plain lists, and the bucket arithmetic on them."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.bucket = problem.budget_bytes / (problem.chunks * problem.buckets)
        units = problem.units
        self.times = [[float(t) for t in u.time_s] for u in units]
        self.layout = [[int(x) for x in u.layout] for u in units]
        self.switch = [[[float(x) for x in row] for row in u.switch_s] for u in units]
        self.p2p = [[float(x) for x in u.p2p_s] for u in units]
        self.state = [[float(x) for x in u.state_bytes] for u in units]
        self.act = [[float(x) for x in u.act_bytes] for u in units]
        raw = [[math.ceil(float(x) / self.bucket) for x in u.transient_bytes] for u in units]
        levels = self._levels([r for row in raw for r in row])
        self.transient = [[self._round_up(r, levels) for r in row] for row in raw]

    def _levels(self, raw: list[int]) -> list[int]:
        given = self.problem.transient_levels
        if given is not None:
            levels = sorted({int(x) for x in given})
            if raw and levels[-1] < max(raw):
                raise ValueError("transient_levels: the top level is below a candidate's transient")
            return levels
        distinct = sorted(set(raw)) or [0]
        if len(distinct) <= LEVELS:
            return distinct
        last = len(distinct) - 1
        return [distinct[round(k * last / (LEVELS - 1))] for k in range(LEVELS)]

    @staticmethod
    def _round_up(raw: int, levels: list[int]) -> int:
        return next(level for level in levels if level >= raw)

    def buckets(self, unit: int, cand: int, stage: int) -> int:
        a = float(self.problem.in_flight[stage])
        return math.ceil((self.state[unit][cand] + a * self.act[unit][cand]) / self.bucket)

    def stage(self, k: int, i: int, j: int, choice: tuple[int, ...]) -> tuple[float, int]:
        """(time per micro-batch, buckets) of units i..j-1 as stage k."""
        t = 0.0
        for u in range(i, j):
            t += self.times[u][choice[u]]
            if u == i:
                if i > 0:
                    t += self.p2p[u][self.layout[u][choice[u]]]
            else:
                before = self.layout[u - 1][choice[u - 1]]
                t += self.switch[u][before][self.layout[u][choice[u]]]
        held = sum(self.buckets(u, choice[u], k) for u in range(i, j))
        top = max(self.transient[u][choice[u]] for u in range(i, j))
        return t, held + top

    def price(self, starts: tuple[int, ...], choice: tuple[int, ...]) -> Priced | None:
        p = self.problem
        bounds = (*starts, len(p.units))
        times, buckets = [], []
        for k in range(p.stages):
            if bounds[k + 1] <= bounds[k]:
                return None
            t, b = self.stage(k, bounds[k], bounds[k + 1], choice)
            if b > p.buckets:
                return None
            times.append(t)
            buckets.append(b)
        m, v = p.micro_batches, p.chunks
        slowest = max(times)
        second = max(sorted(times)[:-1], default=0.0)
        total = sum(times) / v + (m * v - 1) * second + (m - 1 / v) * (slowest - second)
        return Priced(total, tuple(times), tuple(buckets), self.bucket)


def price(problem: Problem, starts: tuple[int, ...], choice: tuple[int, ...]) -> Priced | None:
    """One cut (`starts`: each stage's first unit) and assignment (a candidate index per
    unit), priced as the module docstring says; None when a stage does not fit."""
    return _Tables(problem).price(tuple(starts), tuple(choice))


def brute_force(problem: Problem, starts: tuple[int, ...] | None = None) -> float:
    """The optimal step time (inf when nothing fits), over every cut or the given one."""
    tables = _Tables(problem)
    n_units, n = len(problem.units), problem.stages
    if n > n_units:
        return float("inf")
    if starts is None:
        cuts = [(0, *c) for c in itertools.combinations(range(1, n_units), n - 1)]
    else:
        cuts = [tuple(starts)]
    every = list(itertools.product(*(range(len(u.strategies)) for u in problem.units)))
    best = float("inf")
    for cut in cuts:
        for choice in every:
            priced = tables.price(cut, choice)
            if priced is not None and priced.time_s < best:
                best = priced.time_s
    return best
