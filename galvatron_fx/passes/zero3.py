"""ZeRO-3 / sharded data parallelism: each layer's parameters stored as one flat 1/dp shard,
gathered (prefetched one layer ahead) before use.

Reads: `gfx_layer`, `ctx.target` (plan, rank), `ctx.params`.
Writes: for every unit whose strategy is ZeRO-3 with dp > 1:
- one parameter `zero3_<unit>` on the module: this rank's 1/dp of the unit's trainable
  parameters (their tensor-parallel pieces, flattened, concatenated, zero-padded to a
  multiple of dp); the unit's own parameter attributes are removed;
- `zero3_issue` at the start of the previous ZeRO-3 unit (at the first for the first one,
  and for the first of a pipeline stage: `ctx.target.unit_stage`): the all-gather starts
  while that unit computes (FSDP's forward prefetch);
- `zero3_use` where the unit begins: waits for the gather; the parameters are views of the
  gathered buffer (`zero3_views`), replacing their `get_attr` nodes;
- each `ParamSpec` records its flat buffer and offset.
Guarantees: per-rank parameter memory is 1/dp of the layer's (up to padding); the gradient
of the whole buffer is reduce-scattered once per unit, asynchronously, and lands on the shard
in `GradSync.finish`; saved views of gathered parameters are dropped after the forward and
gathered again in backward (`runtime.collectives.zero3_saved_tensors`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import replace

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.tensor import Replicate

from galvatron_fx.meta import LAYER, PLACEMENT, NodePlacement
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.plan import DPMode, Plan
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.program import ParamSpec, get_attr

__all__ = ["zero3"]

R = Replicate()


@graph_pass(reads=("val", LAYER.name, PLACEMENT.name), writes=(LAYER.name, PLACEMENT.name))
def zero3(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Shard ZeRO-3 units' parameters across their dp group; gather them ahead of use."""
    target = ctx.require_target("zero3")
    plan, specs = target.plan, ctx.params
    units = _zero3_units(gm, plan, specs)
    mode = _fake_mode(gm)
    stage_of = target.unit_stage
    previous: fx.Node | None = None
    for unit, nodes in units.items():
        first = _first_compute(gm, unit)
        before = LAYER.get(previous).name if previous is not None else None
        if before is not None and stage_of.get(before, 0) != stage_of.get(unit, 0):
            before = None  # a gather never crosses a pipeline stage boundary
        issue_at = _first_compute(gm, before) if before is not None else first
        previous = _flatten_unit(gm, unit, nodes, specs, target.rank, (issue_at, first), mode)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    if target.codegen:  # a rewrite for pricing never runs the module
        gm.recompile()
    return gm


def _zero3_units(
    gm: fx.GraphModule, plan: Plan, specs: dict[str, ParamSpec]
) -> dict[str, list[fx.Node]]:
    """The trainable parameters' `get_attr` nodes of every ZeRO-3 unit, units in the plan's
    (data-flow) order: each gather is chained to the unit computed before it, wherever the
    parameter reads sit in the graph."""
    out: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        spec = specs.get(_name(node)) if node.op == "get_attr" else None
        if spec is None or spec.dp_group.size == 1:
            continue
        if plan.strategy(spec.unit).dp_mode is not DPMode.ZERO3:
            continue
        if isinstance(get_attr(gm, _name(node)), nn.Parameter):
            out.setdefault(spec.unit, []).append(node)
    order = {u: i for i, u in enumerate(plan.units)}
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


