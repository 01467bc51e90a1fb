"""Assembly: one rank's lowered program (`RankProgram`) made trainable.

Creates the process groups every rank's program names (all ranks create all groups, in the
same order, as `torch.distributed` requires), and wraps the program with the gradient sync
(`data_parallel.GradSync`: plain DP, ZeRO-1/2 over the dp group, sums over the TP group for
sequence-parallel gradients, ZeRO-3's flat shards) and the optimizer: a `CompiledModel`, or
with pipeline stages a `PipelinedModel` running this rank's stage(s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from galvatron_fx.plan import DPMode, Plan
from galvatron_fx.runtime import collectives
from galvatron_fx.runtime.collectives import GROUPS, GroupRef
from galvatron_fx.runtime.compiled import CompiledModel, LossFn, input_slices, loss_reduction
from galvatron_fx.runtime.data_parallel import GradSync, SyncedParam, Zero3TPSum
from galvatron_fx.runtime.pipeline import (
    PipelinedModel,
    StageProgram,
    held_specs,
    shared_groups,
    shared_params,
    stages_holding,
)
from galvatron_fx.runtime.program import ParamSpec, RankProgram, get_attr

__all__ = ["OptimizerFactory", "assemble", "assemble_pipelined", "pipeline_groups"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def assemble(
    program: RankProgram,
    *,
    world: int,
    optimizer: OptimizerFactory | None = None,
    loss_fn: LossFn | None = None,
    bucket_mb: float = 25.0,
) -> CompiledModel:
    """`program` (no pipeline stages) with its groups, gradient sync and optimizer;
    `optimizer` defaults to AdamW at lr 1e-3. Groups are created only when `world` > 1."""
    gm, specs, plan, rank = program.graph_module, program.params, program.plan, program.rank
    if world > 1:
        GROUPS.create(_all_groups(gm, specs))
    sync = _grad_sync(gm, specs, plan, rank, optimizer, bucket_mb, plan.pipeline.micro_batches)
    return CompiledModel(gm, plan, specs, sync, loss_fn, rank)


def assemble_pipelined(
    program: RankProgram,
    plan: Plan,
    micro_inputs: list[Any],
    *,
    rank: int,
    world: int,
    optimizer: OptimizerFactory | None = None,
    bucket_mb: float = 25.0,
) -> PipelinedModel:
    """`program` (lowered with `plan`'s stages for global rank `rank`) as this rank's
    stage(s) of the pipeline; `micro_inputs` are one micro-batch's inputs, flat."""
    assert program.stages is not None, "assemble_pipelined: lower the plan with its stages"
    gm, specs, local, p = program.graph_module, program.params, program.rank, plan.pipeline
    per_stage = world // p.degree
    offset = program.rank_offset
    pp_groups = pipeline_groups(world, p.degree)
    loss_group, loss_avg = loss_reduction(gm, program.plan, local)
    stage = StageProgram(
        split=program.stages,
        module=gm,
        specs=specs,
        inputs=input_slices(gm, program.plan, local),
        local_rank=local,
        loss_group=GroupRef(tuple(r + offset for r in loss_group.ranks)),
        loss_avg=loss_avg,
        zero3=any(spec.zero3_flat for spec in specs.values()),
    )
    # a weight tied across stages: summed over the pipeline ranks holding it, per position
    shared = shared_params(stage, p.degree)
    sums = [g for ranks in shared.values() for g in shared_groups(ranks, per_stage)]
    if world > 1:
        GROUPS.create([*_all_groups(gm, specs), *pp_groups, *sums])
    stages = range(rank // per_stage, len(program.stages.stages), p.degree)
    mine = held_specs(stage, stages)
    tied = TiedSync(
        {n: GroupRef(shared_groups(ranks, per_stage)[local]) for n, ranks in shared.items()},
        stages_holding(stage, stages),
    )
    sync = _grad_sync(gm, mine, program.plan, rank, optimizer, bucket_mb, p.micro_batches, tied)
    pp_group = GROUPS.groups.get(pp_groups[local]) if world > 1 else None
    return PipelinedModel(stage, plan, micro_inputs, sync, rank, world, pp_group)


def pipeline_groups(world_size: int, degree: int) -> list[tuple[int, ...]]:
    """The ranks that pass activations to each other: one group per stage-local position,
    ordered by pipeline rank (a `PipelineStage`'s group rank is its pipeline rank)."""
    per_stage = world_size // degree
    return [tuple(i + s * per_stage for s in range(degree)) for i in range(per_stage)]


@dataclasses.dataclass(frozen=True)
class TiedSync:
    """Pipeline weights held by several stages: spec name -> the ranks whose gradients sum
    (one per holding pipeline rank), and -> how many of this rank's stages read it."""

    groups: dict[str, GroupRef] = dataclasses.field(default_factory=dict)
    backwards: dict[str, int] = dataclasses.field(default_factory=dict)


def _grad_sync(
    gm: fx.GraphModule,
    specs: dict[str, ParamSpec],
    plan: Plan,
    rank: int,
    optimizer: OptimizerFactory | None,
    bucket_mb: float,
    micro_batches: int,
    tied: TiedSync | None = None,
) -> GradSync:
    """The gradient sync and optimizer over the parameters in `specs`."""
    return GradSync(
        _synced(gm, specs, plan, rank, tied or TiedSync()),
        optimizer or _adamw,
        bucket_mb,
        _zero3_tp_sums(gm, specs, rank),
        accumulations=micro_batches,
    )


def _adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _synced(
    gm: fx.GraphModule, specs: dict[str, ParamSpec], plan: Plan, rank: int, tied: TiedSync
) -> list[SyncedParam]:
    out = []
    me = GroupRef((rank,))
    for name, spec in specs.items():
        if spec.zero3_flat or spec.alias_of is not None:
            continue
        param = get_attr(gm, name)
        if isinstance(param, nn.Parameter):
            mode = plan.strategy(spec.unit).dp_mode
            tp = spec.tp_group if spec.grad_sum_tp else None
            stage_group, passes = tied.groups.get(name), tied.backwards.get(name, 1)
            out.append(SyncedParam(name, param, spec.dp_group, mode, tp, stage_group, passes))
    for flat in dict.fromkeys(s.zero3_flat for s in specs.values() if s.zero3_flat):
        # the reduce-scatter of the gather's backward already summed over dp
        out.append(SyncedParam(flat, get_attr(gm, flat), me, DPMode.ZERO3, None))
    return out


def _zero3_tp_sums(gm: fx.GraphModule, specs: dict[str, ParamSpec], rank: int) -> list[Zero3TPSum]:
    """Per flat ZeRO-3 shard, the ranges (in shard coordinates) of parameters whose gradient
    is a partial sum over the TP group (sequence parallelism): all-reduced there."""
    out: dict[str, Zero3TPSum] = {}
    for spec in specs.values():
        if not (spec.zero3_flat and spec.grad_sum_tp and spec.alias_of is None):
            continue
        shard = get_attr(gm, spec.zero3_flat)
        n = shard.numel()
        lo = sorted(spec.dp_group.ranks).index(rank) * n
        start = max(spec.zero3_offset, lo) - lo
        stop = min(spec.zero3_offset + math.prod(spec.zero3_shape or ()), lo + n) - lo
        entry = out.setdefault(spec.zero3_flat, Zero3TPSum(shard, spec.tp_group, []))
        if start < stop:
            entry.ranges.append((start, stop))
    return list(out.values())


def _all_groups(gm: fx.GraphModule, specs: dict[str, ParamSpec]) -> Sequence[tuple[int, ...]]:
    """Every rank set any rank uses: all ranks must create every group, in the same order."""
    mine: set[tuple[int, ...]] = set()
    graphs = [m.graph for m in gm.modules() if isinstance(m, fx.GraphModule)]  # regions too
    for node in (n for graph in graphs for n in graph.nodes):
        mine.update(collectives.groups_of(node.target, node.args))
    for spec in specs.values():
        mine.update({spec.tp_group.ranks, spec.dp_group.ranks})
    everyone: list[list[tuple[int, ...]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    return [tuple(g) for groups in everyone if groups is not None for g in groups]
