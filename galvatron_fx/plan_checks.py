"""Checks of a plan against the captured model and the job, run in one process before any
rank cuts an input, rewrites the graph or sends anything: a plan for another model or world
size, batches the micro-batches or a dp do not split, and weights shared by units that store
them differently (`search.strategies.storage_layout`: the one definition the search imposes
too). A weight shared across pipeline stages is held by each of them (`runtime.pipeline`).
Each raises `PlanError` naming what is wrong and
what to do (the plan fuzzer, `tests/test_fuzz_plans.py`, checks nothing gets past them to
fail later on the ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from galvatron_fx.meta import LAYER
from galvatron_fx.passes.shard import batch_inputs
from galvatron_fx.passes.shard_rules import shape
from galvatron_fx.passes.split_stages import unit_stages
from galvatron_fx.plan import Plan, PlanError
from galvatron_fx.runtime.program import get_attr
from galvatron_fx.search.strategies import storage_layout
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint

__all__ = ["SharedWeight", "check_plan", "shared_weights", "storage_layout", "tie_error"]


def check_plan(plan: Plan, gm: fx.GraphModule, world: int, *, micro_batches: bool = False) -> None:
    """The plan is for this job and this model (`gm`: captured at the whole batch);
    `micro_batches`: the caller captures again at the micro-batch size. Another model's
    plan is named first: it is wrong whatever the job."""
    plan.check_model(model_fingerprint(gm), layer_shapes(gm))
    if plan.world_size != world:
        raise PlanError(
            f"plan is for {plan.world_size} ranks, this job has {world}: run it on "
            f"{plan.world_size} ranks, or search a plan for {world} (galvatron-fx plan "
            f"--world {world}, or compile(..., cluster=..., memory_budget_gb=...))"
        )
    if not micro_batches and plan.pipeline.degree * plan.pipeline.micro_batches > 1:
        raise PlanError(
            "parallelize: a plan with pipeline stages or micro-batches needs the graph "
            "captured at the micro-batch size; use galvatron_fx.compile(model, inputs, plan=...)"
        )
    _check_batch_split(plan, gm)
    _check_shared_weights(plan, gm)


def _check_batch_split(plan: Plan, gm: fx.GraphModule) -> None:
    """The micro-batches split `gm`'s batch and every unit's dp splits a micro-batch:
    refused here, in one process, before any rank cuts the inputs or rewrites the graph."""
    inputs = batch_inputs(gm)
    if not inputs:
        return
    batch, m = shape(next(iter(inputs)))[0], plan.pipeline.micro_batches
    if batch % m:
        raise PlanError(f"plan: {m} micro-batches do not split the batch of {batch}")
    for unit, s in plan.strategies:
        if (batch // m) % s.dp:
            raise PlanError(
                f"layer {unit!r}: dp={s.dp} does not divide a micro-batch of {batch // m} "
                f"(the batch of {batch} in {m}); use a batch that every unit's dp divides"
            )


def _check_shared_weights(plan: Plan, gm: fx.GraphModule) -> None:
    """Units sharing a weight (tied embeddings) store it in one layout, in one stage or in
    several (each holding a copy whose gradient is summed over them); every pipeline
    rank's stages hold a parameter (an optimizer refuses an empty list). Refused before
    any rank rewrites or sends anything."""
    p = plan.pipeline
    stage_of = unit_stages(plan.units, p.stage_starts)
    users = _weight_users(gm)
    for name, units in users.items():
        error = tie_error(plan, SharedWeight(name, frozenset(units), 0))
        if error:
            raise PlanError(error)
    held = {stage_of[u] % p.degree for units in users.values() for u in units}
    if p.degree > 1 and len(held) < p.degree:
        raise PlanError(
            f"pipeline: the stages of pipeline rank(s) {sorted(set(range(p.degree)) - held)} "
            "hold no parameter (the loss alone, say); start them at an earlier unit"
        )


@dataclass(frozen=True)
class SharedWeight:
    """A parameter more than one unit reads (tied embeddings)."""

    name: str
    units: frozenset[str]
    numel: int


def tie_error(plan: Plan, weight: SharedWeight) -> str | None:
    """Why `plan` cannot store `weight` (None: it can): its readers must agree on
    `storage_layout`, in one pipeline stage or several (each stage holding a copy)."""
    layouts = {u: storage_layout(plan.strategy(u)) for u in sorted(weight.units)}
    if len(set(layouts.values())) == 1:
        return None
    shown = ", ".join(f"{u} {plan.strategy(u).short()}" for u in layouts)
    return (
        f"units {sorted(weight.units)} share parameter {weight.name!r} (tied weights) but "
        f"store it differently ({shown}): give them the same tp, dp, tp_consecutive and "
        "vocab_parallel"
    )


def shared_weights(gm: fx.GraphModule) -> list[SharedWeight]:
    """The parameters more than one unit reads, with their readers."""
    return [
        SharedWeight(name, frozenset(units), get_attr(gm, name).numel())
        for name, units in _weight_users(gm).items()
        if len(units) > 1
    ]


def _weight_users(gm: fx.GraphModule) -> dict[str, set[str]]:
    """Per parameter (one entry per object, however many names it has), the units reading it."""
    out: dict[int, tuple[str, set[str]]] = {}
    for node in gm.graph.nodes:
        param = get_attr(gm, str(node.target)) if node.op == "get_attr" else None
        if isinstance(param, nn.Parameter):
            entry = out.setdefault(id(param), (str(node.target), set()))
            entry[1].update(LAYER.get(u).name for u in node.users)
    return dict(out.values())
