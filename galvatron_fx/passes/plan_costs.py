"""Time and memory of every unit under a plan, on one rank, from the compiler's own rewrite.

The analysed graph knows each node's global FLOPs, bytes and saved activations
(`annotate_costs`); the rewrite (`plan_collectives`' copy) knows how each node is split and
what every unit communicates. A node whose output is split (or partial) on an axis of size n
does 1/n of the work and saves 1/n of the bytes; recomputation adds a forward (full: the
unit; selective: its attention cores) and keeps only the unit's inputs (full) or drops what
the attention cores saved (selective). Model states follow ZeRO per the unit's dp mode.
Compute times are measured where the profiler timed the unit's fingerprint under this
strategy (`profile --model`, `LayerTimes`), and a roofline elsewhere; collectives are
alpha-beta with overlap (`cost_models`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.distributed.tensor import Partial, Shard

from galvatron_fx.cost_models.comm import Collective
from galvatron_fx.cost_models.communication import collectives_time, spans_nodes
from galvatron_fx.cost_models.compute import adam_step_time_s, roofline_time_s
from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.cost_models.memory import Precision, model_state_bytes
from galvatron_fx.cost_models.peak_memory import PeakMemory, UnitMemory
from galvatron_fx.meta import COST, PLACEMENT, NodePlacement
from galvatron_fx.passes.collective_list import collectives_of
from galvatron_fx.passes.group_layers import unit_nodes
from galvatron_fx.passes.insert_collectives import ParamSpec
from galvatron_fx.passes.plan_memory import (
    UnitMemoryInputs,
    is_collective,
    local_ratios,
    plan_peak_memory,
    saved_bytes,
    unit_memory,
)
from galvatron_fx.passes.recompute import attention_cores
from galvatron_fx.plan import DPMode, LayerStrategy, Plan, Recompute
from galvatron_fx.runtime.layer_profile import LayerTimes

__all__ = [
    "UnitCost",
    "measured_efficiency",
    "plan_costs",
    "plan_peak",
    "rewrite_for_costs",
    "spans_nodes",
    "stepped_elems",
]


@dataclass(frozen=True)
class UnitCost:
    """One unit on one rank for one training step."""

    unit: str
    strategy: str
    fwd_s: float
    bwd_s: float
    recompute_s: float
    step_s: float
    """The optimizer step over what this rank steps."""
    comm_total_s: float
    comm_exposed_s: float
    """Communication the step waits for (in-line, plus what overlap does not hide)."""
    model_state_bytes: float
    """Parameters, gradients and optimizer states on this rank."""
    params: int
    """The unit's parameters this rank's TP piece holds (before any ZeRO sharding)."""
    activation_bytes: float
    """Saved for backward on this rank."""
    collectives: tuple[Collective, ...] = ()
    """What the unit communicates (priced in `comm_total_s`)."""
    measured: bool = False
    """Compute times come from the profiler's table, not the roofline."""
    memory: UnitMemory | None = None
    """The unit's terms of the step's peak memory (`plan_peak`)."""
    memory_inputs: UnitMemoryInputs | None = None

    @property
    def compute_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.recompute_s + self.step_s

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_exposed_s

    @property
    def memory_bytes(self) -> float:
        return self.model_state_bytes + self.activation_bytes


