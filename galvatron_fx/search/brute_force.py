"""Exhaustive search for small problems: the reference the dynamic program must agree with.

Tries every cut of the units into the problem's stages and every candidate for every unit,
prices each with the same bucketed memory as `dp.py` (the sum of the units' rounded-up
buckets plus the stage's largest transient level within its capacity) and the same step-time
equation, and returns the best time. Exponential: a few units, a few candidates.
"""

from __future__ import annotations

import itertools

from galvatron_fx.search.dp import Problem, bucketed, step_time

__all__ = ["brute_force"]


def brute_force(problem: Problem, starts: tuple[int, ...] | None = None) -> float:
    """The optimal step time (inf when nothing fits), over every cut or the given one."""
    b = bucketed(problem)
    n_units, n = len(problem.units), problem.stages
    if n > n_units:
        return float("inf")
    best = float("inf")
    every = itertools.combinations(range(1, n_units), n - 1)
    for cuts in every if starts is None else [starts[1:]]:
        bounds = (0, *cuts, n_units)
        # the stages are independent given the cut, but (1) mixes a sum and a max: try every
        # combination of the stages' fitting times, not only each stage's fastest
        options = [
            sorted(set(_stage_options(problem, b, k, bounds[k], bounds[k + 1]))) for k in range(n)
        ]
        for times in itertools.product(*options):  # empty when a stage cannot fit
            best = min(best, step_time(times, problem.micro_batches, problem.chunks))
    return best


def _stage_options(problem: Problem, b, k: int, i: int, j: int) -> list[float]:
    """Times of every fitting assignment of units i..j-1 as stage k."""
    alpha = int(b.stage_mult[k])
    units = problem.units[i:j]
    out = []
    for picks in itertools.product(*(range(len(u.strategies)) for u in units)):
        buckets = sum(int(b.mem[i + o][alpha, s]) for o, s in enumerate(picks))
        top = max(int(b.levels[b.level[i + o][s]]) for o, s in enumerate(picks))
        if buckets + top > b.capacity:
            continue
        t = float(units[0].time_s[picks[0]])
        if i > 0:
            t += float(units[0].p2p_s[units[0].layout[picks[0]]])
        for o in range(1, len(units)):
            before = units[o - 1].layout[picks[o - 1]]
            t += float(
                units[o].time_s[picks[o]] + units[o].switch_s[before, units[o].layout[picks[o]]]
            )
        out.append(t)
    return out
