"""One unit's terms on one rank, read off its lowered graph: compute seconds, what it keeps
for backward, its parameters.

The analysed graph knows each node's global FLOPs, bytes and saved activations
(`annotate_costs`); the lowered graph knows how each node is split. A node whose output is
split (or partial) on an axis of size n does 1/n of the work and saves 1/n of the bytes;
recomputation adds a forward (full: the unit; selective: its attention cores) and keeps only
the unit's inputs (full) or drops what the attention cores saved (selective).
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.distributed.tensor import Partial, Shard

from galvatron_fx.cost_models.compute import roofline_time_s
from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.meta import COST, PLACEMENT, NodePlacement
from galvatron_fx.plan import DPMode, LayerStrategy, Plan, Recompute
from galvatron_fx.planning.plan_memory import UnitMemoryInputs, is_collective, saved_bytes
from galvatron_fx.runtime.program import ParamSpec

__all__ = ["compute_times", "local_params", "memory_inputs", "stepped_elems"]


def stepped_elems(params: dict[str, ParamSpec], plan: Plan) -> dict[str, int]:
    """Per unit: the parameter elements this rank's optimizer steps (its TP piece, 1/dp of
    it under ZeRO)."""
    out: dict[str, int] = {}
    for unit, s in plan.strategies:
        numel = local_params(params, unit)
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


def compute_times(
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


def memory_inputs(
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


def local_params(params: dict[str, ParamSpec], unit: str) -> int:
    return sum(
        _local_numel(spec)
        for spec in params.values()
        if spec.unit == unit and spec.alias_of is None
    )
