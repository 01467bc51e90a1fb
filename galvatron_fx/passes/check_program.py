"""Plan consistency: the rank's program is what the plan says, checked right after the rewrite.

Reads: `gfx_layer`, `gfx_placement`, `val` (local), the module's parameters,
`ctx.target` (plan, rank), `ctx.params` (`ParamSpec`s).
Writes: nothing.
Guarantees, or a `ProgramMismatch` naming the unit and the node:
- batch: in a unit with dp > 1, every value carrying the batch (derived from the batch
  inputs through ops that keep it on dim 0, `NodePlacement.batch`) runs split on the batch;
  a unit that ran the whole batch would cost dp times the work and activations priced;
- weights: in a tensor-parallel layer (tp > 1, not Ulysses) every weight a matmul-like op
  reads (linear, addmm, matmul, mm, bmm; through transposes and views) is split across the
  TP group, as the plan's per-rank parameter bytes assume, but for key/value projections
  whose heads the tp does not divide (kind `kv_whole`: whole on every TP rank by design);
- heads: in such a layer, attention (`scaled_dot_product_attention`) runs on 1/tp of the
  heads, as the plan's activation and compute prices assume;
- parameter bytes: each parameter on the module holds exactly its `ParamSpec`'s share;
- collectives: every collective of a unit runs on a group of the unit's own mesh (its TP
  or DP group, or the whole stage), or is a layout switch between meshes.
Units where the rules fell back to gathering (kind `fallback`, reported by `ShardWarning`)
are exempt from the batch and weight checks: gathering there is what the warning says.
Cheap (one walk over the graph), so it runs after every rewrite, the costs-only ones too.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.distributed.tensor import Shard

from galvatron_fx.meta import LAYER, PLACEMENT
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.passes.shard import mesh_of, unit_strategies
from galvatron_fx.plan import LayerStrategy
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.program import ParamSpec, get_attr

__all__ = ["ProgramMismatch", "check_program"]

aten = torch.ops.aten
_MATMULS = {
    aten.linear.default,
    aten.addmm.default,
    aten.matmul.default,
    aten.mm.default,
    aten.bmm.default,
}
_SDPA = aten.scaled_dot_product_attention.default
_PASS_THROUGH = {
    aten.t.default,
    aten.numpy_T.default,
    aten.transpose.int,
    aten.permute.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
}
"""Ops between a weight and the matmul reading it that keep it the same weight."""


class ProgramMismatch(RuntimeError):
    """The rewritten program is not what the plan says (a compiler defect, not bad input)."""


@graph_pass(reads=("val", LAYER.name, PLACEMENT.name), writes=())
def check_program(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Raise `ProgramMismatch` where rank `ctx.target.rank`'s program departs from the
    plan; return the graph untouched."""
    target = ctx.require_target("check_program")
    plan, rank, specs = target.plan, target.rank, ctx.params
    strategies = unit_strategies(gm, plan)
    fell_back = {LAYER.get(n).name for n in gm.graph.nodes if "fallback" in PLACEMENT.get(n).kinds}
    problems = [
        *_batch(gm, strategies, fell_back),
        *_weights(gm, strategies, specs, fell_back),
        *_heads(gm, strategies, fell_back),
        *_param_bytes(gm, specs),
        *_groups(gm, strategies, plan.world_size, rank),
    ]
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ProgramMismatch(
            f"rank {rank}'s program is not what the plan says:\n  {shown}{more}\n"
            "This is a compiler defect; please report it with the model and the plan"
        )
    return gm


def _batch(gm: fx.GraphModule, strategies: dict[str, LayerStrategy], exempt: set[str]) -> list[str]:
    out = []
    for node in gm.graph.nodes:
        unit = LAYER.get(node).name
        p = PLACEMENT.get(node)
        if strategies[unit].dp == 1 or unit in exempt or node.op not in ("call_function",):
            continue
        if p.batch and p.dp != Shard(0) and isinstance(node.meta.get("val"), torch.Tensor):
            out.append(
                f"unit {unit!r}, node {node.name!r}: runs the whole batch "
                f"(local shape {tuple(node.meta['val'].shape)}) though the plan gives the "
                f"unit dp={strategies[unit].dp}"
            )
    return out


def _weights(
    gm: fx.GraphModule,
    strategies: dict[str, LayerStrategy],
    specs: dict[str, ParamSpec],
    exempt: set[str],
) -> list[str]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or str(node.target) not in specs:
            continue
        unit = LAYER.get(node)
        s = strategies[unit.name]
        if unit.kind != "layer" or s.tp == 1 or s.ulysses or unit.name in exempt:
            continue
        spec = specs[str(node.target)]
        reader = _matmul_reader(node)
        whole = reader is not None and "kv_whole" in PLACEMENT.get(reader).kinds
        if reader is not None and not whole and spec.tp_dim is None and len(spec.global_shape) >= 2:
            out.append(
                f"unit {unit.name!r}, node {reader.name!r}: weight {spec.name!r} "
                f"{list(spec.global_shape)} is whole on every rank though the plan gives the "
                f"layer tp={s.tp}"
            )
    return out


def _heads(gm: fx.GraphModule, strategies: dict[str, LayerStrategy], exempt: set[str]) -> list[str]:
    out = []
    for node in gm.graph.nodes:
        unit = LAYER.get(node)
        s = strategies[unit.name]
        if node.target is not _SDPA or unit.kind != "layer" or s.tp == 1 or s.ulysses:
            continue
        if unit.name not in exempt and PLACEMENT.get(node).tp != Shard(1):
            out.append(
                f"unit {unit.name!r}, node {node.name!r}: attention runs on every head "
                f"(local shape {tuple(node.meta['val'].shape)}) though the plan gives the "
                f"layer tp={s.tp}"
            )
    return out


def _matmul_reader(param: fx.Node) -> fx.Node | None:
    """The matmul-like node reading `param` (through transposes and views), if any."""
    todo = list(param.users)
    while todo:
        user = todo.pop()
        if user.target in _MATMULS:
            return user
        if user.target in _PASS_THROUGH:
            todo.extend(user.users)
    return None


def _param_bytes(gm: fx.GraphModule, specs: dict[str, ParamSpec]) -> list[str]:
    out = []
    for name, spec in specs.items():
        if spec.zero3_flat:  # stored in the unit's flat shard: zero3 checks its own sizes
            continue
        local = get_attr(gm, name)
        want = list(spec.global_shape)
        if spec.tp_dim is not None:
            want[spec.tp_dim] //= spec.tp_group.size
        if list(local.shape) != want:
            out.append(
                f"unit {spec.unit!r}, parameter {name!r}: holds {list(local.shape)} "
                f"({math.prod(local.shape)} elements), its spec says {want}"
            )
    return out


def _groups(
    gm: fx.GraphModule, strategies: dict[str, LayerStrategy], world: int, rank: int
) -> list[str]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is C.switch_layout:
            continue
        unit = LAYER.get(node).name
        mesh = mesh_of(strategies[unit], world)
        allowed = {
            tuple(sorted(mesh.group("tp", rank))),
            tuple(sorted(mesh.group("dp", rank))),
            tuple(range(world)),
            (rank,),
        }
        for ranks in C.groups_of(node.target, node.args):
            if tuple(sorted(ranks)) not in allowed:
                out.append(
                    f"unit {unit!r}, node {node.name!r}: a collective on ranks {list(ranks)}, "
                    f"not a group of the unit's mesh (tp={mesh.tp}, dp={mesh.dp})"
                )
    return out
