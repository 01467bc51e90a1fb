"""Dynamic programming: per-unit strategies and pipeline stage boundaries, chosen together.

The problem (`Problem`) is a chain of units, each with candidate strategies priced per
micro-batch (`UnitOptions`), cut into `n` contiguous stages (pipeline degree x chunks). Stage
`k` holds `in_flight[k]` micro-batches of activations. With `f_k` a stage's time per
micro-batch, `f_(1)` the slowest stage and `f_(2)` the second slowest (0 with one stage),
the step takes

    T = sum_k f_k / v + (m v - 1) f_(2) + (m - 1/v) (f_(1) - f_(2))            (1)

(v chunks per device, m micro-batches). Every chunk slot of the steady state runs at the
second-slowest stage's pace; the slowest stage's excess over it is paid on its own device
only, once per micro-batch (m times, less the 1/v its fill and drain already count). For
v = 1 this is GPipe's and 1F1B's `sum_k f_k + (m - 1) f_(1)`; for balanced stages the
interleaved schedule's `(m v + p - 1) f`; with one heavy stage (a big-vocabulary head and its
loss) interleaving costs `m ((v - 1) f + h) + (p - 1) f`, what Megatron's interleaved order
takes (`tests/test_interleaved.py` simulates it). Per-device sums of chunk times would not do:
the rounds of chunks are coupled, so a second slow stage slows every slot (every device's
second chunk 8x its first, p = 4, m = 8: the simulation takes 109, device sums say 85.5,
(1) charges 138).

**Inside a stage** (units i..j-1, multiplier a = in_flight[k]) memory is counted in buckets of
`budget / (v * buckets)` bytes, every item rounded up (so a bucket-feasible plan fits the
bytes), and a transient term is taken once, as the stage's largest:

    V_i(s, M)  = t_i(s) + p2p_i(s)                if mem_a(i, s) <= M    (start of a stage)
    V_u(s, M)  = t_u(s) + min_{s'} [ V_{u-1}(s', M - mem_a(u, s)) + switch_u(s' -> s) ]
    f_k(i, j)  = min_{level L} min_s V_{j-1}(s, B - L)    over candidates with transient <= L

`V` is kept per layout class (the switch depends only on the layouts), vectorised over the
multipliers `a` and the transient levels. Repeated units share work: sweeps are memoised in
a trie keyed by the units' `key`s, so every distinct sequence of units is swept once.

**Across stages** (`stage_chain.py`): the cut minimising (1) over the tables `f_k(i, j)`,
exactly (the brute force in `brute_force.py` checks it). Ties go to the lower transient level,
then the earlier candidate, then the earlier layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from galvatron_fx.plan import LayerStrategy
from galvatron_fx.search.stage_chain import optimal_cut, step_time, step_time_bound

__all__ = [
    "Problem",
    "Solution",
    "UnitOptions",
    "balanced_cut",
    "bucketed",
    "evaluate",
    "fits_somehow",
    "lower_bound",
    "pick_levels",
    "solve",
    "stage_cost",
    "step_time",
]

MAX_LEVELS = 3
"""Transient levels the stage DP distinguishes (finer transients round up to a level)."""


@dataclass(frozen=True)
class UnitOptions:
    """One unit's candidates under one pipeline configuration."""

    key: Hashable
    """Units with equal keys have equal options and equal switch costs into them."""
    strategies: tuple[LayerStrategy, ...]
    time_s: np.ndarray
    """Per micro-batch, the unit's once-a-step work spread over the micro-batches."""
    state_bytes: np.ndarray
    act_bytes: np.ndarray
    """Per micro-batch in flight."""
    transient_bytes: np.ndarray
    layout: np.ndarray
    """Layout class index of each candidate (candidates sorted by it)."""
    switch_s: np.ndarray
    """(layouts x layouts): from the previous unit's layout into this unit's."""
    p2p_s: np.ndarray
    """Per layout: receiving a stage boundary here (activations in, gradients out)."""


