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
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx
from torch.distributed.tensor import Partial, Shard

from galvatron_fx.cost_models.efficiency import KernelWork, OpClass, work_parts_s
from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.cost_models.memory import PRECISIONS, Precision
from galvatron_fx.meta import COST, PLACEMENT, NodePlacement
from galvatron_fx.plan import DPMode, LayerStrategy, Plan, Recompute
from galvatron_fx.planning.plan_memory import UnitMemoryInputs, is_collective, saved_bytes
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.program import ParamSpec
from galvatron_fx.unit_graph.kernels import causal_attention, gemm_shape, op_class

__all__ = [
    "compute_times",
    "graph_value_bytes",
    "kernel_work",
    "local_params",
    "memory_inputs",
    "stepped_elems",
    "trained_width",
]


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


def kernel_work(
    nodes: list[fx.Node],
    cores: set[str],
    s: LayerStrategy,
    cluster: ClusterSpec,
    dtype: str,
    value_width: float = 1.0,
    efficiency: float = 1.0,
    compiled: bool = False,
) -> KernelWork:
    """The nodes' kernels on one rank: each by its class (`cost_models/efficiency.py`), its
    bytes at `value_width` times the graph's (the trained dtype's width over the captured
    one), the cluster's compute efficiencies times `efficiency` (a measured correction).
    Backward moves the bytes and launches the kernels its ops did when `annotate_costs` ran
    them (twice the forward's bytes in one kernel where it has no record); a GEMM's backward
    is two GEMMs (the input's and the weight's gradients). `compiled`: the program runs
    under `torch.compile`, whose inductor fuses each chain of memory-bound ops into one
    kernel (`_fused`)."""
    if dtype not in cluster.peak_flops:
        raise ValueError(f"cluster {cluster.name!r} has no peak FLOP/s for {dtype!r}")
    peak, bw = cluster.peak_flops[dtype], cluster.memory_bandwidth_bytes_per_s
    eff = cluster.efficiency.scaled(efficiency) if efficiency != 1.0 else cluster.efficiency
    kernels = [_kernel(n, cores, s, value_width) for n in nodes if op_class(n) is not None]
    if compiled:
        kernels = _fused(kernels, value_width)
    rows = []
    for k in kernels:
        fwd = work_parts_s(k.kind, k.fwd_flops, k.fwd_bytes, peak, bw, eff)
        bwd = work_parts_s(k.kind, k.bwd_flops, k.bwd_bytes, peak, bw, eff, backward=True)
        rows.append((*fwd, *bwd, k.bwd_kernels, *k.shape, k.selective))
    table = np.array(rows, dtype=float).reshape(-1, 9)
    return KernelWork(table[:, :4], table[:, 4], table[:, 5:8], table[:, 8] > 0, eff)


@dataclass(frozen=True)
class _Kernel:
    """One kernel (or fused group) on one rank: its work, before pricing."""

    kind: OpClass
    nodes: tuple[fx.Node, ...]
    fwd_flops: float
    bwd_flops: float
    fwd_bytes: float
    bwd_bytes: float
    bwd_kernels: int
    shape: tuple[int, int, int]
    selective: bool


def _kernel(node: fx.Node, cores: set[str], s: LayerStrategy, value_width: float) -> _Kernel:
    kind = op_class(node)
    assert kind is not None
    cost, split = COST.get(node), _split(PLACEMENT.get(node), s)
    fwd_flops, bwd_flops = cost.fwd_flops / split, cost.bwd_flops / split
    shape = (0, 0, 0)
    if kind == "gemm":
        shape = gemm_shape(node)
    elif causal_attention(node):
        fwd_flops, bwd_flops = fwd_flops / 2, bwd_flops / 2
    return _Kernel(
        kind,
        (node,),
        fwd_flops,
        bwd_flops,
        cost.fwd_bytes / split * value_width,
        (cost.bwd_bytes or 2 * cost.fwd_bytes) / split * value_width,
        # a GEMM's backward: the input's and the weight's gradients, two GEMMs
        2 if kind == "gemm" else max(cost.bwd_kernels, 1),
        shape,
        s.recompute is Recompute.SELECTIVE and node.name in cores,
    )


