"""Recompute: wrap a unit's compute (full) or its attention cores (selective) in
`torch.utils.checkpoint`, so backward recomputes them instead of keeping their activations.

Reads: `gfx_layer` (which unit a node belongs to) and, in the pass form, the plan in
`ctx.results["plan"]` (each unit's `LayerStrategy.recompute`); without a plan it does nothing.
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
from collections.abc import Callable, Mapping

import torch
import torch.utils.checkpoint
from torch import fx
from torch.distributed.tensor import Replicate

from galvatron_fx.meta import LAYER, PLACEMENT, LayerTag, NodePlacement
from galvatron_fx.passes.group_layers import unit_nodes
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.plan import Plan, Recompute
from galvatron_fx.runtime import collectives as C

__all__ = [
    "attention_cores",
    "attention_operands",
    "recompute",
    "recompute_regions",
]

R = Replicate()

_NEVER = (C.zero3_issue, C.zero3_use)
"""Kept out of regions: a prefetch for the next layer must not run again in recomputation,
and a region must not take an all-gather still in flight as an input (checkpoint would save
a tensor the collective is still writing). The gathered buffer enters the region instead,
saved by checkpoint as a recipe to gather it again (`collectives.zero3_saved_tensors`)."""

_SDPA_PREFIXES = ("scaled_dot_product", "_scaled_dot_product")
_MATMULS = frozenset({"matmul", "bmm", "baddbmm"})
_SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
_SCORE_OPS = _SOFTMAX | {
    # what eager attention does between q @ k^T and probs @ v: scale, mask, cast, dropout
    *("div", "mul", "add", "sub", "masked_fill", "where", "tanh", "clamp"),
    *("dropout", "native_dropout", "getitem", "to", "_to_copy", "type_as"),
    *("view", "reshape", "_unsafe_view", "expand", "clone", "contiguous", "alias"),
}


@graph_pass(reads=(LAYER.name, PLACEMENT.name), writes=(LAYER.name, PLACEMENT.name))
def recompute(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Checkpoint every unit whose strategy in the plan asks for recomputation."""
    plan = ctx.results.get("plan")
    if not isinstance(plan, Plan):
        return gm
    return recompute_regions(gm, {unit: s.recompute for unit, s in plan.strategies})


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
            regions.append(
                [n for n in units[unit] if n.op == "call_function" and n.target not in _NEVER]
            )
        elif mode is Recompute.SELECTIVE:
            regions.extend(attention_cores(units[unit]))
    for region in regions:
        if region:
            _checkpoint_region(gm, region)
    gm.graph.lint()
    gm.recompile()
    return gm


def attention_cores(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """The attention cores among `nodes` (one unit), each in graph order: an sdpa node with
    its `getitem`s, or the eager chain from `q @ k^T` through softmax to `@ v`."""
    unit = set(nodes)
    cores: list[list[fx.Node]] = []
    taken: set[fx.Node] = set()
    for node in nodes:
        name = _op_name(node)
        if name.startswith(_SDPA_PREFIXES):
            core = [node, *(u for u in node.users if u.target is operator.getitem)]
        elif name in _SOFTMAX:
            core = _eager_core(node, unit)
        else:
            continue
        if core and not taken.intersection(core):
            taken.update(core)
            cores.append(_absorb_checks(core, unit))
    return cores


def attention_operands(core: list[fx.Node]) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(queries, keys, values) of an attention core: sdpa's first three arguments, or the
    eager chain's `q @ k^T` operands and the `@ v` one (keys as the chain reads them,
    transposed). None where they are not nodes."""
    matmuls = [n for n in core if _op_name(n) in _MATMULS]
    if _op_name(core[0]).startswith(_SDPA_PREFIXES):
        operands = core[0].args[:3]
    elif len(matmuls) >= 2:
        first, last = matmuls[0], matmuls[-1]
        skip = 1 if _op_name(first) == "baddbmm" else 0  # baddbmm(bias, q, k^T)
        operands = (first.args[skip], first.args[skip + 1], last.args[1])
    else:
        return None
    if not all(isinstance(a, fx.Node) for a in operands):
        return None
    q, k, v = operands
    return q, k, v  # type: ignore[return-value]


def _op_name(node: fx.Node) -> str:
    """`softmax` for `aten.softmax.int` (or `torch.softmax`); `getitem`; '' for non-calls."""
    if node.op != "call_function":
        return ""
    target = getattr(node.target, "overloadpacket", node.target)
    return str(getattr(target, "__name__", ""))


def _eager_core(softmax: fx.Node, unit: set[fx.Node]) -> list[fx.Node]:
    """Nodes on the paths from the nearest matmul before `softmax` to the nearest after it,
    walking through score ops only (so an MLP or a router softmax is never taken)."""
    first = _nearest_matmul(softmax, unit, lambda n: n.all_input_nodes)
    last = _nearest_matmul(softmax, unit, lambda n: list(n.users))
    if first is None or last is None:
        return []
    between = _reach(first, unit, lambda n: list(n.users)) & _reach(
        last, unit, lambda n: n.all_input_nodes
    )
    return [n for n in softmax.graph.nodes if n in between]


def _nearest_matmul(
    start: fx.Node, unit: set[fx.Node], step: Callable[[fx.Node], list[fx.Node]]
) -> fx.Node | None:
    """Breadth-first from `start` by `step` through score ops: the first matmul met."""
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for node in frontier:
            for other in step(node):
                if other in seen or other not in unit:
                    continue
                if _op_name(other) in _MATMULS:
                    return other
                if _op_name(other) in _SCORE_OPS:
                    seen.add(other)
                    nxt.append(other)
        frontier = nxt
    return None


def _reach(
    start: fx.Node, unit: set[fx.Node], step: Callable[[fx.Node], list[fx.Node]]
) -> set[fx.Node]:
    """`start` and every node of `unit` reachable from it by `step`."""
    seen, stack = {start}, [start]
    while stack:
        for other in step(stack.pop()):
            if other in unit and other not in seen:
                seen.add(other)
                stack.append(other)
    return seen


def _absorb_checks(core: list[fx.Node], unit: set[fx.Node]) -> list[fx.Node]:
    """Add the value-less leaf users of the core (export's `_assert_tensor_metadata`), which
    would otherwise make their input a needless region output."""
    inside = set(core)
    extra = {
        u
        for n in core
        for u in n.users
        if u in unit and u not in inside and not u.users and u.meta.get("val") is None
    }
    return [n for n in core[0].graph.nodes if n in inside or n in extra]


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