def plan_costs(
    analysis: Any,
    plan: Plan,
    cluster: ClusterSpec,
    *,
    rank: int = 0,
    dtype: str = "fp32",
    precision: Precision = "fp32",
    efficiency: float = 1.0,
    layer_times: LayerTimes | None = None,
) -> list[UnitCost]:
    """Per unit, in order: what `plan` costs rank `rank` on `cluster`; compute measured
    where `layer_times` has the unit under its strategy."""
    original = unit_nodes(analysis.graph_module)
    gm, params, comms, ratio = rewrite_for_costs(analysis, plan, rank)
    rewritten = unit_nodes(gm)
    stepped = stepped_elems(params, plan)
    fingerprints = {u.name: u.fingerprint for u in analysis.layers}
    previous_params = 0
    state_bytes = 4 if precision == "fp32" else 2
    out = []
    for unit, s in plan.strategies:
        nodes = [n for n in rewritten.get(unit, []) if COST.has(n) and PLACEMENT.has(n)]
        cores = {n.name for core in attention_cores(original.get(unit, [])) for n in core}
        found = layer_times.lookup(fingerprints[unit], s) if layer_times else None
        if found is not None:
            work_s = (found.fwd_s, found.bwd_s, found.recompute_s, found.step_s)
        else:
            step_s = float(adam_step_time_s(stepped.get(unit, 0), cluster, state_bytes))
            work_s = (*_compute(nodes, cores, s, cluster, dtype, efficiency), step_s)
        listed = tuple(comms.get(unit, []))
        comm = collectives_time(listed, cluster, spans_nodes(s, cluster))
        local_params = _local_params(params, unit)
        states = model_state_bytes(local_params, s.state_dp, s.dp_mode, precision).total_bytes
        inputs = _memory_inputs(
            nodes, rewritten.get(unit, []), ratio, cores, s, params, unit, local_params
        )
        memory = unit_memory(inputs, s, precision, previous_params, gloo=_gloo(cluster))
        previous_params = inputs.local_params
        comm_s = (comm.total_s, comm.exposed_s)
        out.append(
            UnitCost(
                unit, s.short(), *work_s, *comm_s, states, local_params, inputs.kept_bytes,
                listed, measured=found is not None, memory=memory, memory_inputs=inputs,
            )
        )  # fmt: skip
    return out


def rewrite_for_costs(
    analysis: Any, plan: Plan, rank: int = 0
) -> tuple[fx.GraphModule, dict[str, ParamSpec], dict[str, list[Collective]], dict[str, float]]:
    """Rank `rank`'s rewrite of a copy of `analysis` (recomputation left out: costs price it
    from the plan): (graph, parameter specs, collectives per unit, local size ratios)."""
    from galvatron_fx.compile import PARALLEL_PASSES
    from galvatron_fx.passes.manager import run_passes

    work = analysis.copy()
    work.context.results.update(plan=plan, rank=rank, codegen=False)
    before_recompute = [p for p in PARALLEL_PASSES if p.name != "recompute"]
    gm = run_passes(work.graph_module, work.context, before_recompute)
    params: dict[str, ParamSpec] = work.context.results["params"]
    comms = collectives_of(gm, params, plan)
    return gm, params, comms, local_ratios(analysis.graph_module.graph, gm.graph)


def plan_peak(
    costs: list[UnitCost],
    plan: Plan,
    cluster: ClusterSpec,
    precision: Precision = "fp32",
    bucket_mb: float = 25.0,
) -> PeakMemory:
    """The rank's peak memory over a step, from `plan_costs`' units. Collectives run on gloo
    when the cluster is this machine's CPU ranks (`local`)."""
    units = [(c.unit, c.memory, c.memory_inputs) for c in costs]
    known = [(u, m, i) for u, m, i in units if m is not None and i is not None]
    return plan_peak_memory(plan, known, precision, gloo=_gloo(cluster), bucket_mb=bucket_mb)


def _gloo(cluster: ClusterSpec) -> bool:
    """The profiled local cluster: CPU ranks on gloo."""
    return cluster.name == "local"


def stepped_elems(params: dict[str, ParamSpec], plan: Plan) -> dict[str, int]:
    """Per unit: the parameter elements this rank's optimizer steps (its TP piece, 1/dp of
    it under ZeRO)."""
    out: dict[str, int] = {}
    for unit, s in plan.strategies:
        numel = _local_params(params, unit)
        sharded = s.dp_mode is not DPMode.ALLREDUCE and s.state_dp > 1
        out[unit] = numel // s.state_dp if sharded else numel
    return out


def _split(p: NodePlacement, s: LayerStrategy) -> float:
    """How many ways this node's work is divided on its mesh."""
    factor = 1.0
    for axis, n in (("dp", s.dp), ("tp", s.tp)):
        placement = getattr(p, axis)
        first = placement[0] if isinstance(placement, tuple) and placement else placement
        if isinstance(first, (Shard, Partial)) or (axis == "tp" and "row" in p.kinds):
            factor *= n
    return factor


