"""Stage ranks: move a stage's rewritten program from stage-local ranks to global ranks.

With pipeline stages, the parallel passes rewrite the graph for one stage's devices as if
they were the whole job (ranks `0 .. S-1`, S = world / pipeline degree): the per-layer meshes,
slices and ZeRO shards only ever depend on a rank's position among them. Megatron's layout
puts pipeline outermost, so pipeline rank `s` owns global ranks `s*S .. s*S + S - 1`; this
pass adds `s*S` to every rank a collective names.

Reads: the collective nodes (`collectives.RANKS_ARG`, `switch_layout` steps) of the graph and
of its recomputed regions (submodules), `ctx.params` and `ctx.target.rank_offset`. Writes: their
rank tuples, shifted by the offset (`ctx.params` replaced by the shifted specs).
Guarantees: a rank's index within every group is unchanged (the shift keeps order), so
what the rewrite decided per position still holds; the graph is recompiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from galvatron_fx.meta import LAYER
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.runtime import collectives as C

__all__ = ["stage_ranks"]


@graph_pass(reads=(LAYER.name,), writes=())
def stage_ranks(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Shift the program's ranks by `ctx.target.rank_offset` (its stage's first rank)."""
    offset = ctx.require_target("stage_ranks").rank_offset
    if offset == 0:
        return gm
    for module in gm.modules():  # recomputed regions are submodules holding collectives too
        if isinstance(module, fx.GraphModule):
            _shift_nodes(module, offset)
    ctx.params = {
        name: dataclasses.replace(
            spec,
            tp_group=C.GroupRef(_shift(spec.tp_group.ranks, offset)),
            dp_group=C.GroupRef(_shift(spec.dp_group.ranks, offset)),
        )
        for name, spec in ctx.params.items()
    }
    return gm


def _shift_nodes(gm: fx.GraphModule, offset: int) -> None:
    for node in gm.graph.nodes:
        if node.target is C.switch_layout:
            x, fwd, bwd, *rest = node.args
            node.args = (x, _steps(fwd, offset), _steps(bwd, offset), *rest)
        elif node.target in C.RANKS_ARG:
            i = C.RANKS_ARG[node.target]
            args = list(node.args)
            args[i] = _shift(args[i], offset)
            node.args = tuple(args)
    gm.recompile()


def _shift(ranks: Any, offset: int) -> tuple[int, ...]:
    return tuple(int(r) + offset for r in ranks)


def _steps(steps: Any, offset: int) -> tuple[Any, ...]:
    shifted = {
        "gather": lambda s: ("gather", s[1], _shift(s[2], offset)),
        "reduce": lambda s: ("reduce", _shift(s[1], offset)),
    }
    return tuple(shifted.get(s[0], tuple)(s) for s in steps)
