"""A graph's units: their nodes in execution order, the activations between them, the layer
table (one row per unit, costs summed) and the model fingerprint a plan is checked against."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from galvatron_fx.cost_models.compute import UnitFlops
from galvatron_fx.meta import COST, LAYER
from galvatron_fx.unit_graph.attention import attention_cores

__all__ = [
    "LayerSummary",
    "cut_tensors",
    "fx_digraph",
    "layer_digraph",
    "layer_table",
    "model_fingerprint",
    "unit_flops",
    "unit_nodes",
]


def unit_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Nodes of every layer and segment (each in graph order), units in execution order
    (`LayerTag.index`, not where a unit's first node sits: its placeholders and parameter
    reads may stand before an earlier unit's nodes)."""
    out: dict[str, list[fx.Node]] = {}
    index: dict[str, int] = {}
    for node in gm.graph.nodes:
        tag = LAYER.get(node)
        out.setdefault(tag.name, []).append(node)
        index.setdefault(tag.name, tag.index)
    return {unit: out[unit] for unit in sorted(out, key=index.__getitem__)}


def fx_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph of `gm` as a networkx DiGraph over fx nodes."""
    g = nx.DiGraph()
    g.add_nodes_from(gm.graph.nodes)
    g.add_edges_from((a, n) for n in gm.graph.nodes for a in n.all_input_nodes)
    return g


def _activation_edges(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, fx.Node]]:
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            if a.op != "get_attr" and LAYER.get(a).name != LAYER.get(n).name:
                yield a, n


def layer_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """Units as nodes; an edge per pair of units that an activation flows between, with the
    tensors that cross (`tensors`) and their bytes (`bytes`). Parameters are not edges."""
    g = nx.DiGraph()
    g.add_nodes_from(unit_nodes(gm))
    crossing: dict[tuple[str, str], set[fx.Node]] = {}
    for a, n in _activation_edges(gm):
        crossing.setdefault((LAYER.get(a).name, LAYER.get(n).name), set()).add(a)
    for (src, dst), tensors in crossing.items():
        g.add_edge(src, dst, tensors=tensors, bytes=sum(_val_bytes(t) for t in tensors))
    assert nx.is_directed_acyclic_graph(g), "layers and segments must form a DAG"
    return g


def cut_tensors(gm: fx.GraphModule) -> list[set[fx.Node]]:
    """For each boundary between unit i and unit i+1 (execution order), the activations that
    are produced at or before unit i and used after it: what a pipeline cut there sends."""
    order = list(unit_nodes(gm))
    position = {u: i for i, u in enumerate(order)}
    cuts: list[set[fx.Node]] = [set() for _ in order[:-1]]
    for a, n in _activation_edges(gm):
        for i in range(position[LAYER.get(a).name], position[LAYER.get(n).name]):
            cuts[i].add(a)
    return cuts


def _val_bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class LayerSummary:
    """One layer or segment, costs summed over its nodes."""

    name: str
    group: str
    kind: str
    fingerprint: str
    params: int
    fwd_flops: int
    bwd_flops: int
    saved_activation_bytes: int
    nodes: int


def unit_flops(gm: fx.GraphModule) -> dict[str, UnitFlops]:
    """Per unit, the forward / backward FLOPs and those of its attention cores, for the
    compute cost model."""

    out = {}
    for name, nodes in unit_nodes(gm).items():
        cores = [n for core in attention_cores(nodes) for n in core]
        out[name] = UnitFlops(
            fwd_flops=sum(COST.get(n).fwd_flops for n in nodes),
            bwd_flops=sum(COST.get(n).bwd_flops for n in nodes),
            attention_fwd_flops=sum(COST.get(n).fwd_flops for n in cores if COST.has(n)),
        )
    return out


def layer_table(gm: fx.GraphModule) -> list[LayerSummary]:
    """Rows in execution order."""
    rows = []
    for name, nodes in unit_nodes(gm).items():
        tag = LAYER.get(nodes[0])
        costs = [COST.get(n) for n in nodes]
        rows.append(
            LayerSummary(
                name=name,
                group=tag.group,
                kind=tag.kind,
                fingerprint=tag.fingerprint,
                params=sum(c.params for c in costs),
                fwd_flops=sum(c.fwd_flops for c in costs),
                bwd_flops=sum(c.bwd_flops for c in costs),
                saved_activation_bytes=sum(c.saved_bytes for c in costs),
                nodes=sum(1 for n in nodes if n.op == "call_function"),
            )
        )
    return rows


def model_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the ordered unit names and fingerprints: a plan is valid for exactly the
    models with this value (same layers, ops and shapes)."""
    units = [(name, LAYER.get(nodes[0]).fingerprint) for name, nodes in unit_nodes(gm).items()]
    return hashlib.sha1(repr(units).encode()).hexdigest()[:16]