def _compute(
    nodes: list[fx.Node],
    cores: set[str],
    s: LayerStrategy,
    cluster: ClusterSpec,
    dtype: str,
    efficiency: float,
) -> tuple[float, float, float]:
    """(forward, backward, recomputation) seconds; backward moves about twice the bytes."""
    fwd = bwd = again = 0.0
    for node in nodes:
        cost, split = COST.get(node), _split(PLACEMENT.get(node), s)
        f = float(
            roofline_time_s(
                cost.fwd_flops / split, cost.fwd_bytes / split, cluster, dtype, efficiency
            )
        )
        b = roofline_time_s(
            cost.bwd_flops / split, 2 * cost.fwd_bytes / split, cluster, dtype, efficiency
        )
        f += cluster.op_overhead_s  # backward runs about two ops per forward op
        fwd, bwd = fwd + f, bwd + float(b) + 2 * cluster.op_overhead_s
        selective = s.recompute is Recompute.SELECTIVE and node.name in cores
        if s.recompute is Recompute.FULL or selective:
            again += f
    return fwd, bwd, again


def _memory_inputs(
    nodes: list[fx.Node],
    all_nodes: list[fx.Node],
    ratio: dict[str, float],
    cores: set[str],
    s: LayerStrategy,
    params: dict[str, ParamSpec],
    unit: str,
    local_params: int,
) -> UnitMemoryInputs:
    total, kept = saved_bytes(nodes, ratio, cores, s)
    if s.recompute is Recompute.FULL:
        # only the unit's inputs stay, for the recomputation; while it runs, the rebuilt
        # activations join them (an input the region saves again is not a second copy)
        inside = set(all_nodes)
        inputs = {
            a
            for n in all_nodes
            for a in n.all_input_nodes
            if a not in inside and a.op != "get_attr"
        }
        kept = float(sum(_local_bytes(a) for a in inputs))
        resaved = {p for n in nodes for p, _, _ in COST.get(n).saved}
        total += sum(_local_bytes(a) for a in inputs if a.name not in resaved)
    computed = [n for n in all_nodes if n.op == "call_function" and not is_collective(n)]
    largest_value = max((_local_bytes(n) for n in computed), default=0)
    largest_param = max(
        (_local_numel(spec) for spec in params.values() if spec.unit == unit), default=0
    )
    return UnitMemoryInputs(total, kept, largest_value, local_params, largest_param)


def _local_bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _local_numel(spec: ParamSpec) -> int:
    whole = math.prod(spec.global_shape)
    return whole // spec.tp_group.size if spec.tp_dim is not None else whole


def _local_params(params: dict[str, ParamSpec], unit: str) -> int:
    return sum(
        _local_numel(spec)
        for spec in params.values()
        if spec.unit == unit and spec.alias_of is None
    )


def measured_efficiency(
    analysis: Any,
    cluster: ClusterSpec,
    layer_times: LayerTimes,
    world: int,
    *,
    dtype: str = "fp32",
    max_strategies: int = 3,
) -> float | None:
    """How much of the roofline's compute speed this model's profiled layers reach on
    `cluster`: the roofline's forward + backward seconds over the measured ones, summed over
    the units of up to `max_strategies` uniform plans the table has entries for (None when
    it has none). The search prices compute with it (`search(efficiency=)`): the roofline
    alone assumes the matmul peak, which CPU layers here reach about half of."""
    from galvatron_fx.runtime.layer_profile import default_strategies

    fingerprints = {u.name: u.fingerprint for u in analysis.layers}
    roofline_s = measured_s = 0.0
    found = 0
    for s in default_strategies(world):
        if found == max_strategies:
            break
        if not any(layer_times.lookup(f, s) for f in fingerprints.values()):
            continue
        plan = analysis.plan(s, world_size=world)
        roof = plan_costs(analysis, plan, cluster, dtype=dtype)
        meas = plan_costs(analysis, plan, cluster, dtype=dtype, layer_times=layer_times)
        for r, m in zip(roof, meas, strict=True):
            if m.measured:
                roofline_s += r.fwd_s + r.bwd_s
                measured_s += m.fwd_s + m.bwd_s
        found += 1
    if measured_s <= 0:
        return None
    return min(max(roofline_s / measured_s, 0.01), 1.0)
