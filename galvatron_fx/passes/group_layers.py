"""Layers: tag every node with the layer (instance of a repeated block) or segment it belongs to.

Reads: `nn_module_stack` (PyTorch's record of the modules a node ran in) and `get_attr` targets.
Writes: `gfx_layer` (a `LayerTag`) on every node.
Guarantees:
- a *stack* is a module path `P` with numbered children `P.0, P.1, ...` (ModuleList,
  Sequential, or the flattened copy of either in a symbolic_trace'd GraphModule); the outermost
  stack wins, so `T5Block.layer.*` inside `decoder.block.3` stays part of that block;
- each child of a stack is one layer, unless the stack is a stack of *stages*: every child
  `P.i` holds one stack of its own, `P.i.N`, whose blocks are of one class and run one after
  another (Swin's `layers.i.blocks`; T5's `block.i.layer` mixes classes and stays inside its
  block). Then each stage's blocks are layers, grouped by stage (`P.i.N`), and what a stage
  runs outside its blocks (Swin's patch merging) falls to the segments;
- nodes outside every layer form segments named by position: `embedding` (before the first
  layer), `glue_<i>` (between two stacks), `head` (after the last layer) and `loss` (after
  the head's last parameter use);
- parameters belong to the layer named by their path, else to the unit of their first user;
- units are numbered (`LayerTag.index`) in data-flow order: by their first computed node, never
  by where a parameter read sits (a model may register its head before its blocks, and
  export places `get_attr` nodes in registration order); the computed nodes of a unit are
  contiguous, so this order is a topological order of the unit graph;
- `get_attr` nodes are moved (they read no value, so any place before their first user is
  valid) to the top of the graph in that unit order: passes that walk parameters in graph
  order (ZeRO-3's gather chain) meet the units in the order they run;
- structurally identical units share a fingerprint.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import Any, Literal

import torch
from torch import fx

from galvatron_fx.meta import LAYER, LayerTag
from galvatron_fx.passes.manager import PassContext, graph_pass

__all__ = ["group_layers"]

_NUMBERED = re.compile(r"^(.*?)\.?(\d+)(?:\.|$)")
_CHILD_STACK = re.compile(r"^([^.]+)\.(\d+)(?:\.|$)")
"""`blocks.1.attn` -> ('blocks', '1'): a stack that is a direct child of a layer."""
_BLOCK = re.compile(r"^\.(\d+)(?:\.|$)")
"""`.1.attn` (after a stage's stack) -> '1'."""


@graph_pass(reads=("nn_module_stack",), writes=(LAYER.name,))
def group_layers(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Tag every node with its layer or segment and the unit's structural fingerprint."""
    names = _assign_units(gm)
    order = _data_flow_order(gm, names)
    _place_parameter_reads(gm, names, order)
    groups = {unit: _stack_of(unit) for unit in order}
    members: dict[str, list[fx.Node]] = {u: [] for u in order}
    for node in gm.graph.nodes:
        members[names[node]].append(node)
    for index, unit in enumerate(order):
        kind: Literal["layer", "segment"] = "layer" if groups[unit] is not None else "segment"
        tag = LayerTag(
            name=unit,
            kind=kind,
            group=groups[unit] or unit,
            index=index,
            fingerprint=_fingerprint(members[unit]),
        )
        for node in members[unit]:
            LAYER.set(node, tag)
    return gm


def _data_flow_order(gm: fx.GraphModule, names: dict[fx.Node, str]) -> list[str]:
    """Units by their first computed node; a unit with none (a parameter no op reads) by its
    first node of any kind, after those that compute."""
    nodes = list(gm.graph.nodes)
    computed = [names[n] for n in nodes if n.op == "call_function"]
    return list(dict.fromkeys([*computed, *(names[n] for n in nodes)]))


def _place_parameter_reads(gm: fx.GraphModule, names: dict[fx.Node, str], order: list[str]) -> None:
    """Move the `get_attr` nodes, in unit order (stable within a unit), before the graph's
    first other node."""
    reads = [n for n in gm.graph.nodes if n.op == "get_attr"]
    rank = {unit: i for i, unit in enumerate(order)}
    ordered = sorted(reads, key=lambda n: rank[names[n]])
    if ordered == reads:
        return
    anchor = next(n for n in gm.graph.nodes if n.op != "get_attr")
    for node in ordered:
        anchor.prepend(node)


def _layer_of_path(path: str) -> str | None:
    """`model.layers.3.mlp.up` -> `model.layers.3`; None when no component is a number."""
    match = _NUMBERED.match(path)
    if match is None:
        return None
    prefix, idx = match.group(1), match.group(2)
    return f"{prefix}.{idx}" if prefix else idx


def _stack_of(unit: str) -> str | None:
    if unit.rsplit(".", 1)[-1].isdigit():
        return unit.rsplit(".", 1)[0] if "." in unit else "<root>"
    return None


def _module_path(node: fx.Node) -> str | None:
    """The innermost module a node ran in (a parameter: its own path)."""
    if node.op == "get_attr":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next((path for path, _ in reversed(list(stack.values())) if path), None)


def _node_layer(node: fx.Node, stages: dict[str, str]) -> str | None:
    """The layer of a node; inside a stage, its block (None: the stage's own ops)."""
    path = _module_path(node)
    outer = _layer_of_path(path) if path is not None else None
    stack = stages.get(outer) if outer is not None else None
    if path is None or stack is None:
        return outer
    block = _BLOCK.match(path[len(stack) :]) if path.startswith(stack) else None
    return f"{stack}.{block.group(1)}" if block is not None else None


def _stages(computed: list[fx.Node]) -> dict[str, str]:
    """Stage -> its stack of blocks (`swin.encoder.layers.0` -> `...layers.0.blocks`), for
    every stack whose children are all stages: each holds exactly one stack of its own whose
    blocks share a class and each feed the next, and some stage has two blocks or more."""
    classes, members, inner = _nested_stacks(computed)
    by_stack: dict[str | None, list[str]] = {}
    for layer in members:
        by_stack.setdefault(_stack_of(layer), []).append(layer)
    stages: dict[str, str] = {}
    for layers in by_stack.values():
        nested = [inner.get(layer, {}) for layer in layers]
        if not all(len(stacks) == 1 for stacks in nested):
            continue
        blocks = [next(iter(stacks.values())) for stacks in nested]
        if any(len(b) > 1 for b in blocks) and all(
            _repeated(b, classes, members[layer]) for b, layer in zip(blocks, layers, strict=True)
        ):
            stages.update(
                (layer, next(iter(stacks))) for layer, stacks in zip(layers, nested, strict=True)
            )
    return stages


Blocks = dict[str, list[fx.Node]]
"""Block path (`...layers.0.blocks.1`) -> its nodes."""


def _nested_stacks(
    computed: list[fx.Node],
) -> tuple[dict[str, str], dict[str, list[fx.Node]], dict[str, dict[str, Blocks]]]:
    """Module classes by path, every layer's nodes, and per layer the stacks that are its
    direct children with their blocks."""
    classes: dict[str, str] = {}
    members: dict[str, list[fx.Node]] = {}
    inner: dict[str, dict[str, Blocks]] = {}
    for n in computed:
        stack_meta = (n.meta.get("nn_module_stack") or {}).values()
        classes.update((path, str(cls)) for path, cls in stack_meta)
        path = _module_path(n)
        layer = _layer_of_path(path) if path is not None else None
        if path is None or layer is None:
            continue
        members.setdefault(layer, []).append(n)
        child = _CHILD_STACK.match(path[len(layer) + 1 :]) if path.startswith(layer + ".") else None
        if child is not None:
            stack = f"{layer}.{child.group(1)}"
            block = f"{stack}.{child.group(2)}"
            inner.setdefault(layer, {}).setdefault(stack, {}).setdefault(block, []).append(n)
    return classes, members, inner


def _repeated(blocks: Blocks, classes: dict[str, str], stage: list[fx.Node]) -> bool:
    """The blocks share a module class and each reads a value of the one before it, directly
    or through the stage's own ops (parallel heads in a ModuleList read the same input)."""
    kinds = {classes.get(b) for b in blocks}
    if len(kinds) != 1 or None in kinds:  # mixed (T5's attention, FF) or unknown classes
        return False
    ordered = [blocks[b] for b in sorted(blocks, key=lambda b: int(b.rsplit(".", 1)[1]))]
    loose = set(stage).difference(*ordered)
    for before, after in itertools.pairwise(ordered):
        mine, theirs = set(after), set(before)
        todo = [a for n in after for a in n.all_input_nodes if a not in mine]
        seen: set[fx.Node] = set()
        while todo:
            a = todo.pop()
            if a in theirs:
                break
            if a in loose and a not in seen:
                seen.add(a)
                todo += a.all_input_nodes
        else:
            return False
    return True


def _assign_units(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Unit name of every node: layers first, then positional segments, then inputs."""
    computed = [n for n in gm.graph.nodes if n.op == "call_function"]
    stages = _stages(computed)
    layer = {n: _node_layer(n, stages) for n in computed}
    names = _positional_segments(computed, layer)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    units = set(names.values())
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            own = _node_layer(node, stages)
            names[node] = _input_unit(node, own, names, units, position)
    last = computed[-1] if computed else None
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr", "call_function"):
            names[node] = names[last] if last is not None else "head"
    return names


def _positional_segments(
    computed: list[fx.Node], layer: dict[fx.Node, str | None]
) -> dict[fx.Node, str]:
    layer_pos = [i for i, n in enumerate(computed) if layer[n] is not None]
    if not layer_pos:
        return dict.fromkeys(computed, "model")
    first, last = layer_pos[0], layer_pos[-1]
    loss_start = _loss_start(computed, last)
    next_stack = _next_stacks(computed, layer)
    names: dict[fx.Node, str] = {}
    glue_count, prev = 0, ""
    for i, n in enumerate(computed):
        own = layer[n]
        if own is not None:
            names[n] = own
        elif i < first:
            names[n] = "embedding"
        elif i > last:
            names[n] = "loss" if i >= loss_start else "head"
        elif next_stack[i] == _stack_of(prev):
            names[n] = prev  # loop-body glue between two layers of one stack
        else:
            if not names[computed[i - 1]].startswith("glue_"):
                glue_count += 1
            names[n] = f"glue_{glue_count - 1}"
        prev = names[n] if own is not None else prev
    return names


def _next_stacks(computed: list[fx.Node], layer: dict[fx.Node, str | None]) -> list[str | None]:
    """For each position, the stack of the next layer node at or after it."""
    out: list[str | None] = [None] * len(computed)
    upcoming: str | None = None
    for i in range(len(computed) - 1, -1, -1):
        own = layer[computed[i]]
        upcoming = _stack_of(own) if own is not None else upcoming
        out[i] = upcoming
    return out


def _loss_start(computed: list[fx.Node], last_layer: int) -> int:
    """Index of the first node after the head's last parameter use (len if none)."""
    param_users = [
        i
        for i, n in enumerate(computed)
        if i > last_layer and any(a.op == "get_attr" for a in n.all_input_nodes)
    ]
    return (param_users[-1] + 1) if param_users else last_layer + 1


def _input_unit(
    node: fx.Node,
    own: str | None,
    names: dict[fx.Node, str],
    units: set[str],
    position: dict[fx.Node, int],
) -> str:
    if own is not None and own in units:
        return own
    users = [u for u in node.users if u in names]
    if users:
        return names[min(users, key=position.__getitem__)]
    return own or "embedding"


def _fingerprint(nodes: list[fx.Node]) -> str:
    """Hash of ops, literal arguments, value shapes and dtypes, with node references replaced
    by their position inside the unit (or their order of appearance for external inputs).
    The same model captured on `meta` and on `cpu` must hash alike (the profiler times units
    on one, the planner reads them on the other), so devices and `contiguous` (kept on one and
    not the other where meta kernels give other strides) are left out."""
    kept = [n for n in nodes if n.target is not torch.ops.aten.contiguous.default]
    local: dict[fx.Node, Any] = {n: ("local", i) for i, n in enumerate(kept)}
    external: dict[fx.Node, int] = {}

    def ref(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in local:
                return local[a]
            return ("ext", external.setdefault(a, len(external)))
        return "device" if isinstance(a, torch.device) else a

    h = hashlib.sha1()
    for n in nodes:
        if n.target is torch.ops.aten.contiguous.default:
            local[n] = ref(n.args[0])
            continue
        target = n.target if n.op != "get_attr" else "param"
        args = fx.node.map_aggregate(n.args, ref)
        kwargs = fx.node.map_aggregate(n.kwargs, ref)
        h.update(repr((n.op, str(target), args, kwargs, _shape_of(n))).encode())
    return h.hexdigest()[:16]


def _shape_of(node: fx.Node) -> object:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), str(val.dtype))
    if isinstance(val, (list, tuple)):
        return tuple(_shape_of_val(v) for v in val)
    return type(val).__name__


def _shape_of_val(val: object) -> object:
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), str(val.dtype))
    return type(val).__name__
