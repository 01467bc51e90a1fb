"""The collectives a plan makes every unit run, read off the rewritten graph.

`collectives_of(gm, params, plan, recomputed)` lists, per unit, every collective of one
rank's program: the graph's collective nodes (forward and backward halves: each op in
`runtime.collectives` has a fixed pair), the forward half once more for the nodes backward
recomputes, and the gradient synchronisation of its parameters (`runtime.data_parallel`).
`lowered.plan_collectives` runs it on the program `lower()` makes of a plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Final

import torch
from torch import fx

from galvatron_fx.cost_models.traffic import (
    Collective,
    CollectiveKind,
    Phase,
    grad_sync,
    tp_grad_sum,
)
from galvatron_fx.meta import LAYER
from galvatron_fx.passes.annotate_costs import requires_grad_nodes
from galvatron_fx.plan import Plan
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.program import ParamSpec, get_attr
from galvatron_fx.runtime.vocab import vocab_cross_entropy

__all__ = ["RECOMPUTED", "collectives_of"]

_AR: Final = "all_reduce"
_AG: Final = "all_gather"
_RS: Final = "reduce_scatter"
_A2A: Final = "all_to_all"

# op -> (forward kind, backward kind)
_PAIRS: dict[Any, tuple[CollectiveKind | None, CollectiveKind | None]] = {
    C.tp_copy: (None, _AR),
    C.tp_reduce: (_AR, None),
    C.reduce_both: (_AR, _AR),
    C.reduce_scatter: (_RS, _AG),
    C.gather_partial: (_AG, _RS),
    C.gather_whole: (_AG, None),
    C.split_local: (None, _AG),
    C.split_zero: (None, None),
    C.all_to_all: (_A2A, _A2A),
    # the target count is read off the whole batch every rank is handed (`whole_inputs`)
    C.global_count: (None, None),
}


_SPLITTING: Final = frozenset({C.reduce_scatter, C.split_local, C.split_zero})
"""Paired ops whose output is this rank's 1/n of the buffer their collectives move."""


def collectives_of(
    gm: fx.GraphModule,
    params: dict[str, ParamSpec],
    plan: Plan,
    recomputed: frozenset[str] = frozenset(),
) -> dict[str, list[Collective]]:
    """Every collective of this rank's program, by unit, in graph order (then grad sync).
    `gm` holds no checkpoint regions (`recompute.inline_regions`); the nodes named in
    `recomputed` run their forward collectives again during backward, in line."""
    out: dict[str, list[Collective]] = {}
    grad = requires_grad_nodes(gm)
    for node in gm.graph.nodes:
        listed = list(_node_collectives(node, grad))
        if node.name in recomputed:
            listed += [_again(c) for c in listed if c.phase == "forward"]
        for c in listed:
            out.setdefault(c.unit, []).append(c)
    for c in _bucketed(_grad_sync(gm, params, plan)):
        out.setdefault(c.unit, []).append(c)
    return out


def _again(c: Collective) -> Collective:
    """A forward collective as recomputation runs it: in backward, waited for in line."""
    return dataclasses.replace(
        c, phase="backward", overlappable=False, source=c.source + RECOMPUTED
    )


RECOMPUTED: Final = " (recomputed)"
"""Suffix of the `source` of a collective that recomputation runs again."""


def _bucketed(collectives: Iterator[Collective]) -> list[Collective]:
    """Gradient sync as the runtime runs it: a unit's parameters share buckets, so their
    collectives of one kind and group are one call (one latency), not one per parameter.
    The TP-group sums (`grad_sync_tp`) are other calls than the data-parallel buckets even
    when both groups have the same size."""
    merged: dict[tuple[Any, ...], Collective] = {}
    for c in collectives:
        key = (c.unit, c.kind, c.group_size, c.phase, c.overlappable, c.source)
        old = merged.get(key)
        merged[key] = (
            c if old is None else dataclasses.replace(old, size_bytes=old.size_bytes + c.size_bytes)
        )
    return list(merged.values())