@dataclass(frozen=True)
class Problem:
    units: tuple[UnitOptions, ...]
    stages: int
    """Pipeline degree x chunks."""
    chunks: int
    micro_batches: int
    in_flight: tuple[float, ...]
    """Micro-batches of activations each stage holds."""
    budget_bytes: float
    """Per device (a device holds `chunks` stages)."""
    layouts: int
    buckets: int = 256
    transient_levels: tuple[int, ...] | None = None
    """Buckets a stage's transient rounds up to; None: picked from these candidates. Give
    two problems of one configuration (a search and a baseline) the same levels so the
    rounding prices them alike."""


@dataclass(frozen=True)
class Solution:
    time_s: float
    stage_starts: tuple[int, ...]
    """Index of the first unit of every stage (the first is 0)."""
    choice: tuple[int, ...]
    """Candidate index per unit."""
    stage_time_s: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]
    """What the bucketed model charges each stage (upper bound of its bytes)."""
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Bucketed:
    """A problem's memory in buckets, shared by the DP and the brute force."""

    bucket_bytes: float
    capacity: int
    multipliers: np.ndarray
    """Distinct in-flight values; `stage_mult[k]` indexes them."""
    stage_mult: np.ndarray
    mem: list[np.ndarray]
    """Per unit: (multipliers x candidates) buckets of state + a * act."""
    level: list[np.ndarray]
    """Per unit: transient level index per candidate."""
    levels: np.ndarray
    """Buckets of each transient level."""


def bucketed(problem: Problem) -> Bucketed:
    bucket = problem.budget_bytes / (problem.chunks * problem.buckets)
    mults, stage_mult = np.unique(np.asarray(problem.in_flight, dtype=float), return_inverse=True)
    mem = [
        np.ceil((u.state_bytes[None, :] + mults[:, None] * u.act_bytes[None, :]) / bucket).astype(
            np.int64
        )
        for u in problem.units
    ]
    raw = [np.ceil(u.transient_bytes / bucket).astype(np.int64) for u in problem.units]
    if problem.transient_levels is not None:
        distinct = np.unique(np.asarray(problem.transient_levels, dtype=np.int64))
        if raw and distinct[-1] < max(int(r.max()) for r in raw):
            raise ValueError("transient_levels: the top level is below a candidate's transient")
    else:
        distinct = pick_levels(np.concatenate(raw) if raw else np.zeros(1, np.int64))
    level = [np.searchsorted(distinct, r, side="left") for r in raw]
    return Bucketed(bucket, problem.buckets, mults, stage_mult, mem, level, distinct)


def pick_levels(transients: np.ndarray) -> np.ndarray:
    """At most MAX_LEVELS of the distinct transient bucket counts, the largest included:
    every transient rounds up to the next level."""
    distinct = np.unique(transients)
    if len(distinct) > MAX_LEVELS:
        picks = np.linspace(0, len(distinct) - 1, MAX_LEVELS).round().astype(int)
        distinct = distinct[picks]
    return distinct


