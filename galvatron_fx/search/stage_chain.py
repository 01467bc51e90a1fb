"""Across stages: equation (1) of `dp.py` and the cut of the stage tables that minimises it.

For a cap `C` on every stage but one (that one may exceed it, its excess charged at (1)'s
rate), with `f_k(i, j)` stage k's time as units i..j-1:

    S0_C(k, j) = min_{i < j} S0_C(k-1, i) + f_k(i, j)                   with f_k(i, j) <= C
    S1_C(k, j) = min( min_i S1_C(k-1, i) + f_k(i, j)                     with f_k(i, j) <= C,
                      min_i S0_C(k-1, i) + f_k(i, j) + (m v - 1) (f_k(i, j) - C)^+ )

with S0_C(-1, 0) = 0, S1_C(-1, .) = inf, and T = min over caps C of S1_C(n-1, U) / v +
(m v - 1) C. A fixed cut is priced at every C >= f_(2) at least at (1), and at (1) for
C = f_(2) (a slot costs m v - 1 per unit of C, the excess only (m v - 1) / v), so the minimum
over caps is (1)'s optimum. Only caps in a window can win: at least the least second-slowest
stage over cuts (for v = 1 the bottleneck, as there the cap's place does not matter), at most
where `(S_min + (m v - 1) (B - C)^+) / v + (m v - 1) C` (S_min the least sum over cuts, B
the least slowest stage) reaches the best T found; every distinct `f` value in the window is
tried, so the result is exact for (1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bottlenecks", "cheapest_cut", "optimal_cut", "step_time", "step_time_bound"]


def step_time(stage_times: Sequence[float], micro_batches: int, chunks: int) -> float:
    """Equation (1): `stage_times` in chain order, `chunks` (v) of them per device."""
    m, v = micro_batches, chunks
    ordered = sorted(stage_times, reverse=True)
    slowest, second = ordered[0], (ordered[1] if len(ordered) > 1 else 0.0)
    return sum(ordered) / v + (m * v - 1) * second + (m - 1 / v) * (slowest - second)


def step_time_bound(
    total_s: float, slowest_s: float, stages: int, micro_batches: int, chunks: int
) -> float:
    """The least (1) of `stages` stage times that sum to at least `total_s`, one at least
    `slowest_s`: (1) grows with the sum and with both slowest stages, and the second slowest
    is at least the mean of the others; taking the slowest no larger than it must be is
    cheapest, as (1) charges it `m - 1/v` and the mean of the rest only `(m - 1/v) (v - 1) /
    (n - 1)` per second (n >= v)."""
    n, m, v = stages, micro_batches, chunks
    slowest = max(total_s / n, slowest_s)
    second = max(0.0, (total_s - slowest) / (n - 1)) if n > 1 else 0.0
    return total_s / v + (m * v - 1) * second + (m - 1 / v) * (slowest - second)


def optimal_cut(
    stage_F: np.ndarray, micro_batches: int, chunks: int
) -> tuple[tuple[int, ...], int] | None:
    """The stage starts of a cut minimising (1) over `stage_F[k, i, j]` (stage k's time as
    units i..j-1, inf where they do not fit), and the caps tried; None when no cut fits."""
    bottleneck, second = bottlenecks(stage_F)
    if not np.isfinite(bottleneck):
        return None
    m, v = micro_batches, chunks
    rate = m * v - 1  # a slot's, and (over v) the one stage's excess
    best_T, best_cap = np.inf, np.inf  # m v = 1: (1) is the sum alone, no cap
    s_min = cheapest_cut(stage_F, np.inf, 0)[0]
    lowest = bottleneck if v == 1 else second
    values = np.unique(stage_F[np.isfinite(stage_F) & (stage_F >= lowest)])
    caps_tried = 0
    for cap in values if rate > 0 else ():
        if (s_min + rate * max(bottleneck - cap, 0.0)) / v + rate * cap >= best_T:
            break
        total = cheapest_cut(stage_F, cap, rate)[0]
        caps_tried += 1
        T = total / v + rate * cap
        if best_T > T:
            best_T, best_cap = T, cap
    return cheapest_cut(stage_F, best_cap, rate)[1], caps_tried


def bottlenecks(F: np.ndarray) -> tuple[float, float]:
    """min over cuts of the slowest stage, and of the second slowest (0 with one stage)."""
    n, size = F.shape[0], F.shape[1]
    G = np.full(size, np.inf)
    G[0] = 0.0
    H = np.full(size, np.inf)  # one stage left out of the max
    for k in range(n):
        fits = np.isfinite(F[k])
        H = np.minimum(
            np.min(np.maximum(H[:, None], F[k]), axis=0),
            np.min(np.where(fits, G[:, None], np.inf), axis=0),
        )
        G = np.min(np.maximum(G[:, None], F[k]), axis=0)
    return float(G[-1]), float(H[-1])


def cheapest_cut(F: np.ndarray, cap: float, rate: float) -> tuple[float, tuple[int, ...]]:
    """(min over cuts of the sum of stage times plus `rate` times the one stage's excess
    over `cap`, every other stage <= cap; the stage starts): S1_C of the module docstring."""
    n, size = F.shape[0], F.shape[1]
    cols = np.arange(size)
    G0 = np.full(size, np.inf)
    G0[0] = 0.0
    G1 = np.full(size, np.inf)
    arg0 = np.zeros((n, size), dtype=np.int64)
    arg1 = np.zeros((n, size), dtype=np.int64)
    over = np.zeros((n, size), dtype=bool)  # S1 entered here: this stage is the one
    for k in range(n):
        capped = np.where(F[k] <= cap, F[k], np.inf)
        exceeding = F[k] if rate == 0 or cap == np.inf else F[k] + rate * np.maximum(F[k] - cap, 0)
        stay, enter = G1[:, None] + capped, G0[:, None] + exceeding
        a_stay, a_enter = np.argmin(stay, axis=0), np.argmin(enter, axis=0)
        over[k] = enter[a_enter, cols] < stay[a_stay, cols]
        arg1[k] = np.where(over[k], a_enter, a_stay)
        G1 = np.minimum(stay[a_stay, cols], enter[a_enter, cols])
        total = G0[:, None] + capped
        arg0[k] = np.argmin(total, axis=0)
        G0 = total[arg0[k], cols]
    starts, j, entered = [], size - 1, True
    for k in range(n - 1, -1, -1):
        if entered:
            entered = not over[k, j]
            j = int(arg1[k, j])
        else:
            j = int(arg0[k, j])
        starts.append(j)
    return float(G1[-1]), tuple(reversed(starts))
