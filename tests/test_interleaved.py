"""Equation (1) of `search/dp.py` against the interleaved 1F1B schedule as Megatron runs it.

The simulation is written here from Megatron-LM's `forward_backward_pipelining_with_interleaving`
(Narayanan et al. 2021, section 2.2), not from the search's code: rank r of p holds stages
r, r + p, r + 2p, ...; its forwards go in groups of p micro-batches per chunk, chunk 0 to
v - 1, its backwards chunk v - 1 to 0; it runs `(p - r - 1) * 2 + (v - 1) * p` forwards of
warm-up (1F1B: p - r - 1), then one forward and one backward at a time, then the remaining
backwards. Every rank runs its own order one op at a time; a forward waits for the stage
before's forward of its micro-batch, a backward for the stage after's backward (the last
stage's for its own forward). A forward takes a third of a stage's time per micro-batch, a backward two thirds.

With one heavy stage (a big-vocabulary head and its loss) the old equation (1),
`sum_k f_k / v + (m v - 1) max_k f_k`, charged every chunk slot at the head and priced
interleaving slower than 1F1B where the simulation says it is faster.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from galvatron_fx.plan import LayerStrategy
from galvatron_fx.search.dp import Problem, UnitOptions, solve, step_time
from galvatron_fx.search.stage_chain import step_time_bound


def megatron_order(rank: int, p: int, v: int, m: int) -> list[tuple[int, int, str]]:
    """(stage, micro-batch, "F" | "B") in the order rank `rank` runs them (m a multiple of p;
    v = 1: Megatron's 1F1B, p - rank - 1 forwards of warm-up)."""
    total = m * v
    warmup = min((p - rank - 1) * 2 + (v - 1) * p if v > 1 else p - rank - 1, total)

    def stage(k: int, forward: bool) -> int:
        chunk = (k % (p * v)) // p
        return (chunk if forward else v - 1 - chunk) * p + rank

    def micro_batch(k: int) -> int:
        return (k // (p * v)) * p + k % p

    order = [(stage(k, True), micro_batch(k), "F") for k in range(warmup)]
    for k in range(total - warmup):
        order.append((stage(k + warmup, True), micro_batch(k + warmup), "F"))
        order.append((stage(k, False), micro_batch(k), "B"))
    return order + [(stage(k, False), micro_batch(k), "B") for k in range(total - warmup, total)]


def simulate(stage_times: list[float], p: int, m: int) -> float:
    """The makespan of one step: `stage_times` per micro-batch, in chain order, p ranks."""
    n = len(stage_times)
    v = n // p
    orders = [megatron_order(r, p, v, m) for r in range(p)]
    length = {"F": [t / 3 for t in stage_times], "B": [2 * t / 3 for t in stage_times]}
    done: dict[tuple[int, int, str], float] = {}
    free, pos = [0.0] * p, [0] * p
    while len(done) < 2 * n * m:
        moved = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                k, i, kind = orders[r][pos[r]]
                if kind == "F":
                    dep = (k - 1, i, "F")
                else:
                    dep = (k + 1, i, "B") if k < n - 1 else (k, i, "F")
                if (kind, k) != ("F", 0) and dep not in done:
                    break
                start = max(free[r], done.get(dep, 0.0))
                free[r] = done[k, i, kind] = start + length[kind][k]
                pos[r] += 1
                moved = True
        assert moved, "the order deadlocks"
    return max(done.values())


@pytest.mark.parametrize(
    ("p", "v", "m"), [(2, 2, 4), (4, 2, 4), (4, 2, 8), (3, 3, 6), (4, 3, 8), (2, 4, 2), (35, 3, 70)]
)
def test_balanced_chunks_take_m_v_plus_p_minus_1_slots(p, v, m):
    f = 1.5
    want = (m * v + p - 1) * f
    assert simulate([f] * (p * v), p, m) == pytest.approx(want)
    assert step_time([f] * (p * v), m, v) == pytest.approx(want)


@pytest.mark.parametrize(
    ("p", "v", "m", "h"), [(4, 2, 8, 5.0), (4, 3, 8, 4.0), (2, 2, 4, 3.0), (5, 3, 10, 2.5)]
)
def test_a_heavy_head_is_paid_once_per_micro_batch(p, v, m, h):
    """Every stage 1 s but the last, h: the head's device runs m passes of its v - 1 light
    chunks and its head, m ((v - 1) + h), plus the p - 1 light slots of fill and drain; the
    other ranks wait on it. (p, v, m, h) = (4, 2, 8, 5): 8 (1 + 5) + 3 = 51, where the old
    (1) said 12 / 2 + (8 * 2 - 1) * 5 = 81."""
    times = [1.0] * (p * v - 1) + [h]
    want = m * ((v - 1) * 1.0 + h) + (p - 1) * 1.0
    assert simulate(times, p, m) == pytest.approx(want)
    assert step_time(times, m, v) == pytest.approx(want)


def test_one_chunk_per_device_keeps_gpipe_and_1f1b_time():
    # sum + (m - 1) slowest: 6 + 3 * 3
    assert step_time([3.0, 1.0, 2.0], 4, 1) == pytest.approx(15.0)
    assert step_time([2.0], 5, 1) == pytest.approx(10.0)


def test_one_heavy_stage_anywhere_is_never_priced_fast():
    """Near-balanced stages (+-10%), one of them 1-6x heavier, anywhere: (1) stays within
    [-1%, +14%] of the simulation (heavier in the middle of the chain (1) charges the head's
    price, a little more than the fill the simulation finds)."""
    rng = random.Random(0)
    ratios = []
    for _ in range(150):
        p, v = rng.choice([2, 3, 4, 8]), rng.choice([2, 3, 4])
        m = p * rng.choice([1, 2, 4])
        times = [rng.uniform(0.9, 1.1) for _ in range(p * v)]
        times[rng.randrange(p * v)] *= rng.uniform(1, 6)
        ratios.append(step_time(times, m, v) / simulate(times, p, m))
    assert min(ratios) >= 0.99 and max(ratios) <= 1.14


def test_a_heavy_round_on_every_device_is_not_priced_by_device_sums():
    """Chunk 1 of every rank 8 s, chunk 0 1 s (p = 4, m = 8): each rank holds 9 s per
    micro-batch, but the rounds are coupled and the simulation takes 109 s, slower than
    device sums say (8 * 9 + (36 - 9) / 2 = 85.5). (1) charges every slot at the second
    slowest stage: 36 / 2 + 15 * 8 + 7.5 * 0 = 138, an upper bound."""
    times = [1.0] * 4 + [8.0] * 4
    assert simulate(times, 4, 8) == pytest.approx(109.0)
    assert step_time(times, 8, 2) == pytest.approx(138.0)


def _layers_and_head(stages: int, chunks: int, m: int) -> Problem:
    """Six 1 s layers and a 3 s head, one candidate each, memory never binding."""

    def unit(key: str, time_s: float) -> UnitOptions:
        return UnitOptions(
            key=key,
            strategies=(LayerStrategy(),),
            time_s=np.array([time_s]),
            state_bytes=np.zeros(1),
            act_bytes=np.zeros(1),
            transient_bytes=np.zeros(1),
            layout=np.zeros(1, dtype=int),
            switch_s=np.zeros((1, 1)),
            p2p_s=np.zeros(1),
        )

    units = (*(unit("layer", 1.0) for _ in range(6)), unit("head", 3.0))
    return Problem(units, stages, chunks, m, (1.0,) * stages, 1e9, 1)


def test_interleaving_beats_1f1b_with_a_heavy_head():
    """p = 2, m = 4. 1F1B: two stages, the best [4 layers | 2 layers + head] = [4, 5]:
    9 + 3 * 5 = 24. Interleaved, v = 2: [2 | 2 | 2 | head] = [2, 2, 2, 3]: rank 1 runs
    4 (2 + 3) = 20 s of work plus one 2 s slot of fill and drain, 22; (1): 9 / 2 + 7 * 2 +
    3.5 * (3 - 2) = 22. The old (1) priced it 9 / 2 + 7 * 3 = 25.5 and kept 1F1B."""
    one = solve(_layers_and_head(2, 1, 4))
    interleaved = solve(_layers_and_head(4, 2, 4))
    assert one is not None and interleaved is not None
    assert one.time_s == pytest.approx(24.0)
    assert interleaved.stage_time_s == pytest.approx((2.0, 2.0, 2.0, 3.0))
    assert interleaved.time_s == pytest.approx(22.0)
    assert simulate(list(interleaved.stage_time_s), 2, 4) == pytest.approx(22.0)
    # the simulation agrees: 1F1B at its best cut is slower
    best_1f1b = min(simulate([k, 9.0 - k], 2, 4) for k in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    assert best_1f1b == pytest.approx(23.0) and interleaved.time_s < best_1f1b


def test_the_search_bound_never_exceeds_a_cut():
    """`step_time_bound` (what the outer loop prunes configurations with) from any cut's
    total and any unit no slower than its slowest stage stays at or below (1) of that cut,
    and equals it for balanced stages: (4 * 2 + 3 - 1) * 1.5 = 15 with p = 3, v = 2, m = 4."""
    rng = random.Random(1)
    for _ in range(2000):
        p, v = rng.randint(1, 6), rng.randint(1, 4)
        m = rng.randint(1, 12)
        times = [rng.uniform(0.1, 3.0) for _ in range(p * v)]
        if rng.random() < 0.5:
            times[rng.randrange(p * v)] *= rng.uniform(1, 8)
        unit = max(times) * rng.random()
        bound = step_time_bound(sum(times) * rng.uniform(0.8, 1), unit, p * v, m, v)
        assert bound <= step_time(times, m, v) * (1 + 1e-12)
    assert step_time_bound(9.0, 1.5, 6, 4, 2) == pytest.approx(15.0)