class _Sweeper:
    """Stage tables f(i, j) for every multiplier, by a depth-first walk of the trie of unit
    sequences (a parent's table is dropped once its children are done)."""

    def __init__(self, problem: Problem, b: Bucketed) -> None:
        self.p, self.b = problem, b
        self.cols = np.arange(b.capacity + 1)
        self.sweeps = 0
        self._cache: dict[Hashable, tuple[np.ndarray, ...]] = {}
        self._group_cache: dict[Hashable, list[tuple[int, int]]] = {}

    def tables(self) -> np.ndarray:
        """F[alpha, i, j]: best time of units i..j-1 as one stage (inf: does not fit)."""
        units = self.p.units
        n = len(units)
        F = np.full((len(self.b.multipliers), n + 1, n + 1), np.inf)
        trie: dict[tuple[int, Hashable], int] = {}
        members: dict[int, list[tuple[int, int]]] = {}
        children: dict[int, list[int]] = {}
        longest = n - self.p.stages + 1  # every other stage needs a unit
        for i in range(n):
            node = -1 - int(i > 0)  # two roots: the first stage, and stages after a boundary
            for j in range(i, min(n, i + longest)):
                key = (node, units[j].key)
                if key not in trie:
                    trie[key] = len(trie)
                    children.setdefault(node, []).append(trie[key])
                node = trie[key]
                members.setdefault(node, []).append((i, j))
        first_unit = {v: k[1] for k, v in trie.items()}
        order = {v: members[v][0][1] for v in members}  # a unit of each node (same key)
        for root in (-1, -2):
            self._walk(root, None, children, members, order, first_unit, F)
        return F

    def _walk(self, root, root_state, children, members, order, _keys, F) -> None:
        stack = [(c, root_state) for c in reversed(children.get(root, []))]
        while stack:
            node, parent = stack.pop()
            j = order[node]
            state = self.start(j, root == -2) if parent is None else self.extend(parent, j)
            self.sweeps += 1
            values = self.value(state)
            for i, jj in members[node]:
                F[:, i, jj + 1] = values
            kids = children.get(node, [])
            stack.extend((c, state) for c in sorted(kids, key=lambda c: -len(members[c])))

    def _prep(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Unit j's gather plan, shared by units with its key: times per level
        (S, levels), whether each candidate fits (S, A, M+1), flat indices into its layouts'
        padded table (S, levels, A, M+1), and its distinct layouts."""
        u = self.p.units[j]
        if u.key not in self._cache:
            n_levels = len(self.b.levels)
            levels = np.arange(n_levels)[None, :]
            times = np.where(self.b.level[j][:, None] <= levels, u.time_s[:, None], np.inf)
            width = self.b.capacity + 2
            shift = self.cols[None, None, :] - self.b.mem[j].T[:, :, None]  # (S, A, M+1)
            idx = np.where(shift >= 0, shift, width - 1)
            lays, local = np.unique(u.layout, return_inverse=True)
            A = shift.shape[1]
            lv = np.arange(n_levels)[None, :, None, None]
            a = np.arange(A)[None, None, :, None]
            flat = ((local[:, None, None, None] * n_levels + lv) * A + a) * width + idx[:, None]
            self._cache[u.key] = (times, shift >= 0, flat, lays)
        times, fits, flat, lays = self._cache[u.key]
        return times, fits, flat, lays

    def _groups(self, j: int) -> list[tuple[int, int]]:
        """Unit j's candidates of each layout, as [start, stop) (sorted by layout)."""
        key = self.p.units[j].key
        if key not in self._group_cache:
            cuts = [0, *(np.flatnonzero(np.diff(self.p.units[j].layout) != 0) + 1).tolist()]
            cuts.append(len(self.p.units[j].layout))
            self._group_cache[key] = list(itertools.pairwise(cuts))
        return self._group_cache[key]

    def start(self, j: int, p2p: bool) -> np.ndarray:
        """(candidates, levels, multipliers, M+1): unit j alone, first of its stage."""
        u = self.p.units[j]
        times, fits, _, _ = self._prep(j)
        if p2p:
            times = times + u.p2p_s[u.layout][:, None]
        return np.where(fits[:, None], times[:, :, None, None], np.inf)

    def extend(self, V: np.ndarray, j: int) -> np.ndarray:
        u = self.p.units[j]
        times, _, flat, lays = self._prep(j)
        prev_lays = self._prep(j - 1)[3]
        # min over each layout's candidates (sorted by layout; slices beat ufunc.reduceat)
        Y = np.stack([V[a:b].min(axis=0) for a, b in self._groups(j - 1)])
        switch = u.switch_s[np.ix_(prev_lays, lays)]
        X = np.min(Y[:, None] + switch[:, :, None, None, None], axis=0)  # (C, L, A, M+1)
        Xp = np.concatenate([X, np.full((*X.shape[:-1], 1), np.inf)], axis=-1)
        return np.take(Xp, flat) + times[:, :, None, None]

    def value(self, V: np.ndarray) -> np.ndarray:
        """Per multiplier: the best stage time within the budget, over levels."""
        cols = np.maximum(self.b.capacity - self.b.levels, -1)
        best = np.full(V.shape[2], np.inf)
        for lv, col in enumerate(cols):
            if col >= 0:
                best = np.minimum(best, V[:, lv, :, col].min(axis=0))
        return best


def solve(problem: Problem, starts: Sequence[int] | None = None) -> Solution | None:
    """The optimum of (1), or None when no assignment fits the budget. `starts` fixes the
    stage boundaries (the unit index where each stage begins)."""
    n_units, n = len(problem.units), problem.stages
    if n > n_units:
        return None
    b = bucketed(problem)
    if starts is not None:
        return _solve_fixed(problem, b, tuple(starts))
    sweeper = _Sweeper(problem, b)
    F = sweeper.tables()
    stage_F = F[b.stage_mult]  # (stages, U+1, U+1)
    found = optimal_cut(stage_F, problem.micro_batches, problem.chunks)
    if found is None:
        return None
    m, v = problem.micro_batches, problem.chunks
    starts, caps_tried = found
    choice, times, mems = _assign(problem, b, starts)
    stats = {"sweeps": sweeper.sweeps, "caps": caps_tried}
    return Solution(step_time(times, m, v), starts, choice, times, mems, stats)


def _solve_fixed(problem: Problem, b: Bucketed, starts: tuple[int, ...]) -> Solution | None:
    """With the cut fixed the stages are independent and (1) grows with every stage's time:
    each stage at its own optimum is the optimum."""
    bounds = [*starts, len(problem.units)]
    if len(starts) != problem.stages or any(j <= i for i, j in itertools.pairwise(bounds)):
        raise ValueError(
            f"starts {starts} do not cut {len(problem.units)} units into {problem.stages} stages"
        )
    choice: list[int] = []
    times, mems = [], []
    for k in range(problem.stages):
        picked = _stage_choice(problem, b, k, bounds[k], bounds[k + 1])
        if picked is None:
            return None
        t, mem = stage_cost(problem, b, k, bounds[k], picked)
        choice.extend(picked)
        times.append(t)
        mems.append(mem)
    T = step_time(times, problem.micro_batches, problem.chunks)
    return Solution(T, starts, tuple(choice), tuple(times), tuple(mems))


def _assign(
    problem: Problem, b: Bucketed, starts: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """Re-sweep each chosen stage keeping its tables, and walk back the choices."""
    bounds = [*starts, len(problem.units)]
    choice: list[int] = []
    times, mems = [], []
    for k in range(problem.stages):
        i, j = bounds[k], bounds[k + 1]
        picked = _stage_choice(problem, b, k, i, j)
        assert picked is not None, "a stage of the optimal cut has no fitting assignment"
        choice.extend(picked)
        t, mem = stage_cost(problem, b, k, i, picked)
        times.append(t)
        mems.append(mem)
    return tuple(choice), tuple(times), tuple(mems)


def _stage_choice(problem: Problem, b: Bucketed, k: int, i: int, j: int) -> list[int] | None:
    alpha = int(b.stage_mult[k])
    sub = _single_multiplier(b, alpha)
    sweeper = _Sweeper(problem, sub)
    state = sweeper.start(i, i > 0)  # (S, levels, 1, M+1)
    tables = [state[:, :, 0].transpose(1, 0, 2)]  # (levels, S, M+1)
    for u in range(i + 1, j):
        state = sweeper.extend(state, u)
        tables.append(state[:, :, 0].transpose(1, 0, 2))
    last = tables[-1]
    best, pick = np.inf, (0, 0)
    for lv, col in enumerate(b.capacity - b.levels):
        if col < 0:
            continue
        s = int(np.argmin(last[lv, :, col]))
        if last[lv, s, col] < best:
            best, pick = float(last[lv, s, col]), (lv, s)
    if not np.isfinite(best):
        return None
    lv, s = pick
    col = int(b.capacity - b.levels[lv])
    picked = [s]
    for u in range(j - 1, i, -1):
        unit, prev = problem.units[u], problem.units[u - 1]
        col -= int(sub.mem[u][0, s])
        V = tables[u - 1 - i][lv]  # (S_prev, M+1)
        lay = unit.layout[s]
        scores = V[:, col] + unit.switch_s[prev.layout, lay]
        s = int(np.argmin(scores))
        picked.append(s)
    return list(reversed(picked))


def _single_multiplier(b: Bucketed, alpha: int) -> Bucketed:
    return Bucketed(
        b.bucket_bytes,
        b.capacity,
        b.multipliers[alpha : alpha + 1],
        np.zeros(1, dtype=np.int64),
        [m[alpha : alpha + 1] for m in b.mem],
        b.level,
        b.levels,
    )


def stage_cost(
    problem: Problem, b: Bucketed, k: int, i: int, picked: list[int]
) -> tuple[float, float]:
    """(time per micro-batch, bucketed bytes) of one stage under the picked candidates."""
    alpha = int(b.stage_mult[k])
    t, buckets, top = 0.0, 0, 0
    for offset, s in enumerate(picked):
        u = problem.units[i + offset]
        t += float(u.time_s[s])
        if offset == 0:
            t += float(u.p2p_s[u.layout[s]]) if i > 0 else 0.0
        else:
            prev = problem.units[i + offset - 1]
            t += float(u.switch_s[prev.layout[picked[offset - 1]], u.layout[s]])
        buckets += int(b.mem[i + offset][alpha, s])
        top = max(top, int(b.levels[b.level[i + offset][s]]))
    return t, (buckets + top) * b.bucket_bytes


def evaluate(problem: Problem, starts: Sequence[int], choice: Sequence[int]) -> Solution | None:
    """A fixed cut and assignment under the same model (None when a stage does not fit)."""
    b = bucketed(problem)
    bounds = [*starts, len(problem.units)]
    times, mems = [], []
    for k in range(problem.stages):
        i, j = bounds[k], bounds[k + 1]
        if j <= i:
            return None
        t, mem = stage_cost(problem, b, k, i, list(choice[i:j]))
        if mem > b.capacity * b.bucket_bytes * (1 + 1e-12):
            return None
        times.append(t)
        mems.append(mem)
    T = step_time(times, problem.micro_batches, problem.chunks)
    return Solution(T, tuple(starts), tuple(choice), tuple(times), tuple(mems))


def lower_bound(problem: Problem, columns: int = 1024) -> float:
    """A step time no plan of `problem` beats: the units' fastest assignment whose memory,
    each item rounded down at the smallest multiplier and transients dropped, fits all stages'
    capacity together (a knapsack relaxation), spread as evenly over the stages as its
    slowest unit allows (`step_time_bound`)."""
    b = bucketed(problem)
    total_buckets = problem.stages * b.capacity
    scale = columns / total_buckets
    K = np.zeros(columns + 1)
    fastest = 0.0
    for j, u in enumerate(problem.units):
        mem = np.floor(b.mem[j].min(axis=0) * scale).astype(np.int64)
        shifted = np.full((len(mem), columns + 1), np.inf)
        for s, w in enumerate(mem):
            if w <= columns:
                shifted[s, w:] = K[: columns + 1 - w] + u.time_s[s]
        K = shifted.min(axis=0)
        fastest = max(fastest, float(u.time_s.min()))
    total = float(K[-1])
    if not np.isfinite(total) or not fits_somehow(problem, b):
        return float("inf")
    return step_time_bound(total, fastest, problem.stages, problem.micro_batches, problem.chunks)


def fits_somehow(problem: Problem, b: Bucketed | None = None) -> bool:
    """Whether some cut fits every stage with every unit at its smallest candidate (a
    necessary condition, cheap: the stages' bottleneck over cuts, on bucketed memory)."""
    b = b or bucketed(problem)
    least = [
        np.array([float(m[int(b.stage_mult[k])].min()) for m in b.mem])
        for k in range(problem.stages)
    ]
    return balanced_cut(least)[0] <= b.capacity


def balanced_cut(per_stage: Sequence[np.ndarray]) -> tuple[float, tuple[int, ...]]:
    """The cut of the units into `len(per_stage)` contiguous stages whose largest stage is
    smallest, stage k summing `per_stage[k]` over its units: (that largest sum, the stage
    starts)."""
    n_units, n = len(per_stage[0]), len(per_stage)
    G = np.full(n_units + 1, np.inf)
    G[0] = 0.0
    arg = np.zeros((n, n_units + 1), dtype=np.int64)
    upper = np.triu(np.ones((n_units + 1, n_units + 1), dtype=bool), 1)
    for k in range(n):
        prefix = np.concatenate([[0.0], np.cumsum(per_stage[k])])
        total = np.maximum(G[:, None], np.where(upper, prefix[None, :] - prefix[:, None], np.inf))
        arg[k] = np.argmin(total, axis=0)
        G = total[arg[k], np.arange(n_units + 1)]
    starts, j = [], n_units
    for k in range(n - 1, -1, -1):
        j = int(arg[k, j])
        starts.append(j)
    return float(G[-1]), tuple(reversed(starts))
