"""Ops that gather: before anything runs, which ops of an analysed graph would make the
rewrite gather their inputs under tensor or data parallelism.

The answer comes from the real sharding propagation (`passes/shard.py`), run on a copy of
the graph under a representative uniform plan (`representative_plan`): every layer at the
largest tp up to `max_tp` that divides its heads and split widths, the rest of the world as
data parallelism (at least `dp`), and the segments plain data-parallel over the whole world.
A node that needs whole an input that arrives split is listed with the axis it gathers on
and the inputs it gathers: ops with no rule (placement kind `fallback`, which the pass also
reports as `ShardWarning`s, kept beside) and ops whose rule gathers by design (a softmax or
cumsum along the split dim), which no warning names.
Gathering is correct, but costs a collective and whole-size activations that a plan of
split layers does not expect: these are the ops to give a rule.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import fx
from torch.distributed.tensor import Replicate, Shard

from galvatron_fx.meta import LAYER, PLACEMENT, NodePlacement
from galvatron_fx.passes.manager import PassContext, RewriteTarget, run_passes
from galvatron_fx.passes.shard import ShardWarning, batch_inputs, shard
from galvatron_fx.passes.shard_rules import shape
from galvatron_fx.plan import LayerShape, LayerStrategy, Plan
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint

__all__ = [
    "Gather",
    "GatherCheck",
    "find_gathers",
    "format_gathers",
    "gathers_json",
    "largest_tp",
    "representative_plan",
]

Axis = Literal["dp", "tp"]


@dataclass(frozen=True)
class Gather:
    """One node whose op has no rule that keeps its inputs split on one mesh axis."""

    unit: str
    """The layer or segment the node belongs to (`blocks.3`, `head`)."""
    op: str
    """The ATen op (`aten.cumsum.default`)."""
    node: str
    """The node's name in the graph."""
    axis: Axis
    """The mesh axis its inputs are gathered on: `tp` (tensor parallel) or `dp` (batch)."""
    inputs: tuple[str, ...]
    """The input nodes gathered before it runs."""
    fallback: bool
    """True: no rule applied, the pass gathered and warned (`ShardWarning`). False: the
    op's rule gathers by design (a softmax or cumsum along the split dim), silently."""


@dataclass(frozen=True)
class GatherCheck:
    """The plan the propagation ran under, what gathers under it, and the pass's warnings."""

    plan: Plan
    gathers: tuple[Gather, ...]
    warnings: tuple[str, ...]
    """The `ShardWarning` messages of the propagation, one per op and axis."""


def largest_tp(shape_of_unit: LayerShape, limit: int) -> int:
    """The largest tp <= `limit` that divides every head count and split width of a layer."""
    sizes = [*shape_of_unit.heads, *(size for _, size in shape_of_unit.tp_split_dims)]
    return next(t for t in range(limit, 0, -1) if all(s % t == 0 for s in sizes))


