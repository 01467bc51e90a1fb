"""ZeRO-3 / sharded data parallelism: parameters stored as 1/dp shards, gathered around use.

Reads: `gfx_layer`, `ctx.results["plan"]`, `ctx.results["rank"]`, `ctx.results["params"]`.
Writes: for every parameter of a layer whose strategy is ZeRO-3 with dp > 1: the module
attribute becomes this rank's flat shard (the tensor-parallel piece, flattened, padded to a
multiple of dp, cut in dp parts); a `zero3_gather` node after its `get_attr` rebuilds the
full piece for the layer's ops; its `ParamSpec` records the shard.
Guarantees: per-rank parameter memory is 1/dp of the layer's (up to padding); the gather's
backward reduce-scatters the gradient (the data-parallel sum happens there, nothing else
syncs it); saved tensors of gathered parameters are dropped after the forward and gathered
again in backward (`runtime.collectives.zero3_saved_tensors`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx, nn

from galvatron_fx.meta import LAYER, PLACEMENT
from galvatron_fx.passes.insert_collectives import ParamSpec, get_attr, set_attr
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.plan import DPMode, Plan
from galvatron_fx.runtime import collectives as C

__all__ = ["zero3"]


@graph_pass(reads=("val", LAYER.name, PLACEMENT.name), writes=(LAYER.name, PLACEMENT.name))
def zero3(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Shard ZeRO-3 layers' parameters across their dp group and gather them before use."""
    plan: Plan = ctx.results["plan"]
    rank = int(ctx.results.get("rank", 0))
    specs: dict[str, ParamSpec] = ctx.results["params"]
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in specs:
            continue
        s = plan.strategy(LAYER.get(node).name)
        spec = specs[node.target]
        if s.dp_mode is not DPMode.ZERO3 or spec.dp_group.size == 1:
            continue
        if spec.alias_of is None:
            specs[node.target] = _shard(gm, node, spec, rank)
        else:  # a tied parameter: share the shard made for its first name
            set_attr(gm, node.target, get_attr(gm, spec.alias_of))
            first = specs[spec.alias_of]
            specs[node.target] = replace(spec, zero3_shape=first.zero3_shape)
            _gather_before_use(gm, node, spec, first.zero3_shape, node.meta["val"])
    gm.graph.lint()
    gm.recompile()
    return gm


def _shard(gm: fx.GraphModule, node: fx.Node, spec: ParamSpec, rank: int) -> ParamSpec:
    param = get_attr(gm, node.target)
    local_shape = tuple(param.shape)
    shard = C.flat_shard(param.detach(), spec.dp_group, rank)
    set_attr(gm, node.target, nn.Parameter(shard, requires_grad=param.requires_grad))
    _gather_before_use(gm, node, spec, local_shape, node.meta["val"])
    return replace(spec, zero3_shape=local_shape)


def _gather_before_use(
    gm: fx.GraphModule, node: fx.Node, spec: ParamSpec, shape: tuple[int, ...], val: torch.Tensor
) -> None:
    shard = get_attr(gm, node.target)
    with val.fake_mode:
        node.meta["val"] = torch.empty(shard.shape, dtype=val.dtype)
    users = list(node.users)
    numel = math.prod(shape)
    with gm.graph.inserting_after(node):
        gathered = gm.graph.call_function(C.zero3_gather, (node, spec.dp_group.ranks, shape, numel))
    gathered.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "gfx_cost")})
    gathered.meta["val"] = val
    for u in users:
        u.replace_input_with(node, gathered)
