"""Sharding propagation: placements for every node under the plan, nothing rewritten yet.

Reads: `gfx_layer`, `val`, the plan in `ctx.target`.
Writes: `gfx_placement` on every node: the node's placement on the dp and tp axes of its
layer's mesh, the redistributions its inputs need first, and for linear layers whether they
are column- or row-parallel.
Guarantees:
- inputs with a leading batch dimension start split across the dp axis (`Shard(0)`);
  parameters start replicated; the rule table (`shard_rules.RULES`) carries placements
  through every op, one axis at a time;
- parameters are split only on the tp axis of a layer (never in segments), by the linear
  rule, so Megatron's column/row pairs come from the graph, not from module names;
- a value crossing into a unit on another mesh is switched to that mesh (`switch` need):
  split on the batch if it was, replicated on tp; an SP or Ulysses layer keeps a sequence
  split that arrives from a layer on the same mesh, any other layer gathers it;
- a Ulysses layer splits no weight: its stream runs split on the sequence across the tp
  axis, and attention reshards to heads and back (`shard_rules.sdpa`);
- key/value projections whose heads the tp does not divide (grouped-query and multi-query
  attention) run whole on every TP rank (kind `kv_whole`), and attention takes its share of
  the repeated heads locally: each rank keeps the key/value heads its query heads use, as
  Megatron does, at the price of computing them all;
- ops without a rule that receive split inputs gather them, with a warning naming the op.

Rank-independent: the same placements hold on every rank; `insert_collectives` makes them
concrete for one rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.distributed.tensor import Partial, Replicate, Shard

from galvatron_fx.meta import LAYER, PLACEMENT, NodePlacement
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.passes.shard_rules import (
    Decision,
    OpView,
    decide,
    kind_blocks,
    replicate_all,
    replicated,
    shape,
    slice_bounds,
)
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.runtime.mesh import Mesh
from galvatron_fx.unit_graph.attention import attention_cores, attention_operands
from galvatron_fx.unit_graph.shapes import head_cut, vocab_size
from galvatron_fx.unit_graph.units import unit_nodes

__all__ = ["ShardWarning", "batch_inputs", "mesh_of", "shard", "unit_strategies"]

R = Replicate()
AXES = ("dp", "tp")
_SHAPE_PRESERVING = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
}


class ShardWarning(UserWarning):
    """An op without a sharding rule made the compiler gather its inputs."""


def unit_strategies(gm: fx.GraphModule, plan: Plan) -> dict[str, LayerStrategy]:
    units = list(dict.fromkeys(LAYER.get(n).name for n in gm.graph.nodes))
    missing = [u for u in units if u not in plan.units]
    if missing:
        raise ValueError(f"plan has no strategy for unit(s) {missing}; plan units: {plan.units}")
    return {u: plan.strategy(u) for u in units}


def mesh_of(s: LayerStrategy, world_size: int) -> Mesh:
    return Mesh(world_size, s.tp, s.dp, s.tp_consecutive)


def batch_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """Placeholders whose first dim is the batch (that of the first tensor input)."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder" and shape(n)]
    if not holders:
        return set()
    batch = shape(holders[0])[0]
    return {n for n in holders if shape(n)[0] == batch}