def representative_plan(gm: fx.GraphModule, *, dp: int = 2, max_tp: int = 8) -> Plan:
    """Every layer at its `largest_tp` (up to `max_tp`), the world `dp` times the largest of
    them, the rest of it data-parallel; the segments data-parallel over the whole world."""
    shapes = layer_shapes(gm)
    kinds = {LAYER.get(n).name: LAYER.get(n).kind for n in gm.graph.nodes}
    own = {u: largest_tp(s, max_tp) if kinds[u] == "layer" else 1 for u, s in shapes.items()}
    world = dp * max(own.values())
    tps = {u: _largest_common_divisor(tp, world) for u, tp in own.items()}
    strategies = tuple((u, LayerStrategy(tp=tp, dp=world // tp)) for u, tp in tps.items())
    plan = Plan(world, strategies, model_fingerprint(gm))
    plan.check_model(model_fingerprint(gm), shapes, source="the representative plan")
    return plan


def _largest_common_divisor(tp: int, world: int) -> int:
    """The largest degree that divides both a layer's own tp and the world."""
    return max(t for t in range(1, tp + 1) if tp % t == 0 and world % t == 0)


def find_gathers(gm: fx.GraphModule, *, dp: int = 2, max_tp: int = 8) -> GatherCheck:
    """Run the sharding propagation on a copy of `gm` under `representative_plan` and list
    the nodes that gather. `gm` is left as it was. The batch of `gm`'s inputs must divide
    by the plan's data-parallel degrees (`dp` and the world size)."""
    plan = representative_plan(gm, dp=dp, max_tp=max_tp)
    _check_batch(gm, plan)
    ctx = PassContext(target=RewriteTarget(plan, codegen=False))
    with warnings.catch_warnings(record=True) as caught:  # PyTorch's notices on copying too
        warnings.simplefilter("always", ShardWarning)
        copied = run_passes(copy.deepcopy(gm), ctx, [shard])
    found = tuple(g for node in copied.graph.nodes for g in _node_gathers(node))
    messages = tuple(str(w.message) for w in caught if issubclass(w.category, ShardWarning))
    return GatherCheck(plan, found, messages)


def _check_batch(gm: fx.GraphModule, plan: Plan) -> None:
    batch = next((shape(n)[0] for n in batch_inputs(gm)), None)
    if batch is not None and batch % plan.world_size:
        raise ValueError(
            f"finding the ops that gather needs a batch that {plan.world_size} divides (the "
            f"representative plan's data parallelism over the segments), got {batch}; "
            f"capture with a batch of {plan.world_size}"
        )


def _node_gathers(node: fx.Node) -> list[Gather]:
    """Per axis, the inputs `node` needs whole that arrive split (a partial sum made whole is
    a reduction, not a gather), less the layout switches of values entering its unit on tp
    (the boundary gathers them for every op, not for this one)."""
    if not PLACEMENT.has(node) or node.op != "call_function":
        return []
    unit = LAYER.get(node).name
    inputs = {a.name: a for a in node.all_input_nodes}
    by_axis: dict[str, list[str]] = {}
    for name, axis, placement in PLACEMENT.get(node).needs:
        a = inputs.get(name)
        if a is None or axis not in ("dp", "tp") or not isinstance(placement, Replicate):
            continue
        entering = a.op != "get_attr" and LAYER.get(a).name != unit
        if (axis == "tp" and entering) or not _split(PLACEMENT.get(a), axis):
            continue
        by_axis.setdefault(axis, []).append(name)
    op, fallback = str(node.target), "fallback" in PLACEMENT.get(node).kinds
    return [
        Gather(unit, op, node.name, _axis(axis), tuple(dict.fromkeys(names)), fallback)
        for axis, names in by_axis.items()
    ]


def _split(placement: NodePlacement, axis: str) -> bool:
    """Whether a value is split (`Shard`) on the axis; any output of a multi-output op."""
    p = placement.tp if axis == "tp" else placement.dp
    return any(isinstance(q, Shard) for q in (p if isinstance(p, tuple) else (p,)))


def _axis(name: str) -> Axis:
    return "tp" if name == "tp" else "dp"


def _rows(gathers: Sequence[Gather]) -> list[tuple[str, ...]]:
    """(unit, op, axis, why, nodes) per unit, op and axis, in graph order."""
    grouped: dict[tuple[str, str, str, str], list[str]] = {}
    for g in gathers:
        why = "no rule" if g.fallback else "by rule"
        grouped.setdefault((g.unit, g.op, g.axis, why), []).append(g.node)
    return [(*key, ", ".join(nodes)) for key, nodes in grouped.items()]


def format_gathers(check: GatherCheck) -> str:
    """The `ops that gather` section: the plan it assumed, then one row per unit, op and
    axis (or a line saying there are none)."""
    layers = sorted({(s.tp, s.dp) for _, s in check.plan.strategies if s.tp > 1})
    under = ", ".join(f"tp{tp} dp{dp}" for tp, dp in layers) or "no tp (no layer splits)"
    world = check.plan.world_size
    title = f"ops that gather (layers {under}; segments dp{world}; {world} devices)"
    rows = _rows(check.gathers)
    if not rows:
        return f"{title}\n  none: every op keeps its inputs split"
    header = ("unit", "op", "axis", "why", "nodes")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = [title]
    for row in (header, *rows):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def gathers_json(check: GatherCheck) -> dict[str, Any]:
    """`{"world_size", "strategies": {unit: {"tp", "dp"}}, "gathers": [...], "warnings"}`."""
    return {
        "world_size": check.plan.world_size,
        "strategies": {u: {"tp": s.tp, "dp": s.dp} for u, s in check.plan.strategies},
        "gathers": [{**asdict(g), "inputs": list(g.inputs)} for g in check.gathers],
        "warnings": list(check.warnings),
    }
