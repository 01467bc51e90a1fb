"""The search step: an analysed graph, a cluster and a budget in; the best plan out.

Reads: an `Analysis` (its layers and costs). Writes nothing on the graph: returns a
`SearchResult` holding the `Plan` (a plain value, passed on explicitly to the rewrite), what
the cost model predicts for it, the baselines priced by the same model, and per unit why it
got its strategy. Guarantees: the plan's stages fit `memory_budget_gb` under the search's
memory model (an upper bound of the three-moment peak, `search/costs.py`), and it is the
fastest plan of the candidate space under that model (`search/dp.py`, `search/planner.py`),
or the best single-strategy plan of the same configuration when that is within
`UNIFORM_TOLERANCE` (1%) of it (`baselines.simplest_within`: a gain below the model's
resolution is not worth a mix's layout switches). Units that read one parameter (tied
embeddings: T5's encoder, decoder and head) store it once, so the plan gives them one storage
layout and one pipeline stage, as `plan_checks` requires: such a model gets no pipeline
stages (the compiler cannot split a tied weight across stages), and the layout is searched.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galvatron_fx.cost_models.hardware import ClusterSpec, load_cluster
from galvatron_fx.cost_models.memory import Precision
from galvatron_fx.passes.search_costs import ModelTerms, model_terms
from galvatron_fx.plan import LayerStrategy, Plan, PlanError, save_json
from galvatron_fx.plan_checks import shared_weights, storage_layout
from galvatron_fx.search.baselines import UNIFORM_TOLERANCE, run_baselines, simplest_within
from galvatron_fx.search.explain import explain_units, smallest_memory
from galvatron_fx.search.planner import Searched, SearchSpace, configs, search_space
from galvatron_fx.search.space import dominance_counts, space_counts
from galvatron_fx.search.strategies import powers_of_two
from galvatron_fx.summary import layer_shapes

LOG = logging.getLogger("galvatron_fx.search")

__all__ = ["SearchResult", "run_search"]

GiB = 2**30


@dataclass(frozen=True)
class SearchResult:
    """The plan and what the search knows about it."""

    plan: Plan
    predicted: dict[str, Any]
    """step_time_s, samples_per_s, tflops_per_device, peak_memory_bytes (per stage), ..."""
    search_time_s: float
    baselines: dict[str, float | None]
    """Baseline name -> predicted samples/s (None: nothing of that family fits)."""
    units: list[dict[str, Any]] = field(default_factory=list)
    """Per unit: strategy, cost, runner-up and binding constraint (`explain`)."""
    stats: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    """What was searched for: cluster, world, budget, batch, precision."""
    baseline_plans: dict[str, Plan | None] = field(default_factory=dict)
    """Baseline name -> its best member as a runnable Plan (to measure it against `plan`)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_json(),
            "predicted": self.predicted,
            "search_time_s": self.search_time_s,
            "baselines": self.baselines,
            "setup": self.setup,
            "stats": self.stats,
            "units": self.units,
        }

    def save(self, path: str | Path) -> None:
        """Atomically, like `Plan.save`; `Plan.load` reads the plan back."""
        save_json(path, self.to_json())

    @property
    def samples_per_s(self) -> float:
        return float(self.predicted["samples_per_s"])