def _first_compute(gm: fx.GraphModule, unit: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_function" and LAYER.get(n).name == unit)


def _flatten_unit(
    gm: fx.GraphModule,
    unit: str,
    nodes: list[fx.Node],
    specs: dict[str, ParamSpec],
    rank: int,
    at: tuple[fx.Node, fx.Node],
    mode: FakeTensorMode,
) -> fx.Node:
    """Replace the unit's parameters by one flat shard, issued at `at[0]`, used at `at[1]`;
    returns the `zero3_use` node."""
    issue_at, use_at = at
    owners = [n for n in nodes if specs[_name(n)].alias_of is None]
    params = [get_attr(gm, _name(n)) for n in owners]
    group = specs[_name(owners[0])].dp_group
    flat_name = "zero3_" + re.sub(r"\W", "_", unit)
    full = torch.cat([p.detach().reshape(-1) for p in params])
    shard = C.flat_shard(full, group, rank)
    gm.register_parameter(flat_name, nn.Parameter(shard))
    offsets = dict(zip((_name(n) for n in owners), _offsets(params), strict=True))
    tag = LAYER.get(use_at)
    with gm.graph.inserting_before(issue_at):
        flat = gm.graph.get_attr(flat_name)
        issued = gm.graph.call_function(C.zero3_issue, (flat, group.ranks))
    with gm.graph.inserting_before(use_at):
        used = gm.graph.call_function(C.zero3_use, (issued, flat, group.ranks, full.numel()))
        shapes = tuple(tuple(p.shape) for p in params)
        views = gm.graph.call_function(C.zero3_views, (used, shapes))
        items = [gm.graph.call_function(operator.getitem, (views, i)) for i in range(len(params))]
    gathered = torch.empty(shard.numel() * group.size, dtype=shard.dtype, device="meta")
    _meta([flat], LAYER.get(issue_at), shard, mode)  # where it runs: units stay contiguous
    _meta([issued], LAYER.get(issue_at), gathered, mode)
    _meta([used], tag, full, mode)
    _meta([views], tag, tuple(p.detach() for p in params), mode)
    for item, p in zip(items, params, strict=True):
        _meta([item], tag, p.detach(), mode)
    by_target = {_name(n): items[i] for i, n in enumerate(owners)}
    for node in nodes:
        owner = specs[_name(node)].alias_of or _name(node)
        node.replace_all_uses_with(by_target[owner])
        specs[_name(node)] = replace(
            specs[_name(node)],
            zero3_shape=tuple(get_attr(gm, owner).shape),
            zero3_flat=flat_name,
            zero3_offset=offsets[owner],
        )
    for node in nodes:
        gm.graph.erase_node(node)
    for target in {_name(n) for n in nodes}:
        _delete_attr(gm, target)
    return used


def _offsets(params: list[torch.Tensor]) -> list[int]:
    out, at = [], 0
    for p in params:
        out.append(at)
        at += p.numel()
    return out


def _meta(nodes: list[fx.Node], tag: object, like: object, mode: FakeTensorMode) -> None:
    """Fake `val`s shaped like `like` (a tensor or a tuple of them), the unit's tag, and a
    replicated placement (these values are whole on every rank of the unit)."""
    for node in nodes:
        node.meta["val"] = _fake(like, mode)
        LAYER.set(node, tag)  # type: ignore[arg-type]
        dp = tuple(R for _ in like) if isinstance(like, tuple) else R
        PLACEMENT.set(node, NodePlacement(dp, dp, "zero3"))


def _fake(like: object, mode: FakeTensorMode) -> object:
    if isinstance(like, tuple):
        return tuple(_fake(x, mode) for x in like)
    assert isinstance(like, torch.Tensor)
    with mode:
        return torch.empty(tuple(like.shape), dtype=like.dtype)


def _fake_mode(gm: fx.GraphModule) -> FakeTensorMode:
    return next(
        n.meta["val"].fake_mode for n in gm.graph.nodes if isinstance(n.meta.get("val"), FakeTensor)
    )


def _delete_attr(gm: nn.Module, target: str) -> None:
    *path, last = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    if hasattr(owner, last):
        delattr(owner, last)


def _name(node: fx.Node) -> str:
    """A `get_attr` node's target: the attribute's dotted path."""
    return str(node.target)
