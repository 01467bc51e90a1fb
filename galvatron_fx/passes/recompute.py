"""Recompute: wrap a unit's compute (full) or its attention cores (selective) in
`torch.utils.checkpoint`, so backward recomputes them instead of keeping their activations.

Reads: `gfx_layer` (which unit a node belongs to) and, in the pass form, the plan in
`ctx.target.plan` (each unit's `LayerStrategy.recompute`); without a target it does nothing.
Writes: `gfx_layer` on the nodes it creates (the unit's tag, copied); no other `gfx_` key.
Guarantees:
- a region becomes one node `checkpoint(get_attr(recompute_<i>), *inputs, use_reentrant=False)`
  followed by one `getitem` per output when it has several; tracing through checkpoint would
  inline it, so the region is cut out of the graph by hand;
- `recompute_<i>` is `fx.GraphModule(gm, region)`: its `get_attr` nodes reach the very
  Parameter objects of `gm` (no copies, gradients land on the root's parameters);
- full: every `call_function` node of the unit; selective (Korthikanti et al. 2022): each
  attention core, i.e. an sdpa node, or the eager chain `q @ k^T -> softmax -> ... -> @ v`;
  a unit without one is left alone;
- the RNG state is preserved (checkpoint's default), so dropout masks are recomputed exactly;
- every new node has `val`, `gfx_layer` and the `nn_module_stack` of what it replaces.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils.checkpoint
from torch import fx
from torch.distributed.tensor import Replicate

from galvatron_fx.meta import COST, LAYER, PLACEMENT, LayerTag, NodePlacement
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.plan import Recompute
from galvatron_fx.runtime import collectives as C
from galvatron_fx.unit_graph.attention import attention_cores
from galvatron_fx.unit_graph.units import unit_nodes

__all__ = ["full_region", "inline_regions", "recompute", "recompute_regions", "rerun_nodes"]

R = Replicate()

_NEVER = (C.zero3_issue, C.zero3_use)
"""Kept out of regions: a prefetch for the next layer must not run again in recomputation,
and a region must not take an all-gather still in flight as an input (checkpoint would save
a tensor the collective is still writing). The gathered buffer enters the region instead,
saved by checkpoint as a recipe to gather it again (`collectives.zero3_saved_tensors`)."""


@graph_pass(reads=(LAYER.name, PLACEMENT.name), writes=(LAYER.name, PLACEMENT.name))
def recompute(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Checkpoint every unit whose strategy in the plan asks for recomputation."""
    if ctx.target is None:
        return gm
    return recompute_regions(gm, {unit: s.recompute for unit, s in ctx.target.plan.strategies})


def recompute_regions(gm: fx.GraphModule, modes: Mapping[str, Recompute]) -> fx.GraphModule:
    """Rewrite `gm` in place so the units in `modes` recompute in backward; returns `gm`.
    ValueError names a unit that is not in the graph."""
    units = unit_nodes(gm)
    unknown = [u for u in modes if u not in units]
    if unknown:
        raise ValueError(f"recompute: unknown unit(s) {unknown}; known units: {list(units)}")
    regions: list[list[fx.Node]] = []
    for unit, mode in modes.items():
        mode = Recompute(mode)
        if mode is Recompute.FULL:
            regions.append(full_region(units[unit]))
        elif mode is Recompute.SELECTIVE:
            regions.extend(attention_cores(units[unit]))
    regions = [r for r in regions if r]
    for region in regions:
        _checkpoint_region(gm, region)
    if regions:  # nothing checkpointed: the module's code is still the graph's
        gm.graph.lint()
        gm.recompile()
    return gm