def run_search(
    analysis: Any,
    *,
    cluster: ClusterSpec | str,
    memory_budget_gb: float,
    global_batch: int,
    world_size: int | None = None,
    precision: Precision = "mixed",
    dtype: str = "bf16",
    baselines: bool = True,
    buckets: int = 256,
    max_pipeline: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    efficiency: float = 1.0,
    ulysses: bool = True,
) -> SearchResult:
    """Search `analysis` for `world_size` devices (default: the whole cluster) of `cluster`
    with `memory_budget_gb` per device and `global_batch` samples per step; `max_pipeline`
    caps the pipeline degree (1: no pipeline stages); `efficiency`: the fraction of the
    cluster's peak FLOP/s the layers reach (`plan_costs.measured_efficiency`); `ulysses`:
    False leaves Ulysses out of the candidates (the baselines keep it), to see what it adds."""
    spec = load_cluster(cluster) if isinstance(cluster, str) else cluster
    world = world_size or spec.nodes * spec.devices_per_node
    if world < 1 or world & (world - 1):
        raise PlanError(_world_error(world, analysis))
    _check_inputs(world, memory_budget_gb, global_batch, max_pipeline)
    if not 0 < efficiency <= 1:
        raise PlanError(
            f"search: efficiency is the fraction of peak FLOP/s the layers reach, in (0, 1]; "
            f"got {efficiency}"
        )
    if world > spec.nodes * spec.devices_per_node:
        raise PlanError(
            f"search: {world} devices but cluster {spec.name!r} has "
            f"{spec.nodes * spec.devices_per_node}; describe more nodes "
            f"(e.g. '{spec.name}:nodes={-(-world // spec.devices_per_node)}')"
        )
    start = time.perf_counter()
    tps = [t for t in powers_of_two(min(world, spec.devices_per_node))]
    terms = model_terms(analysis, spec, tps, dtype=dtype, efficiency=efficiency)
    budget = memory_budget_gb * GiB
    full = SearchSpace(terms, spec, world, global_batch, budget, precision, buckets=buckets)
    # without Ulysses: the same space restricted, so its memory levels (read off every
    # candidate) and hence its rounding are the full search's
    space = full if ulysses else full.restricted(_without_ulysses)
    tied = _tied_groups(analysis)
    cap = 1 if tied else max_pipeline  # a tied weight is stored once: in one stage
    tried = [
        c
        for c in configs(world, len(terms.units), global_batch)
        if cap is None or c.pipeline <= cap
    ]
    best, stats = search_space(space, tried, progress)
    best = _with_tied_layouts(space, tried, best, tied, stats)
    if best is None:
        raise PlanError(smallest_memory(space, memory_budget_gb))
    best = simplest_within(space, best, UNIFORM_TOLERANCE)
    elapsed = time.perf_counter() - start
    plan = best.plan(terms, world)
    predicted = _predicted(best, terms, space)
    priced = run_baselines(full) if baselines else []
    stats.update(space.stats, refused_tp=terms.refused)
    setup = {
        "cluster": spec.name,
        "world_size": world,
        "memory_budget_gb": memory_budget_gb,
        "global_batch": global_batch,
        "precision": precision,
        "max_pipeline": max_pipeline,
        "efficiency": efficiency,
    }
    units = explain_units(space, best)
    LOG.debug("search: %.2f s; %s", elapsed, ", ".join(f"{k} {v}" for k, v in stats.items()))
    rates = {r.name: (global_batch / r.time_s if r.time_s else None) for r in priced}
    plans = {r.name: r.searched.plan(terms, world) if r.searched else None for r in priced}
    return SearchResult(plan, predicted, elapsed, rates, units, stats, setup, plans)


def _without_ulysses(s: LayerStrategy) -> bool:
    return not s.ulysses


def _tied_groups(analysis: Any) -> list[frozenset[str]]:
    """Units that must store their weights alike: those sharing a parameter, transitively."""
    groups: list[set[str]] = []
    for units in shared_weights(analysis.graph_module):
        touching = [g for g in groups if g & units]
        groups = [g for g in groups if not g & units] + [set(units).union(*touching)]
    return [frozenset(g) for g in groups]


def _with_tied_layouts(
    space: SearchSpace,
    tried: list[Any],
    best: Searched | None,
    tied: list[frozenset[str]],
    stats: dict[str, Any],
) -> Searched | None:
    """The dynamic program prices units apart, so units sharing a weight may come out in
    different storage layouts. Then every combination of one layout per group is imposed
    and searched, and the fastest kept: exact, as every valid plan has one of them."""
    if best is None or _ties_hold(best, space, tied):
        return best
    layouts = [_common_layouts(space, group) for group in tied]
    rep = space.terms.representative
    found = []
    for chosen in itertools.product(*layouts):
        fixed = {rep[u]: layout for group, layout in zip(tied, chosen, strict=True) for u in group}
        sub = dataclasses.replace(
            space, terms=_FixedLayouts(space.terms, fixed), stats={}, _root=space._root or space
        )
        found.append(search_space(sub, tried)[0])
    stats["tied_layouts_searched"] = len(found)
    return min((f for f in found if f), key=lambda f: f.solution.time_s, default=None)


def _ties_hold(best: Searched, space: SearchSpace, tied: list[frozenset[str]]) -> bool:
    plan = best.plan(space.terms, space.world)
    return all(len({storage_layout(plan.strategy(u)) for u in g}) == 1 for g in tied)


def _common_layouts(space: SearchSpace, group: frozenset[str]) -> list[tuple[Any, ...]]:
    """The storage layouts every unit of the group has a candidate in (one stage)."""
    kinds = dict(zip(space.terms.units, space.terms.kinds, strict=True))
    per_unit = [
        {storage_layout(s) for s in space.unit_candidates(u, kinds[u], space.world)}
        for u in sorted(group)
    ]
    return sorted(set.intersection(*per_unit))


