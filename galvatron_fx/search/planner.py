"""The outer search: pipeline degree, micro-batches and schedule around the dynamic program.

For every pipeline configuration (degree p dividing the world, chunks v for the interleaved
schedule, micro-batch count m dividing the batch, schedule) the units' candidates for a
stage of `world / p` devices are priced at the micro-batch size each implies
(`costs.option_cost`), dominated candidates are dropped per unit, and `dp.solve` picks
strategies and stage boundaries jointly. Configurations are visited in order of a lower
bound on their step time (every unit at its fastest candidate, perfectly balanced, memory
ignored) and the loop stops when the bound passes the best time found: the result is the
optimum over all configurations. Pure: the graph's part arrives as `ModelTerms`-like terms
through `TermSource`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.cost_models.memory import Precision
from galvatron_fx.cost_models.pipeline import in_flight_micro_batches
from galvatron_fx.plan import LayerStrategy, PipelineConfig, Plan, Schedule
from galvatron_fx.search.dp import (
    Problem,
    Solution,
    UnitOptions,
    lower_bound,
    pick_levels,
    solve,
)
from galvatron_fx.search.option_cost import (
    OptionCost,
    UnitTerms,
    boundary_bytes,
    option_cost,
    p2p_time_s,
    switch_time_s,
    with_tied_copy,
)
from galvatron_fx.search.stage_chain import step_time_bound
from galvatron_fx.search.strategies import (
    StorageLayout,
    candidates,
    divisors,
    dominated,
    layout_key,
    stages_fit_nodes,
    storage_layout,
)

__all__ = [
    "MAX_CHUNKS",
    "Config",
    "SearchSpace",
    "Searched",
    "TermSource",
    "configs",
    "search_space",
    "solve_config",
]


MAX_CHUNKS = 3
"""The most virtual stages (chunks) per device the search tries (`configs(chunks=...)` takes
any). v chunks leave 1/v of the 1F1B bubble: 3 remove two thirds, a fourth another twelfth,
about 1% of a step whose bubble is 12%, the resolution the search already ignores
(`baselines.UNIFORM_TOLERANCE`), while each chunk adds sends and activations in flight that
the configurations' lower bounds leave out, so most interleaved configurations get solved:
with v up to 4 the 175B / 1,024-device search took 25% longer (11.5 s against 9 s)."""


class TermSource(Protocol):
    """What the search needs of the model (`planning.model_terms.ModelTerms`)."""

    @property
    def units(self) -> tuple[str, ...]: ...

    @property
    def kinds(self) -> tuple[str, ...]: ...

    @property
    def representative(self) -> dict[str, str]: ...

    @property
    def model_fingerprint(self) -> str: ...

    @property
    def flops_per_sample(self) -> float: ...

    def tps(self) -> list[int]: ...

    def has(self, unit: str, s: LayerStrategy) -> bool: ...

    def unit_terms(self, unit: str, s: LayerStrategy) -> UnitTerms: ...


@dataclass(frozen=True)
class Config:
    """One pipeline configuration of the outer loop."""

    pipeline: int
    micro_batches: int
    schedule: Schedule
    chunks: int = 1

    @property
    def stages(self) -> int:
        return self.pipeline * self.chunks

    def in_flight(self) -> tuple[float, ...]:
        p, m, v = self.pipeline, self.micro_batches, self.chunks
        return tuple(in_flight_micro_batches(c % p, p, m, self.schedule, v) for c in range(p * v))


@dataclass(frozen=True)
class Searched:
    """The best plan of one configuration."""

    config: Config
    solution: Solution
    options: tuple[UnitOptions, ...]
    fixed: tuple[tuple[str, StorageLayout], ...] = ()
    """The storage layouts imposed on tied units (by representative) to find it: its
    options are those of `SearchSpace.with_layouts(dict(fixed))`."""

    def plan(self, terms: TermSource, world: int) -> Plan:
        units = terms.units
        strategies = tuple(
            (u, self.options[i].strategies[s])
            for i, (u, s) in enumerate(zip(units, self.solution.choice, strict=True))
        )
        c = self.config
        pipeline = PipelineConfig(
            degree=c.pipeline,
            stage_starts=tuple(units[i] for i in self.solution.stage_starts[1:]),
            micro_batches=c.micro_batches,
            schedule=c.schedule,
            virtual_stages=c.chunks,
        )
        return Plan(world, strategies, terms.model_fingerprint, pipeline)


def configs(
    world: int, units: int, global_batch: int, chunks: Sequence[int] | None = None
) -> list[Config]:
    """Every configuration the outer loop may try: a pipeline degree p dividing the world
    (at most one unit a stage; `SearchSpace.candidates` offers nothing for stages that
    straddle nodes), m micro-batches dividing the global batch (GPT-3's 1536 = 2^9 x 3
    gains 12% from m = 48 over the best power of two), and for the interleaved schedule
    (m a multiple of p, as Megatron's needs) v chunks per device from `chunks`, default
    every v from 2 to `MAX_CHUNKS` with p x v <= units."""
    out = []
    for p in divisors(world):
        if p > units:
            break
        vs = range(2, MAX_CHUNKS + 1) if chunks is None else chunks
        for m in divisors(global_batch):
            if p == 1:
                out.append(Config(1, m, Schedule.ONE_F_ONE_B))
                continue
            out.append(Config(p, m, Schedule.ONE_F_ONE_B))
            out.append(Config(p, m, Schedule.GPIPE))
            for v in vs:
                if m % p == 0 and p * v <= units:
                    out.append(Config(p, m, Schedule.INTERLEAVED_1F1B, v))
    return out


@dataclass
class SearchSpace:
    """Prices candidates for one model, cluster and batch, with caches across configs."""

    terms: TermSource
    cluster: ClusterSpec
    world: int
    global_batch: int
    budget_bytes: float
    precision: Precision = "mixed"
    allowed: Callable[[LayerStrategy, str], bool] | None = None
    """Restricts candidates (baselines): whether a strategy may be taken by a unit of this
    kind (`layer` or `segment`); None: every candidate."""
    buckets: int = 256
    _costs: dict[tuple[str, LayerStrategy, float, bool], OptionCost] = field(default_factory=dict)
    _levels: dict[Config, tuple[int, ...]] = field(default_factory=dict)
    """Transient levels per configuration, from every candidate (shared with restricted
    spaces, so a baseline's memory rounds as the search's does)."""
    _root: SearchSpace | None = None
    _cands: dict[tuple[int, str], list[LayerStrategy]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    ties: tuple[frozenset[str], ...] = ()
    """Units reading one weight (tied embeddings): every plan gives each group one
    `storage_layout`, pipeline stages or not (`solve_config`)."""
    fixed: Mapping[str, StorageLayout] = field(default_factory=dict)
    """Representative -> the only storage layout its candidates may take."""
    copies: Mapping[str, int] = field(default_factory=dict)
    """Unit -> parameters (whole) of the tied weights it reads after an earlier unit: with
    pipeline stages it holds its own copy of them (priced as if always in another stage)."""

    def restricted(self, allowed: Callable[[LayerStrategy, str], bool]) -> SearchSpace:
        """The same space with fewer candidates (priced costs shared)."""
        return SearchSpace(
            self.terms, self.cluster, self.world, self.global_batch, self.budget_bytes,
            self.precision, allowed, self.buckets, self._costs, self._levels,
            _root=self._root or self, ties=self.ties, fixed=self.fixed, copies=self.copies,
        )  # fmt: skip

    def with_layouts(self, fixed: Mapping[str, StorageLayout]) -> SearchSpace:
        """The same space with these representatives' storage layouts imposed."""
        if not fixed:
            return self
        merged = {**self.fixed, **fixed}
        return dataclasses.replace(self, fixed=merged, stats={}, _root=self._root or self)

    def ties_hold(self, found: Searched) -> bool:
        """Whether every tied group of `found` stores its weight in one layout."""
        layout = {
            u: storage_layout(found.options[i].strategies[c])
            for i, (u, c) in enumerate(zip(self.terms.units, found.solution.choice, strict=True))
        }
        return all(len({layout[u] for u in group}) == 1 for group in self.ties)

    def tie_layouts(self, stage_devices: int) -> list[dict[str, StorageLayout]]:
        """Every choice of one storage layout per tied group that all its units have a
        candidate in, on stages of `stage_devices`."""
        kinds = dict(zip(self.terms.units, self.terms.kinds, strict=True))
        rep = self.terms.representative
        per_group = [
            sorted(
                set.intersection(
                    *(
                        {
                            storage_layout(s)
                            for s in self.unit_candidates(u, kinds[u], stage_devices)
                        }
                        for u in sorted(group)
                    )
                )
            )
            for group in self.ties
        ]
        return [
            {rep[u]: layout for group, layout in zip(self.ties, chosen, strict=True) for u in group}
            for chosen in itertools.product(*per_group)
        ]

    def candidates(self, stage_devices: int, kind: str) -> list[LayerStrategy]:
        """The candidates of a stage of `stage_devices`: none where such stages would
        straddle a node (`stages_fit_nodes`), so every caller skips that pipeline degree."""
        key = (stage_devices, kind)
        if key not in self._cands:
            tps = set(self.terms.tps())
            dpn = self.cluster.devices_per_node
            found = (
                candidates(stage_devices, min(dpn, stage_devices), segment=kind == "segment")
                if stages_fit_nodes(self.world, stage_devices, dpn)
                else []
            )
            self._cands[key] = [
                s for s in found if s.tp in tps and (self.allowed is None or self.allowed(s, kind))
            ]
        return self._cands[key]

    def unit_candidates(self, unit: str, kind: str, stage_devices: int) -> list[LayerStrategy]:
        """The candidates priced for this unit (Ulysses only where its attention allows;
        the imposed storage layout only, if any)."""
        want = self.fixed.get(self.terms.representative[unit])
        return [
            s
            for s in self.candidates(stage_devices, kind)
            if self.terms.has(unit, s) and (want is None or storage_layout(s) == want)
        ]

    def cost(
        self, unit: str, s: LayerStrategy, micro_batch: float, pipelined: bool = False
    ) -> OptionCost:
        """`unit` under `s`; `pipelined`: in a plan with stages (tied copies held)."""
        rep = self.terms.representative[unit]
        copy = self.copies.get(unit, 0) if pipelined else 0
        key = (rep, s, micro_batch, copy > 0)
        if key not in self._costs:
            t = self.terms.unit_terms(unit, s)
            t = with_tied_copy(t, s, copy) if copy else t
            self._costs[key] = option_cost(t, s, micro_batch, self.cluster, self.precision)
        return self._costs[key]

    def problem(self, config: Config, prune: bool = True) -> Problem | None:
        """The configuration's DP instance (None when some unit has no candidate)."""
        d = self.world // config.pipeline
        m = config.micro_batches
        layouts: dict[tuple[int, int, bool], int] = {}
        reps: dict[int, LayerStrategy] = {}
        units: list[UnitOptions] = []
        built: dict[str, UnitOptions] = {}
        for unit, kind in zip(self.terms.units, self.terms.kinds, strict=True):
            rep = self.terms.representative[unit]
            if rep not in built:
                pipelined = config.pipeline > 1
                opts = self._unit_options(unit, kind, (d, m, pipelined), layouts, reps, prune)
                if opts is None:
                    return None
                built[rep] = opts
            units.append(built[rep])
        wired: dict[str, UnitOptions] = {}
        for k, unit in enumerate(self.terms.units):
            rep = self.terms.representative[unit]
            if rep not in wired:
                wired[rep] = self._with_switches(units[k], unit, config, layouts, reps)
            units[k] = wired[rep]
        return Problem(
            tuple(units),
            config.stages,
            config.chunks,
            m,
            config.in_flight(),
            self.budget_bytes,
            len(layouts),
            self.buckets,
            (self._root or self).transient_levels(config),
        )

    def transient_levels(self, config: Config) -> tuple[int, ...]:
        """The configuration's transient levels (buckets), from all its candidates, priced
        as the configuration's problem prices them (with stages, tied copies held)."""
        if config not in self._levels:
            d, m = self.world // config.pipeline, config.micro_batches
            pipelined = config.pipeline > 1
            transients = [0.0]
            kinds = dict(zip(self.terms.units, self.terms.kinds, strict=True))
            for unit in {self.terms.representative[u]: u for u in self.terms.units}.values():
                for s in self.unit_candidates(unit, kinds[unit], d):
                    if self.global_batch % (m * s.dp) == 0:
                        b = self.global_batch / (m * s.dp)
                        transients.append(self.cost(unit, s, b, pipelined).transient_bytes)
            bucket = self.budget_bytes / (config.chunks * self.buckets)
            raw = np.ceil(np.asarray(transients) / bucket).astype(np.int64)
            self._levels[config] = tuple(int(x) for x in pick_levels(raw))
        return self._levels[config]

    def problem_for(self, config: Config, strategies: Sequence[LayerStrategy]) -> Problem:
        """`config`'s DP instance with one option per unit, `strategies[i]` for the i-th unit
        (a given plan), priced as `problem` prices candidates (`cost`, `_with_switches`) but
        neither generated nor pruned: `dp.evaluate` on it with every choice 0 is the plan's
        step time and memory under the search's model. Layout switches are priced between
        the plan's own strategies, and its transients round to levels of their own.
        ValueError: a unit whose layout the terms lack or whose batch does not divide."""
        m, pipelined = config.micro_batches, config.pipeline > 1
        layouts: dict[tuple[int, int, bool], int] = {}
        reps: dict[int, LayerStrategy] = {}
        units: list[UnitOptions] = []
        for unit, s in zip(self.terms.units, strategies, strict=True):
            if not self.terms.has(unit, s) or self.global_batch % (m * s.dp):
                raise ValueError(f"unit {unit!r}: {s.short()} is not priced at m={m}")
            c = self.cost(unit, s, self.global_batch / (m * s.dp), pipelined)
            key = layout_key(s)
            reps.setdefault(layouts.setdefault(key, len(layouts)), s)
            one = np.array  # every table has one row: the plan's strategy
            units.append(
                UnitOptions(
                    (self.terms.representative[unit], s), (s,),
                    one([c.time_mb_s + c.step_s / m]), one([c.state_bytes]), one([c.act_bytes]),
                    one([c.transient_bytes]), one([layouts[key]]), np.zeros((0, 0)), np.zeros(0),
                )
            )  # fmt: skip
        wired = tuple(
            self._with_switches(u, unit, config, layouts, reps)
            for u, unit in zip(units, self.terms.units, strict=True)
        )
        return Problem(
            wired, config.stages, config.chunks, m, config.in_flight(), self.budget_bytes,
            len(layouts), self.buckets,
        )  # fmt: skip

    def _unit_options(self, unit, kind, at, layouts, reps, prune) -> UnitOptions | None:
        d, m, pipelined = at
        rows, picked = [], []
        for s in self.unit_candidates(unit, kind, d):
            if self.global_batch % (m * s.dp):
                continue
            c = self.cost(unit, s, self.global_batch / (m * s.dp), pipelined)
            rows.append((c.time_mb_s + c.step_s / m, c.state_bytes, c.act_bytes, c.transient_bytes))
            picked.append(s)
        if not picked:
            return None
        table = np.array(rows)
        keys = [layout_key(s) for s in picked]
        keep = ~dominated(table, keys) if prune else np.ones(len(picked), dtype=bool)
        for s, k in zip(picked, keys, strict=True):
            if k not in layouts:
                layouts[k] = len(layouts)
                reps[layouts[k]] = s
        order = sorted(np.flatnonzero(keep), key=lambda i: (layouts[keys[i]], i))
        self.stats["candidates"] = self.stats.get("candidates", 0) + len(picked)
        self.stats["after_dominance"] = self.stats.get("after_dominance", 0) + len(order)
        idx = np.array(order, dtype=int)
        return UnitOptions(
            key=self.terms.representative[unit],
            strategies=tuple(picked[i] for i in order),
            time_s=table[idx, 0],
            state_bytes=table[idx, 1],
            act_bytes=table[idx, 2],
            transient_bytes=table[idx, 3],
            layout=np.array([layouts[keys[i]] for i in order], dtype=int),
            switch_s=np.zeros((0, 0)),
            p2p_s=np.zeros(0),
        )

    def _with_switches(
        self, u: UnitOptions, unit: str, config: Config, layouts, reps
    ) -> UnitOptions:
        n = len(layouts)
        if u.switch_s.shape == (n, n):
            return u
        t = self.terms.unit_terms(unit, u.strategies[0])  # its own: boundary bytes are the unit's
        whole = boundary_bytes(t, self.global_batch / config.micro_batches, self.precision)
        switch = np.array(
            [
                [switch_time_s(whole, reps[a], reps[b], self.cluster) for b in range(n)]
                for a in range(n)
            ]
        )
        p2p = np.array(
            [
                p2p_time_s(whole, reps[a], self.cluster) if config.pipeline > 1 else 0.0
                for a in range(n)
            ]
        )
        return UnitOptions(
            u.key,
            u.strategies,
            u.time_s,
            u.state_bytes,
            u.act_bytes,
            u.transient_bytes,
            u.layout,
            switch,
            p2p,
        )

    def lower_bound(self, config: Config) -> float:
        """No configuration's step time beats this (every unit at its fastest, balanced)."""
        d, m, v, p = (
            self.world // config.pipeline,
            config.micro_batches,
            config.chunks,
            config.pipeline,
        )
        fastest: dict[str, float] = {}
        for unit, kind in zip(self.terms.units, self.terms.kinds, strict=True):
            rep = self.terms.representative[unit]
            if rep not in fastest:
                fastest[rep] = self._fastest(unit, kind, d, m)
        times = [fastest[self.terms.representative[u]] for u in self.terms.units]
        return step_time_bound(float(sum(times)), max(times), p * v, m, v)

    def _fastest(self, unit: str, kind: str, d: int, m: int) -> float:
        times = [
            self.cost(unit, s, self.global_batch / (m * s.dp)).time_mb_s
            for s in self.unit_candidates(unit, kind, d)
            if self.global_batch % (m * s.dp) == 0
        ]
        return min(times, default=np.inf)


def search_space(
    space: SearchSpace,
    config_list: Sequence[Config],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Searched | None, dict[str, Any]]:
    """The best configuration's plan, visiting configurations by lower bound."""
    start = time.perf_counter()
    twins = {
        (c.pipeline, c.micro_batches) for c in config_list if c.schedule is Schedule.ONE_F_ONE_B
    }
    # GPipe's time is 1F1B's (equation (1)) and every stage holds m micro-batches, never
    # fewer than 1F1B's min(p - k, m): its 1F1B twin dominates it (not even bounded)
    visit = [
        i
        for i, c in enumerate(config_list)
        if c.schedule is not Schedule.GPIPE or (c.pipeline, c.micro_batches) not in twins
    ]
    dominated = len(config_list) - len(visit)
    bounds = sorted((space.lower_bound(config_list[i]), i) for i in visit)
    best: Searched | None = None
    solved = 0
    for done, (bound, i) in enumerate(bounds):
        if progress:
            progress(done, len(bounds))
        if best is not None and bound >= best.solution.time_s:
            break
        problem = space.problem(config_list[i])
        if problem is None:
            continue
        bound = lower_bound(problem)  # inf: no cut fits even at the smallest candidates
        if bound == np.inf or (best is not None and bound >= best.solution.time_s):
            continue
        found = solve_config(space, config_list[i], problem)
        solved += 1
        if found is not None and (best is None or found.solution.time_s < best.solution.time_s):
            best = found
    if progress:
        progress(len(bounds), len(bounds))
    stats = {
        "configs": len(config_list),
        "solved": solved,
        "gpipe_dominated": dominated,
        "seconds": time.perf_counter() - start,
    }
    return best, stats


def solve_config(
    space: SearchSpace,
    config: Config,
    problem: Problem,
    starts: Sequence[int] | None = None,
    prune: bool = True,
) -> Searched | None:
    """The best plan of `problem` (`space`'s instance for `config`, built with `prune`)
    whose tied units store their weights alike. The dynamic program prices units apart, so
    its optimum may split a tie; then every choice of one layout per tied group is imposed
    and solved, and the fastest kept: exact, as every valid plan has one of them."""
    solution = solve(problem, starts)
    if solution is None:
        return None
    found = Searched(config, solution, problem.units, tuple(sorted(space.fixed.items())))
    if space.ties_hold(found):
        return found
    best: Searched | None = None
    for fixed in space.tie_layouts(space.world // config.pipeline):
        sub = space.with_layouts(fixed)
        space.stats["tied_layouts_solved"] = space.stats.get("tied_layouts_solved", 0) + 1
        sub_problem = sub.problem(config, prune)
        candidate = sub_problem and solve_config(sub, config, sub_problem, starts, prune)
        if candidate and (best is None or candidate.solution.time_s < best.solution.time_s):
            best = candidate
    return best
