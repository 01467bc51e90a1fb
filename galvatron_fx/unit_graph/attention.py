"""Attention cores: an sdpa node with its `getitem`s, or the eager chain `q @ k^T -> softmax
-> ... -> @ v`, found by walking through score ops only (so an MLP or a router softmax is
never taken). Selective recomputation checkpoints them; sharding and pricing read them."""

from __future__ import annotations

import operator
from collections.abc import Callable

from torch import fx

__all__ = ["attention_cores", "attention_operands"]


_SDPA_PREFIXES = ("scaled_dot_product", "_scaled_dot_product")


_MATMULS = frozenset({"matmul", "bmm", "baddbmm"})


_SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})


_SCORE_OPS = _SOFTMAX | {
    # what eager attention does between q @ k^T and probs @ v: scale, mask, cast, dropout
    *("div", "mul", "add", "sub", "masked_fill", "where", "tanh", "clamp"),
    *("dropout", "native_dropout", "getitem", "to", "_to_copy", "type_as"),
    *("view", "reshape", "_unsafe_view", "expand", "clone", "contiguous", "alias"),
}


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
