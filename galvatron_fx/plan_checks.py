"""Checks of a plan against the captured model and the job, run in one process before any
rank cuts an input, rewrites the graph or sends anything: a plan for another model or world
size, batches the micro-batches or a dp do not split, and weights shared by units that store
them differently or in different stages. Each raises `PlanError` naming what is wrong and
what to do (the plan fuzzer, `tests/test_fuzz_plans.py`, checks nothing gets past them to
fail later on the ranks).
"""

from __future__ import annotations

from torch import fx, nn

from galvatron_fx.passes.insert_collectives import get_attr
from galvatron_fx.plan import LayerStrategy, Plan, PlanError
from galvatron_fx.summary import layer_shapes, model_fingerprint

__all__ = ["check_plan", "shared_weights", "storage_layout"]


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
    from galvatron_fx.passes.shard import batch_inputs
    from galvatron_fx.passes.shard_rules import shape

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
    """Units sharing a weight (tied embeddings) need one layout (the weight is stored once)
    and, with pipeline stages, one stage; every pipeline rank's stages hold a parameter
    (an optimizer refuses an empty list). Refused before any rank rewrites or sends
    anything (`split_stages` checks the cut graph again)."""
    from galvatron_fx.passes.split_stages import unit_stages

    p = plan.pipeline
    stage_of = unit_stages(plan.units, p.stage_starts)
    users = _weight_users(gm)
    for name, units in users.items():
        if len({storage_layout(plan.strategy(u)) for u in units}) > 1:
            raise PlanError(
                f"units {sorted(units)} share parameter {name!r} (tied weights): give them "
                "the same tp, dp, tp_consecutive and vocab_parallel"
            )
        stages = sorted({stage_of[u] for u in units})
        if p.degree > 1 and len(stages) > 1:
            raise PlanError(
                f"pipeline: parameter {name!r} is used by stages {stages} (tied "
                "weights?); put its users in one stage or untie it"
            )
    held = {stage_of[u] % p.degree for units in users.values() for u in units}
    if p.degree > 1 and len(held) < p.degree:
        raise PlanError(
            f"pipeline: the stages of pipeline rank(s) {sorted(set(range(p.degree)) - held)} "
            "hold no parameter (the loss alone, say); start them at an earlier unit"
        )


def storage_layout(s: LayerStrategy) -> tuple[int, int, bool, bool]:
    """How a unit stores its weights: tp, dp, TP rank order (only with tp, dp > 1), vocab."""
    return (s.tp, s.dp, s.tp_consecutive or s.tp == 1 or s.dp == 1, s.vocab_parallel)


def shared_weights(gm: fx.GraphModule) -> list[set[str]]:
    """The units reading each parameter that more than one unit reads (tied embeddings)."""
    return [units for units in _weight_users(gm).values() if len(units) > 1]


def _weight_users(gm: fx.GraphModule) -> dict[str, set[str]]:
    """Per parameter (one entry per object, however many names it has), the units reading it."""
    from galvatron_fx.meta import LAYER

    out: dict[int, tuple[str, set[str]]] = {}
    for node in gm.graph.nodes:
        param = get_attr(gm, str(node.target)) if node.op == "get_attr" else None
        if isinstance(param, nn.Parameter):
            entry = out.setdefault(id(param), (str(node.target), set()))
            entry[1].update(LAYER.get(u).name for u in node.users)
    return dict(out.values())