def _fused(kernels: list[_Kernel], value_width: float) -> list[_Kernel]:
    """Inductor's fusion of memory-bound ops: every connected chain of them is one kernel
    that reads what enters the chain and writes what leaves it, once. Its backward, also
    fused, is taken to shrink as its forward did (the eager backward's bytes times the
    fused forward's over the eager forward's). GEMMs and attention stay as they are."""
    memory = {k.nodes[0]: k for k in kernels if k.kind == "memory"}
    parent = {n: n for n in memory}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in memory:
        for a in n.all_input_nodes:
            if a in memory:
                parent[root(a)] = root(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in memory:
        groups.setdefault(root(n), []).append(n)
    out = [k for k in kernels if k.kind != "memory"]
    for members in groups.values():
        inside = set(members)
        entering = {a for n in members for a in n.all_input_nodes if a not in inside}
        leaving = [n for n in members if not n.users or any(u not in inside for u in n.users)]
        fused_bytes = sum(_local_bytes(a) for a in entering | set(leaving)) * value_width
        parts = [memory[n] for n in members]
        eager = sum(k.fwd_bytes for k in parts)
        shrink = fused_bytes / eager if eager > 0 else 1.0
        out.append(
            _Kernel(
                "memory",
                tuple(members),
                sum(k.fwd_flops for k in parts),
                sum(k.bwd_flops for k in parts),
                fused_bytes,
                sum(k.bwd_bytes for k in parts) * shrink,
                1,
                (0, 0, 0),
                any(k.selective for k in parts),
            )
        )
    return out


def compute_times(
    nodes: list[fx.Node],
    cores: set[str],
    s: LayerStrategy,
    cluster: ClusterSpec,
    dtype: str,
    value_width: float = 1.0,
    efficiency: float = 1.0,
) -> tuple[float, float, float]:
    """(forward, backward, recomputation under `s`) seconds of the nodes on one rank
    (`kernel_work` at its own batch); CPU ranks also pay `cluster.op_overhead_s` per op
    launched (about two in backward per forward op)."""
    work = kernel_work(nodes, cores, s, cluster, dtype, value_width, efficiency)
    fwd, bwd, full, selective = work.at(1.0)
    ops = len(work.bwd_kernels)
    overhead = cluster.op_overhead_s
    fwd, bwd = fwd + ops * overhead, bwd + 2 * ops * overhead
    if s.recompute is Recompute.FULL:
        return fwd, bwd, full + ops * overhead
    if s.recompute is Recompute.SELECTIVE:
        return fwd, bwd, selective + int(work.selective.sum()) * overhead
    return fwd, bwd, 0.0


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
        # activations join them (an input the region saves again is not a second copy).
        # Not its parameters: ZeRO-3's gathered buffer (issued by the unit before) is saved
        # as a recipe to gather it again (`zero3_saved_tensors`; charged by `zero3_live`)
        inside = set(all_nodes)
        inputs = {
            a
            for n in all_nodes
            for a in n.all_input_nodes
            if a not in inside and a.op != "get_attr" and a.target is not C.zero3_issue
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


def graph_value_bytes(nodes: list[fx.Node]) -> int:
    """Element size of the graph's parameters (what it was captured in; 4 without any)."""
    for node in nodes:
        val = node.meta.get("val")
        if node.op == "get_attr" and isinstance(val, torch.Tensor):
            return val.element_size()
    return 4


def trained_width(nodes: list[fx.Node], precision: Precision) -> float:
    """Bytes of a trained value over the graph's: a model captured in fp32 and trained in
    mixed precision moves, saves and reads half of what its graph says."""
    return PRECISIONS[precision][0] / graph_value_bytes(nodes)


def local_params(params: dict[str, ParamSpec], unit: str) -> int:
    return sum(
        _local_numel(spec)
        for spec in params.values()
        if spec.unit == unit and spec.alias_of is None
    )
