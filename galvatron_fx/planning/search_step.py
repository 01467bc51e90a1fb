"""The search step: an analysed graph, a cluster and a budget in; the best plan out.

Reads: an `Analysis` (its layers and costs). Writes nothing on the graph: returns a
`SearchResult` holding the `Plan` (a plain value, passed on explicitly to the rewrite), what
the cost model predicts for it, the baselines priced by the same model, and per unit why it
got its strategy. Guarantees: the plan's stages fit `memory_budget_gb` under the search's
memory model (an upper bound of the three-moment peak, `search/option_cost.py`), and it is the
fastest plan of the candidate space under that model (`search/dp.py`, `search/planner.py`),
or the best single-strategy plan of the same configuration when that is within
`UNIFORM_TOLERANCE` (1%) of it (`baselines.simplest_within`: a gain below the model's
resolution is not worth a mix's layout switches). Units that read one parameter (tied
embeddings: T5's encoder, decoder and head) get one storage layout in every plan the search
considers, the uniform ones and the baselines included (`planner.solve_config`, with
`plan_checks`'s definition); stage boundaries may separate them: each stage then holds a
copy of the weight, priced in its memory and step (`SearchSpace.copies`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galvatron_fx.cost_models.hardware import ClusterSpec, load_cluster
from galvatron_fx.cost_models.memory import Precision
from galvatron_fx.lowering import Analysis
from galvatron_fx.plan import LayerStrategy, Plan, PlanError, save_json
from galvatron_fx.plan_checks import SharedWeight, shared_weights, tie_error
from galvatron_fx.planning.model_terms import ModelTerms, model_terms
from galvatron_fx.planning.plan_price import tied_copies
from galvatron_fx.search.baselines import UNIFORM_TOLERANCE, run_baselines, simplest_within
from galvatron_fx.search.explain import explain_units, smallest_memory
from galvatron_fx.search.planner import Searched, SearchSpace, configs, search_space
from galvatron_fx.search.space import dominance_counts, space_counts
from galvatron_fx.search.strategies import tp_degrees, world_splits
from galvatron_fx.unit_graph.shapes import layer_shapes

LOG = logging.getLogger("galvatron_fx.search")

__all__ = ["SearchResult", "explain_space", "search_analysis"]

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


def search_analysis(
    analysis: Analysis,
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
    compiled: bool = False,
) -> SearchResult:
    """Search `analysis` for `world_size` devices (default: the whole cluster) of `cluster`
    with `memory_budget_gb` per device and `global_batch` samples per step; `max_pipeline`
    caps the pipeline degree (1: no pipeline stages); `efficiency`: the fraction of the
    cluster's peak FLOP/s the layers reach (`price.measured_efficiency`); `ulysses`:
    False leaves Ulysses out of the candidates (the baselines keep it), to see what it adds;
    `compiled`: price each rank's program as `torch.compile` runs it (memory-bound kernels
    fused)."""
    spec = load_cluster(cluster) if isinstance(cluster, str) else cluster
    world = world_size or spec.nodes * spec.devices_per_node
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
    # a TP group lies inside a node and inside a stage: tp divides both
    tps = tp_degrees(math.gcd(world, spec.devices_per_node))
    terms = model_terms(
        analysis, spec, tps, dtype=dtype, efficiency=efficiency, precision=precision,
        compiled=compiled,
    )  # fmt: skip
    split = functools.partial(
        world_splits,
        units=len(terms.units),
        devices_per_node=spec.devices_per_node,
        tps=terms.tps(),
        max_pipeline=max_pipeline,
    )
    if not split(world, global_batch=global_batch):
        # what would work, with every tp a node allows (not only those dividing `world`)
        every_tp = tp_degrees(spec.devices_per_node)
        tps_any = model_terms(analysis, spec, every_tp, dtype=dtype, precision=precision).tps()
        largest = len(terms.units) * max(tps_any) * global_batch
        every = functools.partial(split, tps=tps_any)
        raise PlanError(_world_error(world, global_batch, analysis, every, largest))
    budget = memory_budget_gb * GiB
    shared = shared_weights(analysis.graph_module)
    full = SearchSpace(
        terms, spec, world, global_batch, budget, precision, buckets=buckets,
        ties=_tied_groups(shared), copies=tied_copies(shared, terms.units),
    )  # fmt: skip
    # without Ulysses: the same space restricted, so its memory levels (read off every
    # candidate) and hence its rounding are the full search's
    space = full if ulysses else full.restricted(_without_ulysses)
    tried = [
        c
        for c in configs(world, len(terms.units), global_batch)
        if max_pipeline is None or c.pipeline <= max_pipeline
    ]
    best, stats = search_space(space, tried, progress)
    if best is None:
        raise PlanError(smallest_memory(space, memory_budget_gb))
    best = simplest_within(space.with_layouts(dict(best.fixed)), best, UNIFORM_TOLERANCE)
    space = space.with_layouts(dict(best.fixed))  # the space whose options `best` indexes
    stats["tied_layouts_solved"] = space.stats.get("tied_layouts_solved", 0)
    elapsed = time.perf_counter() - start
    plan = best.plan(terms, world)
    _check_ties(plan, shared)
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
        "compiled": compiled,
    }
    units = explain_units(space, best)
    LOG.debug("search: %.2f s; %s", elapsed, ", ".join(f"{k} {v}" for k, v in stats.items()))
    rates = {r.name: (global_batch / r.time_s if r.time_s else None) for r in priced}
    plans = {r.name: r.searched.plan(terms, world) if r.searched else None for r in priced}
    return SearchResult(plan, predicted, elapsed, rates, units, stats, setup, plans)


def _without_ulysses(s: LayerStrategy, kind: str) -> bool:
    return not s.ulysses


def _tied_groups(shared: list[SharedWeight]) -> tuple[frozenset[str], ...]:
    """Units that must store their weights alike: those sharing a parameter, transitively."""
    groups: list[set[str]] = []
    for w in shared:
        touching = [g for g in groups if g & w.units]
        groups = [g for g in groups if not g & w.units] + [set(w.units).union(*touching)]
    return tuple(frozenset(g) for g in groups)


def _check_ties(plan: Plan, shared: list[SharedWeight]) -> None:
    """The plan stores every tied weight as `plan_checks` requires (an invariant of the
    search: `planner.solve_config` imposes it on every plan it returns)."""
    errors = [e for e in (tie_error(plan, w) for w in shared) if e]
    assert not errors, f"search: the plan breaks a tie: {errors[0]}\n{plan.table()}"


def _check_inputs(
    world: int, memory_budget_gb: float, global_batch: int, max_pipeline: int | None = None
) -> None:
    if world < 1:
        raise PlanError(f"search: world size must be >= 1, got {world}")
    if memory_budget_gb <= 0:
        raise PlanError(f"search: memory budget must be > 0 GB, got {memory_budget_gb}")
    if global_batch < 1:
        raise PlanError(f"search: global batch must be >= 1, got {global_batch}")
    if max_pipeline is not None and max_pipeline < 1:
        raise PlanError(f"search: max_pipeline must be >= 1 (1: no stages), got {max_pipeline}")


def _world_error(
    world: int,
    global_batch: int,
    analysis: Analysis,
    split: Callable[..., list[tuple[int, int, int]]],
    largest: int,
) -> str:
    """Why no plan can use `world` devices (`split(world, global_batch=...)`, the
    `strategies.world_splits` of this model and cluster, is empty), and what would work:
    the nearest worlds that split (none beyond `largest`: units x tp x batch), or a batch
    that one split of `world` needs."""
    heads = sorted({h for s in layer_shapes(analysis.graph_module).values() for h in s.heads})

    def fits(w: int) -> bool:
        return bool(split(w, global_batch=global_batch))

    below = next((w for w in range(min(world, largest + 1) - 1, 0, -1) if fits(w)), None)
    above = next((w for w in range(world + 1, largest + 1) if fits(w)), None)
    nearest = " or ".join(
        f"{w} devices ({_split_text(split(w, global_batch=global_batch)[0])})"
        for w in (below, above)
        if w is not None
    )
    # the same world with a batch one of its splits divides: the largest tp, least dp
    batch = "".join(
        f"; or a global batch that {dp} divides ({_split_text((p, tp, dp))})"
        for p, tp, dp in split(world, global_batch=world)[-1:]
    )
    return (
        f"search: {world} devices do not factor for this model and a global batch of "
        f"{global_batch}: a plan splits them into pipeline x tp x dp, with at most one unit a "
        f"stage, stages of whole nodes or inside one, tp a power of two dividing a node and "
        f"every layer's attention heads ({', '.join(map(str, heads)) or 'none'}), and dp "
        f"dividing the global batch. Search for {nearest}{batch}"
    )


def _split_text(split: tuple[int, int, int]) -> str:
    p, tp, dp = split
    return f"pp={p} tp={tp} dp={dp}"


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
    analysis: Analysis,
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
    tps = sorted({t for w in worlds for t in tp_degrees(math.gcd(w, spec.devices_per_node))})
    terms = model_terms(analysis, spec, tps, precision=precision)
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