def _checkpoint_region(gm: fx.GraphModule, region: list[fx.Node]) -> None:
    """Replace `region` (nodes in graph order) by a checkpoint call of a new submodule."""
    inside = set(region)
    inputs = _outside_args(region, inside, attrs=False)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    if not outputs:
        return  # dead code: nothing to save memory on
    before = _insertion_point(gm, region, inputs, outputs)
    name = _free_name(gm)
    gm.add_submodule(name, fx.GraphModule(gm, _region_graph(region, inputs, outputs)))
    with gm.graph.inserting_before(before):
        results = _insert_call(gm, name, inputs, outputs, LAYER.get(region[0]))
    for result, out in zip(results, outputs, strict=True):
        out.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region):  # users before producers
        gm.graph.erase_node(node)


def _insert_call(
    gm: fx.GraphModule, name: str, inputs: list[fx.Node], outputs: list[fx.Node], tag: LayerTag
) -> list[fx.Node]:
    """The checkpoint call and, for several outputs, one getitem each: what replaces them."""
    ref = gm.graph.get_attr(name)
    _copy_meta(ref, outputs[0], tag, val=False)
    call = gm.graph.call_function(
        torch.utils.checkpoint.checkpoint, (ref, *inputs), {"use_reentrant": False}
    )
    _copy_meta(call, outputs[0], tag)
    if len(outputs) == 1:
        return [call]
    call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
    if PLACEMENT.has(outputs[0]):
        places = [PLACEMENT.get(o) for o in outputs]
        dp, tp = tuple(p.dp for p in places), tuple(p.tp for p in places)
        PLACEMENT.set(call, NodePlacement(dp, tp, "checkpoint"))
    results = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for result, out in zip(results, outputs, strict=True):
        _copy_meta(result, out, tag)
    return results


def _outside_args(region: list[fx.Node], inside: set[fx.Node], *, attrs: bool) -> list[fx.Node]:
    """Nodes the region reads from outside, in first-use order: the `get_attr`s (parameters
    and buffers, which move into the region) when `attrs`, else every other value (inputs)."""
    seen: dict[fx.Node, None] = {}
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in inside and (arg.op == "get_attr") == attrs:
                seen.setdefault(arg)
    return list(seen)


def _insertion_point(
    gm: fx.GraphModule, region: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]
) -> fx.Node:
    """The node to insert the checkpoint before: the region's first node, or the one after
    its last input when a selective core uses a value (say v) computed after the core starts.
    Both precede every outside user of the region."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(inputs, key=order.__getitem__, default=None)
    if last is None or order[last] < order[region[0]]:
        return region[0]
    inside = set(region)
    first_user = min(order[u] for o in outputs for u in o.users if u not in inside)
    if first_user < order[last]:
        raise ValueError(
            f"recompute: region at {region[0].name!r} has an output used (at node "
            f"{list(gm.graph.nodes)[first_user].name!r}) before its input {last.name!r} exists"
        )
    return last.next


def _region_graph(region: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    """The region as a standalone graph: placeholders for `inputs`, the parameters it reads
    as `get_attr`s (same targets as in the root), a tuple output when there are several."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for arg in inputs:
        env[arg] = graph.placeholder(arg.name)
        env[arg].meta = dict(arg.meta)
    for attr in _outside_args(region, set(region), attrs=True):
        env[attr] = graph.get_attr(str(attr.target))
        env[attr].meta = dict(attr.meta)
    for node in region:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return graph


def _copy_meta(new: fx.Node, old: fx.Node, tag: LayerTag, *, val: bool = True) -> None:
    """PyTorch's keys of `old` (`val` optional), the unit's tag and the placement of the value
    (with nothing left to redistribute); not the cost, which described one node."""
    for key, value in old.meta.items():
        if not key.startswith("gfx_") and (val or key != "val"):
            new.meta[key] = value
    LAYER.set(new, tag)
    if PLACEMENT.has(old):
        p = PLACEMENT.get(old)
        PLACEMENT.set(new, NodePlacement(p.dp, p.tp, "checkpoint") if val else NodePlacement(R, R))


def _free_name(gm: fx.GraphModule) -> str:
    i = 0
    while hasattr(gm, f"recompute_{i}"):
        i += 1
    return f"recompute_{i}"