@graph_pass(reads=("val", LAYER.name), writes=(PLACEMENT.name,))
def shard(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Write the placement of every node under `ctx.target.plan`."""
    _Propagation(gm, ctx.require_target("shard").plan).run()
    return gm


@dataclass
class _Propagation:
    gm: fx.GraphModule
    plan: Plan

    def run(self) -> None:
        self.strategies = unit_strategies(self.gm, self.plan)
        self.params = frozenset(n for n in self.gm.graph.nodes if n.op == "get_attr")
        self.batch = batch_inputs(self.gm)
        self.kv_whole = _kv_whole(self.gm, self.strategies)
        _check_batch(self.batch, self.strategies)
        self.stream = _stream_shapes(self.gm)
        self.vocab = vocab_size(self.gm)
        self.unblocked: set[fx.Node] = set()
        """Column-parallel producers whose readers disagree on a block split: split plainly."""
        while True:  # each round unblocks at least one producer
            self._propagate()
            conflicts = _blocks_conflicts(self.gm)
            if not conflicts:
                break
            self.unblocked |= conflicts
        _warn_fallbacks(self.fallbacks)

    def _propagate(self) -> None:
        self.place: dict[str, dict[fx.Node, object]] = {a: {} for a in AXES}
        self.batch_split: dict[fx.Node, object] = {}
        """Per node, its dp placement were its unit data-parallel: `Shard(0)` marks a value
        carrying the batch, which a data-parallel unit must take split even from a unit
        that ran the whole batch."""
        self.fallbacks: dict[str, dict[str, list[str]]] = {}
        for node in self.gm.graph.nodes:
            PLACEMENT.set(node, self._node(node))

    def _node(self, node: fx.Node) -> NodePlacement:
        s = self.strategies[LAYER.get(node).name]
        if node.op in ("placeholder", "get_attr"):
            dp = Shard(0) if node in self.batch and s.dp > 1 else R
            self.place["dp"][node], self.place["tp"][node] = dp, R
            batch = node in self.batch and shape(node)[0] > 1  # a batch of 1 has nothing to split
            self.batch_split[node] = Shard(0) if batch else R
            return NodePlacement(dp, R, batch=batch)
        needs: list[tuple[str, str, object]] = []
        views = self._inputs(node, s, needs)
        decided = {}
        kind = ""
        for axis in AXES:
            v = views[axis]
            if v.n == 1 or node.op == "output":
                decided[axis] = replicated(node)
                continue
            d = decide(v)
            blocks = d.kind.startswith("blocks=")
            if blocks and (axis != "tp" or not self._mark_blocks(node, d)):
                d = replicate_all(v)  # the split cuts blocks no producer splits that way
            decided[axis] = d.out
            if d.kind == "fallback" and any(isinstance(p, Replicate) for p in d.need.values()):
                by_layer = self.fallbacks.setdefault(f"{node.target} ({axis} axis)", {})
                by_layer.setdefault(LAYER.get(node).name, []).append(node.name)
            kind = "+".join(dict.fromkeys(k for k in (*kind.split("+"), d.kind) if k))
            for a, p in d.need.items():
                needs.append((a.name, axis, p))
                if a in self.params:
                    self.place[axis][a] = p
        if node in self.kv_whole:
            kind = "+".join((*kind.split("+"), "kv_whole")).strip("+")
        for axis in AXES:
            self.place[axis][node] = decided[axis]
        # apart from the real placements, so that the program can be checked against it
        self.batch_split[node] = self._batch_split(node)
        batch = self.batch_split[node] == Shard(0)
        return NodePlacement(decided["dp"], decided["tp"], kind, tuple(needs), batch=batch)

    def _batch_split(self, node: fx.Node) -> object:
        """The node's dp placement under the rules had its unit split the batch."""
        if node.op == "output":
            return R
        return decide(OpView(node, 1, self.batch_split, params=self.params)).out

    def _inputs(
        self, node: fx.Node, s: LayerStrategy, needs: list[tuple[str, str, object]]
    ) -> dict[str, OpView]:
        """Each axis's view of the node, with inputs from other meshes switched onto ours."""
        unit = LAYER.get(node)
        mesh = mesh_of(s, self.plan.world_size)
        eff: dict[str, dict[fx.Node, object]] = {a: {} for a in AXES}
        # Megatron-SP and Ulysses layers both take the residual stream split on the sequence
        sp_layer = (s.sp or s.ulysses) and unit.kind == "layer"
        for a in node.all_input_nodes:
            dp, tp = self.place["dp"][a], self.place["tp"][a]
            src = self.strategies[LAYER.get(a).name]
            entering = LAYER.get(a).name != unit.name and a not in self.params
            if entering and mesh_of(src, self.plan.world_size) != mesh:
                # a unit that ran the whole batch hands a data-parallel one its batch to split
                carries_batch = Shard(0) in (dp, self.batch_split.get(a))
                dp = Shard(0) if carries_batch and s.dp > 1 else R
                tp = R
                needs.append((a.name, "switch", (dp, tp)))
            keeps_split = sp_layer or (unit.kind == "segment" and s.vocab_parallel)
            if entering and isinstance(tp, Shard) and not keeps_split:
                tp = R
                needs.append((a.name, "tp", R))
            elif entering and sp_layer and _whole(tp) and shape(a) == self.stream[unit.name]:
                # the residual stream enters a sequence-parallel layer: split it on the
                # sequence right away, as Megatron does after the embedding (a partial sum
                # from a vocab-parallel embedding is reduce-scattered onto the split)
                tp = Shard(1)
                needs.append((a.name, "tp", tp))
            if node in self.kv_whole and not isinstance(tp, Replicate) and a not in self.params:
                tp = R  # the whole projection reads its whole input (Megatron-SP's gather)
                needs.append((a.name, "tp", R))
            eff["dp"][a], eff["tp"][a] = dp, tp
        segment = unit.kind == "segment"
        shard_w = s.tp > 1 and (not segment or (s.vocab_parallel and self.vocab is not None))
        shard_w = shard_w and not s.ulysses  # Ulysses keeps every weight whole
        shard_w = shard_w and node not in self.kv_whole
        vocab = self.vocab if segment else None
        return {
            "dp": OpView(node, s.dp, eff["dp"], params=self.params),
            "tp": OpView(
                node, s.tp, eff["tp"], shard_w, s.sp, self.params, vocab, sp_layer and s.ulysses
            ),
        }

    def _mark_blocks(self, split: fx.Node, d: Decision) -> bool:
        """Find the column-parallel linear whose output `split` (a split, slice or view)
        cuts into blocks, through views that keep its split dim, and record that its weight
        is sharded block by block: at every boundary any of its readers cuts
        (`_blocks_conflicts` then checks each reader reads whole blocks). False where there
        is no such producer: the split must then gather."""
        src = _a(split)[0]
        while isinstance(src, fx.Node) and src.target in _SHAPE_PRESERVING:
            before = _a(src)[0]
            if _split_size(src, self.place["tp"]) != _split_size(before, self.place["tp"]):
                return False  # a view that merged or cut the split dim: blocks differ
            src = before
        placement = PLACEMENT.get(src) if isinstance(src, fx.Node) else None
        if placement is None or "column" not in placement.kinds or src in self.unblocked:
            return False
        cuts = _bounds(placement.blocks) | _bounds(kind_blocks(d.kind.split("+")))
        PLACEMENT.set(src, dataclasses.replace(placement, blocks=_sizes(cuts)))
        return True


_PROJECTION_PATH = {
    *_SHAPE_PRESERVING,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.chunk.default,
    torch.ops.aten.unbind.int,
    operator.getitem,
}
"""Ops between a projection and the view that cuts it into heads (fused qkv pieces)."""
_PROJECTIONS = {
    torch.ops.aten.linear.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.matmul.default,
    torch.ops.aten.mm.default,
}


def _kv_whole(gm: fx.GraphModule, strategies: dict[str, LayerStrategy]) -> set[fx.Node]:
    """The key/value projections of tensor-parallel layers whose heads their tp does not
    divide (sdpa or eager attention): split on their output they would cut heads, so they
    run whole."""
    out: set[fx.Node] = set()
    for unit, nodes in unit_nodes(gm).items():
        s = strategies[unit]
        if s.tp == 1 or s.ulysses:
            continue
        for core in attention_cores(nodes):
            out |= _whole_projections(attention_operands(core), s.tp)
    return out


def _whole_projections(operands: tuple[fx.Node, fx.Node, fx.Node] | None, tp: int) -> set[fx.Node]:
    """The projections the keys and values of one attention come from, where the view
    that cut them into heads made a head count `tp` does not divide."""
    out: set[fx.Node] = set()
    if operands is None:
        return out
    head_dim = shape(operands[0])[-1]
    for operand in operands[1:]:
        cut = head_cut(operand, head_dim)
        if cut is None or shape(cut)[-2] % tp == 0:
            continue
        src = _a(cut)[0]
        for _ in range(8):
            if not isinstance(src, fx.Node) or src.target not in _PROJECTION_PATH:
                break
            src = src.args[0]
        if isinstance(src, fx.Node) and src.target in _PROJECTIONS:
            out.add(src)
    return out


def _blocks_conflicts(gm: fx.GraphModule) -> set[fx.Node]:
    """Producers split block by block that some reader (through views keeping the split)
    took as plainly split, gathering it, say: pieces gathered in rank order would come
    back with the blocks interleaved. Every reader must cut the same blocks."""
    out = set()
    for node in gm.graph.nodes:
        blocks = PLACEMENT.get(node).blocks if PLACEMENT.has(node) else ()
        if not blocks:
            continue
        todo = list(node.users)
        while todo:
            reader = todo.pop()
            p = PLACEMENT.get(reader)
            if _reads_whole_blocks(reader, kind_blocks(p.kinds), _bounds(blocks)):
                continue
            if reader.target in _SHAPE_PRESERVING and not p.needs:
                todo.extend(reader.users)
                continue
            out.add(node)
            break
    return out


def _bounds(blocks: tuple[int, ...]) -> set[int]:
    """Where blocks of these sizes start and end: (64, 32, 32) -> {0, 64, 96, 128}."""
    return {0, *itertools.accumulate(blocks)} if blocks else set()


def _sizes(bounds: set[int]) -> tuple[int, ...]:
    cuts = sorted(bounds)
    return tuple(b - a for a, b in itertools.pairwise(cuts))


def _reads_whole_blocks(reader: fx.Node, asked: tuple[int, ...], cuts: set[int]) -> bool:
    """A split or view cutting exactly the producer's blocks, or a slice reading one."""
    if not asked:
        return False
    if reader.target is not torch.ops.aten.slice.Tensor:
        return _bounds(asked) == cuts
    start, stop = slice_bounds(reader)
    return start in cuts and stop in cuts and not any(start < c < stop for c in cuts)


def _split_size(node: fx.Node, place: dict[fx.Node, object]) -> int | None:
    """The global size of the dim `node` is split on (None: not split)."""
    p = place.get(node)
    return shape(node)[p.dim] if isinstance(p, Shard) else None


def _check_batch(batch: set[fx.Node], strategies: dict[str, LayerStrategy]) -> None:
    size = next((shape(n)[0] for n in batch), None)
    for unit, s in strategies.items():
        if size is not None and size % s.dp:
            raise ValueError(
                f"unit {unit!r}: dp={s.dp} does not divide the batch of {size} (the example "
                "inputs' first dimension); give a batch that every unit's dp divides"
            )


def _stream_shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...] | None]:
    """Per layer, the shape of its last value when it is (batch, sequence, hidden): the
    residual stream that sequence parallelism splits between layers."""
    out: dict[str, tuple[int, ...] | None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            s = shape(node)
            out[LAYER.get(node).name] = s if len(s) == 3 else None
    return out


def _whole(p: object) -> bool:
    """Replicated or a partial sum: not yet split on the axis."""
    return isinstance(p, (Replicate, Partial))


def _warn_fallbacks(fallbacks: dict[str, dict[str, list[str]]]) -> None:
    """One warning per op (not per node: a 96-layer model would print 96), naming its
    layers. Gathering is correct but costs a collective the cost model may not expect."""
    for op, layers in fallbacks.items():
        where = "; ".join(f"layer {layer!r} (nodes {nodes})" for layer, nodes in layers.items())
        warnings.warn(
            f"no sharding rule lets {op} run split: gathering its inputs first in {where}. "
            "Correct but slower; add a rule to galvatron_fx.passes.shard_rules.RULES to keep "
            "it split",
            ShardWarning,
            stacklevel=4,
        )


def _a(node: fx.Node) -> Any:
    """A node's arguments, untyped: the caller knows the op's signature."""
    return node.args