def _nbytes(val: Any) -> int:
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _node_collectives(node: fx.Node, grad: dict[fx.Node, bool]) -> Iterator[Collective]:
    if node.op != "call_function":
        return
    unit = LAYER.get(node).name
    name = getattr(node.target, "__name__", str(node.target))
    if node.target in _PAIRS:
        yield from _paired(node, unit, name, grad.get(_a(node)[0], True))
    elif node.target is C.zero3_issue:  # runs a unit early (prefetch), belongs to its user
        owner = LAYER.get(next(iter(node.users))).name if node.users else unit
        size = _nbytes(node.meta["val"])
        yield Collective(_AG, size, len(_a(node)[1]), "forward", True, owner, name)
    elif node.target is C.zero3_use:
        size, n = _nbytes(node.meta["val"]), len(_a(node)[2])
        padded = _nbytes(_a(node)[1].meta["val"]) * n
        # gathered again in backward, prefetched while the unit after it runs its backward
        # (`runtime.collectives._regather`)
        yield Collective(_AG, padded, n, "backward", True, unit, name)
        yield Collective(_RS, padded, n, "backward", True, unit, name)
        del size
    elif node.target is vocab_cross_entropy and len(_a(node)[7]) > 1:
        rows = _nbytes(_a(node)[1].meta["val"]) // _a(node)[1].meta["val"].element_size() * 4
        for _ in ("max", "sum of exponentials", "target logit"):
            yield Collective(_AR, rows, len(_a(node)[7]), "forward", False, unit, name)
    elif node.target is C.switch_layout:
        yield from _switch(node, unit, name)


def _paired(node: fx.Node, unit: str, name: str, has_grad: bool) -> Iterator[Collective]:
    """The op's forward collective, and its backward one where its input takes a gradient
    (rotary tables sliced onto a sequence split have none: autograd runs nothing)."""
    fwd, bwd = _PAIRS[node.target]
    n = len(_a(node)[-1])  # every paired op takes its group's ranks last
    if n == 1:
        return
    # nccl-tests' size, the whole buffer: the gathered / not-yet-scattered one, n times the
    # op's own output where it splits. Read off the output, whose local `val` the rewrite
    # derives from the op's placement: a split op's input may carry the split shape already
    # (under sequence parallelism a row-parallel linear is placed as the reduce-scatter it
    # feeds, though it computes the whole partial sum the reduce-scatter reads).
    local_out = _nbytes(node.meta["val"])
    whole = local_out * n if node.target in _SPLITTING else local_out
    phases: tuple[tuple[Phase, CollectiveKind | None], ...] = (("forward", fwd), ("backward", bwd))
    for phase, kind in phases:
        if kind is not None and (phase == "forward" or has_grad):
            yield Collective(kind, whole, n, phase, False, unit, name)


def _switch(node: fx.Node, unit: str, name: str) -> Iterator[Collective]:
    x, fwd, bwd = _a(node)[0], _a(node)[1], _a(node)[2]
    elem = x.meta["val"].element_size()
    halves: tuple[tuple[Phase, Any, tuple[int, ...]], ...] = (
        ("forward", fwd, tuple(x.meta["val"].shape)),
        ("backward", bwd, tuple(node.meta["val"].shape)),
    )
    for phase, steps, shape in halves:
        dims = list(shape)
        for step in steps:
            if step[0] == "gather":
                dims[step[1]] *= len(step[2])
                if len(step[2]) > 1:
                    size = elem * math.prod(dims)
                    yield Collective(_AG, size, len(step[2]), phase, False, unit, name)
            elif step[0] == "reduce":  # a partial-sum gradient summed over a dp group
                if len(step[1]) > 1:
                    size = elem * math.prod(dims)
                    yield Collective(_AR, size, len(step[1]), phase, False, unit, name)
            else:
                dims[step[1]] = step[3] - step[2]


def _grad_sync(
    gm: fx.GraphModule, params: dict[str, ParamSpec], plan: Plan
) -> Iterator[Collective]:
    """What `runtime.data_parallel.GradSync` does for each parameter (bucketing aside)."""
    for name, spec in params.items():
        if spec.alias_of is not None:
            continue
        if spec.zero3_flat:  # the graph's gather already reduce-scatters over dp
            if spec.grad_sum_tp:
                elem = get_attr(gm, spec.zero3_flat).element_size()
                size = math.prod(spec.zero3_shape or ()) * elem // spec.dp_group.size
                yield tp_grad_sum(spec.unit, size, spec.tp_group.size, zero3=True)
            continue
        param = get_attr(gm, name)
        if not getattr(param, "requires_grad", False):
            continue
        size = param.numel() * param.element_size()
        if spec.grad_sum_tp:
            yield tp_grad_sum(spec.unit, size, spec.tp_group.size, zero3=False)
        n, mode = spec.dp_group.size, plan.strategy(spec.unit).dp_mode
        if spec.zero3_shape is None:
            padded = -(-param.numel() // n) * n * param.element_size()
            yield from grad_sync(spec.unit, size, padded, n, mode)


def _a(node: fx.Node) -> Any:
    """A node's arguments, untyped: the caller knows the op's signature."""
    return node.args