def inline_regions(gm: fx.GraphModule) -> tuple[fx.GraphModule, frozenset[str]]:
    """The program with every checkpointed region put back in line (a new module over the
    same parameters; `gm` itself unchanged), and the names of the region nodes backward
    runs again (`rerun_nodes`). Readers of a lowered graph (pricing) see every node of the
    program, wherever recomputation moved it."""
    if not any(n.target is torch.utils.checkpoint.checkpoint for n in gm.graph.nodes):
        return gm, frozenset()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    attrs: dict[str, fx.Node] = {}
    recomputed: set[str] = set()
    for node in gm.graph.nodes:
        if node.target is torch.utils.checkpoint.checkpoint:
            region = gm.get_submodule(str(_a(node)[0].target))
            assert isinstance(region, fx.GraphModule)
            inputs = [env[a] for a in node.args[1:]]
            env[node] = _inline(graph, region.graph, inputs, attrs, recomputed)
        elif node.op == "get_attr" and isinstance(_module_at(gm, node), fx.GraphModule):
            env[node] = None  # a region's reference: inlined at its call
        elif node.target is operator.getitem and isinstance(env.get(_a(node)[0]), tuple):
            env[node] = env[_a(node)[0]][_a(node)[1]]
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            if node.op == "get_attr":
                attrs.setdefault(str(node.target), env[node])
    inlined = fx.GraphModule(gm, graph)
    _carry_attributes(gm, inlined)
    return inlined, frozenset(recomputed)


def _carry_attributes(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """The parameters and buffers of `src` that `dst` lacks: `fx.GraphModule` copies only the
    attributes its graph reads, and readers look up every parameter the program holds
    (a rotary model's unused `original_inv_freq` buffer, say)."""
    named = [
        *src.named_parameters(remove_duplicate=False),
        *src.named_buffers(remove_duplicate=False),
    ]
    for name, value in named:
        *path, last = name.split(".")
        owner: torch.nn.Module = dst
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if not hasattr(owner, last):
            setattr(owner, last, value)


def _inline(
    graph: fx.Graph,
    region: fx.Graph,
    inputs: list[fx.Node],
    attrs: dict[str, fx.Node],
    recomputed: set[str],
) -> Any:
    """Copy `region`'s nodes into `graph` on `inputs`: its output (a node or a tuple)."""
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    computed: list[fx.Node] = []
    for node in region.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "get_attr":
            if str(node.target) not in attrs:
                attrs[str(node.target)] = graph.node_copy(node)
            env[node] = attrs[str(node.target)]
        elif node.op == "output":
            recomputed.update(n.name for n in rerun_nodes(computed))
            out = _a(node)[0]
            return tuple(env[o] for o in out) if isinstance(out, (tuple, list)) else env[out]
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            computed.append(env[node])
    raise AssertionError("a region graph ends with its output")


def full_region(nodes: list[fx.Node]) -> list[fx.Node]:
    """What full recomputation checkpoints of a unit (its `nodes`, in graph order): every
    computed node but the ZeRO-3 gathers (`_NEVER`)."""
    return [n for n in nodes if n.op == "call_function" and n.target not in _NEVER]


def rerun_nodes(region: list[fx.Node]) -> list[fx.Node]:
    """The nodes of a checkpointed `region` (in order) backward really runs again:
    non-reentrant checkpoint stops recomputing once every tensor the region saved for
    backward is back (`torch.utils.checkpoint`'s early stop, on by default), so what follows
    the last node that saves one is not re-run (a row-parallel block's closing all-reduce)."""
    saving = [i for i, n in enumerate(region) if COST.has(n) and COST.get(n).saved]
    return region[: saving[-1] + 1] if saving else []


def _module_at(gm: fx.GraphModule, node: fx.Node) -> torch.nn.Module | None:
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _a(node: fx.Node) -> Any:
    """A node's arguments, untyped: the caller knows the op's signature."""
    return node.args