@dataclasses.dataclass(frozen=True)
class _FixedLayouts:
    """`terms` whose units in `fixed` (by representative) have one storage layout each."""

    terms: Any
    fixed: dict[str, tuple[Any, ...]]

    def has(self, unit: str, s: LayerStrategy) -> bool:
        want = self.fixed.get(self.terms.representative[unit])
        return self.terms.has(unit, s) and (want is None or storage_layout(s) == want)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.terms, name)


def _check_inputs(
    world: int, memory_budget_gb: float, global_batch: int, max_pipeline: int | None = None
) -> None:
    if memory_budget_gb <= 0:
        raise PlanError(f"search: memory budget must be > 0 GB, got {memory_budget_gb}")
    if global_batch < 1:
        raise PlanError(f"search: global batch must be >= 1, got {global_batch}")
    if max_pipeline is not None and max_pipeline < 1:
        raise PlanError(f"search: max_pipeline must be >= 1 (1: no stages), got {max_pipeline}")


def _world_error(world: int, analysis: Any) -> str:
    """Why the search cannot use `world` devices, and what would work."""
    if world < 1:
        return f"search: world size must be >= 1, got {world}"
    heads = sorted({h for s in layer_shapes(analysis.graph_module).values() for h in s.heads})
    tps = [t for t in range(1, world + 1) if world % t == 0 and all(h % t == 0 for h in heads)]
    lower = 1 << (world.bit_length() - 1)
    by_hand = " or ".join(f"tp={t} dp={world // t}" for t in tps[:3])
    return (
        f"search: {world} devices do not factor for this model: the search splits devices "
        f"into pipeline x tp x dp degrees that are powers of two, and tp must divide every "
        f"layer's attention heads ({', '.join(map(str, heads)) or 'none'}). Search for "
        f"{lower} or {2 * lower} devices, or write a plan for {world} by hand ({by_hand}; "
        "the batch must divide by dp) and pass it as plan= / --plan"
    )


def _predicted(best: Searched, terms: ModelTerms, space: SearchSpace) -> dict[str, Any]:
    s = best.solution
    c = best.config
    per_device = [0.0] * c.pipeline
    for k, mem in enumerate(s.stage_memory_bytes):
        per_device[k % c.pipeline] += mem
    batch = space.global_batch
    return {
        "step_time_s": s.time_s,
        "samples_per_s": batch / s.time_s,
        "tflops_per_device": terms.flops_per_sample * batch / s.time_s / space.world / 1e12,
        "peak_memory_bytes": per_device,
        "stage_time_per_micro_batch_s": list(s.stage_time_s),
    }


def explain_space(
    analysis: Any,
    *,
    cluster: ClusterSpec | str,
    global_batch: int,
    worlds: tuple[int, ...] = (8, 16, 32, 64),
    precision: Precision = "mixed",
) -> list[dict[str, Any]]:
    """Per world size: the candidate count after each pruning rule (`search.space`), and
    for the model's first layer the candidates priced and those left after dominance, at
    one micro-batch (clusters grow by whole nodes to hold the world)."""
    spec = load_cluster(cluster) if isinstance(cluster, str) else cluster
    tps = powers_of_two(min(max(worlds), spec.devices_per_node))
    terms = model_terms(analysis, spec, tps)
    layer = next((u for u, k in zip(terms.units, terms.kinds, strict=True) if k == "layer"), None)
    out = []
    for world in worlds:
        grown = spec.with_nodes(max(spec.nodes, -(-world // spec.devices_per_node)))
        space = SearchSpace(terms, grown, world, global_batch, float("inf"), precision)
        rows = [dataclasses.asdict(r) for r in space_counts(world, spec.devices_per_node)]
        priced = kept = 0
        if layer is not None:
            priced, kept = dominance_counts(
                functools.partial(_cost_row, space, layer), world, spec.devices_per_node
            )
        out.append({"world": world, "rules": rows, "layer": layer, "priced": priced, "kept": kept})
    return out


def _cost_row(space: SearchSpace, unit: str, s: LayerStrategy) -> tuple[float, ...] | None:
    if not space.terms.has(unit, s) or space.global_batch % s.dp:
        return None
    c = space.cost(unit, s, space.global_batch / s.dp)
    return (c.time_mb_s + c.step_s, c.state_bytes, c.act_bytes, c.transient_bytes)
