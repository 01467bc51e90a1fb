"""The compiler's pass list, literally, in order, and the entry points that run it.

Step 0 is `capture` (model -> GraphModule); every later step is a `Pass` `(gm, ctx) -> gm`
run by `run_passes`, which checks the meta keys each pass declares, lints the graph, checks
the invariants and times every pass. To add a pass of your own, build a new list, e.g.
`insert_after(FRONTEND_PASSES, "annotate_costs", my_pass)`, and hand it to `analyze`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from galvatron_fx.passes.annotate_costs import annotate_costs
from galvatron_fx.passes.capture import capture
from galvatron_fx.passes.check_program import check_program
from galvatron_fx.passes.group_layers import group_layers
from galvatron_fx.passes.insert_collectives import ParamSpec, get_attr, insert_collectives
from galvatron_fx.passes.manager import Pass, PassContext, run_passes
from galvatron_fx.passes.recompute import recompute
from galvatron_fx.passes.shard import shard
from galvatron_fx.passes.zero3 import zero3
from galvatron_fx.plan import DPMode, LayerStrategy, PipelineConfig, Plan, PlanError
from galvatron_fx.plan_checks import check_plan
from galvatron_fx.runtime import collectives
from galvatron_fx.runtime.collectives import GROUPS, GroupRef
from galvatron_fx.runtime.compiled import CompiledModel, LossFn, micro_batch
from galvatron_fx.runtime.data_parallel import GradSync, SyncedParam, Zero3TPSum
from galvatron_fx.summary import LayerSummary, layer_shapes, layer_table, model_fingerprint

__all__ = [
    "FRONTEND_PASSES",
    "PARALLEL_PASSES",
    "Analysis",
    "analyze",
    "compile",
    "parallelize",
    "search",
]

FRONTEND_PASSES: tuple[Pass, ...] = (
    group_layers,  # gfx_layer: which repeated block or segment every node belongs to
    annotate_costs,  # gfx_cost: FLOPs, bytes, parameters, saved activations per node
    # search, shard, insert_collectives, recompute, split_stages: added by later issues
)


@dataclass
class Analysis:
    """The annotated graph and what the front end found."""

    graph_module: fx.GraphModule
    layers: list[LayerSummary]
    timings_s: dict[str, float]
    context: PassContext

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def units(self) -> list[str]:
        """Layer and segment names in execution order: what a plan gives strategies to."""
        return [u.name for u in self.layers]

    def plan(
        self,
        strategies: Mapping[str, LayerStrategy] | LayerStrategy,
        *,
        world_size: int,
        pipeline: PipelineConfig | None = None,
    ) -> Plan:
        """A plan for this model: one strategy for every unit, or a strategy per unit name,
        and optionally pipeline stages (each unit's tp x dp is then world_size / degree).

        One strategy with `vocab_parallel` splits the vocabulary where there is one, in the
        segments; the layers get the strategy without it (the flag means nothing there). One
        with `ulysses` runs the layers under Ulysses and the segments on the same group as
        plain tp (they have no attention to reshard)."""
        fingerprint = model_fingerprint(self.graph_module)
        if isinstance(strategies, LayerStrategy):
            layer = dataclasses.replace(strategies, vocab_parallel=False)
            segment = dataclasses.replace(strategies, ulysses=False)
            strategies = {u.name: segment if u.kind == "segment" else layer for u in self.layers}
        plan = Plan(
            world_size, tuple(strategies.items()), fingerprint, pipeline or PipelineConfig()
        )
        plan.check_model(fingerprint, layer_shapes(self.graph_module))  # tp must divide heads
        return plan

    def copy(self) -> Analysis:
        """A deep copy of the graph (parameters included) with a fresh context: rewrite one
        analysis under several plans without capturing again."""
        ctx = dataclasses.replace(self.context, timings_s=dict(self.timings_s), results={})
        return Analysis(copy.deepcopy(self.graph_module), self.layers, dict(self.timings_s), ctx)


def analyze(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    passes: Sequence[Pass] = FRONTEND_PASSES,
    print_after: Sequence[str] = (),
    dump_dir: str | Path | None = None,
) -> Analysis:
    """Capture `model` and run `passes` over it: the annotated graph and its layer table.

    `print_after` names passes whose output graph is printed ("all" for every one);
    `dump_dir` writes the graph after each pass to a file. The environment variables
    GFX_PRINT_AFTER and GFX_DUMP_DIR do the same without code changes."""
    ctx = PassContext.from_env(
        model=model,
        example_inputs=tuple(example_inputs),
        example_kwargs=dict(example_kwargs or {}),
        print_after=frozenset(print_after),
        dump_dir=Path(dump_dir) if dump_dir is not None else None,
    )
    start = time.perf_counter()
    gm = capture(model, ctx.example_inputs, ctx.example_kwargs)
    ctx.timings_s["capture"] = time.perf_counter() - start
    gm = run_passes(gm, ctx, passes)
    return Analysis(gm, layer_table(gm), dict(ctx.timings_s), ctx)


def search(
    model: nn.Module | Analysis,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    cluster: Any,
    memory_budget_gb: float,
    global_batch: int,
    world_size: int | None = None,
    precision: Any = "mixed",
    baselines: bool = True,
    max_pipeline: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    efficiency: float = 1.0,
    ulysses: bool = True,
) -> Any:
    """The best plan for `model` (or an `Analysis` of it) on `world_size` devices of
    `cluster` (a `ClusterSpec`, a preset name like `a100-80gb-sxm:nodes=8`, or `local`), each
    with `memory_budget_gb`, training `global_batch` samples a step: a `SearchResult` with
    `.plan`, `.predicted`, `.baselines` and per-unit explanations; `max_pipeline` caps the
    pipeline degree; `efficiency` is the fraction of peak FLOP/s the layers reach
    (`passes.plan_costs.measured_efficiency` reads it off a profiled layer table);
    `ulysses=False` leaves Ulysses sequence parallelism out of the candidates. Plans
    for any cluster from any machine: a model built on the meta device allocates nothing."""
    from galvatron_fx.passes.search import run_search

    analysis = (
        model if isinstance(model, Analysis) else analyze(model, example_inputs, example_kwargs)
    )
    return run_search(
        analysis,
        cluster=cluster,
        memory_budget_gb=memory_budget_gb,
        global_batch=global_batch,
        world_size=world_size,
        precision=precision,
        baselines=baselines,
        max_pipeline=max_pipeline,
        progress=progress,
        efficiency=efficiency,
        ulysses=ulysses,
    )


PARALLEL_PASSES: tuple[Pass, ...] = (
    shard,  # gfx_placement: dp/tp placement of every node, redistributions, column/row linears
    insert_collectives,  # this rank's program: collectives, local shapes, TP parameter slices
    check_program,  # the program is what the plan says: batch split, weights split, groups
    zero3,  # ZeRO-3 layers: parameters stored as dp shards, gathered before use
    recompute,  # checkpointed regions: whole layers or their attention cores
    # split_stages: added by the pipeline issue
)


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def compile(  # the public name the design promises: galvatron_fx.compile
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    plan: Plan | None = None,
    optimizer: OptimizerFactory | None = None,
    loss_fn: LossFn | None = None,
    bucket_mb: float = 25.0,
    print_after: Sequence[str] = (),
    cluster: Any = None,
    memory_budget_gb: float | None = None,
    global_batch: int | None = None,
    check_finite: bool = False,
) -> Any:
    """Capture `model`, rewrite it for this rank under `plan`, and wrap it with gradient sync
    and `optimizer` (a factory `params -> Optimizer`; default AdamW, lr 1e-3).

    Runs on every rank of an initialised process group (or alone: world size 1). Without a
    plan, `cluster` and `memory_budget_gb` make rank 0 search one (for the job's ranks and
    the example batch, pipeline stages included unless weights are tied across layers) and
    send it to every rank; with neither, every unit uses plain data parallelism over all
    ranks. `example_inputs` are the whole batch (`global_batch`, if given, must be its
    size); `train_step` takes whole batches shaped like them. A plan with pipeline stages
    gives a `PipelinedModel` (the same `train_step`, checkpoints and whole tensors).
    `check_finite`: on an inf or NaN loss, skip the update and raise `NonFiniteLossError`
    naming the step and the layer where it first appeared."""
    start = time.perf_counter()
    timings_s: dict[str, float] = {}
    compiled = _compile(
        model, tuple(example_inputs), dict(example_kwargs or {}), plan, optimizer, loss_fn,
        bucket_mb, print_after, cluster, memory_budget_gb, global_batch, timings_s,
    )  # fmt: skip
    timings_s["runtime"] = time.perf_counter() - start - sum(timings_s.values())
    compiled.compile_timings_s = timings_s
    compiled.check_finite = check_finite
    return compiled


def _compile(
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    plan: Plan | None,
    optimizer: OptimizerFactory | None,
    loss_fn: LossFn | None,
    bucket_mb: float,
    print_after: Sequence[str],
    cluster: Any,
    memory_budget_gb: float | None,
    global_batch: int | None,
    timings_s: dict[str, float],
) -> Any:
    """`compile`, filling `timings_s` with every step's seconds: the capture and passes of
    the whole batch, the search, the micro-batch capture (suffixed), the parallel passes."""
    if loss_fn is not None and plan is not None and plan.pipeline.degree > 1:
        raise PlanError("compile: loss_fn= with pipeline stages is not supported; return the loss")
    analysis = analyze(model, inputs, kwargs, print_after=print_after)
    timings_s.update(analysis.timings_s)
    _check_batch(analysis, global_batch)
    if plan is None and cluster is not None:
        start = time.perf_counter()
        plan = _searched_plan(analysis, cluster, memory_budget_gb, pipeline=loss_fn is None)
        timings_s["search"] = time.perf_counter() - start
    if plan is not None and plan.pipeline.micro_batches * plan.pipeline.degree > 1:
        # checked on the whole batch's graph: the plan's fingerprint is of that graph
        check_plan(plan, analysis.graph_module, _world(), micro_batches=True)
        m = plan.pipeline.micro_batches  # the graph bakes its batch into view shapes
        inputs, kwargs = micro_batch((inputs, kwargs), m, 0)
        micro = analyze(model, inputs, kwargs)
        timings_s.update({f"{k} (micro-batch)": v for k, v in micro.timings_s.items()})
        if plan.pipeline.degree > 1:
            compiled = _compile_pipelined(
                micro, [*inputs, *kwargs.values()], plan, optimizer, bucket_mb
            )
        else:
            compiled = _rewrite(micro, plan, optimizer, loss_fn, bucket_mb, _rank(), _world())
        analysis = micro
    else:
        compiled = parallelize(
            analysis, plan=plan, optimizer=optimizer, loss_fn=loss_fn, bucket_mb=bucket_mb
        )
    timings_s.update(
        {k: v for k, v in analysis.context.timings_s.items() if k not in analysis.timings_s}
    )
    return compiled


def _check_batch(analysis: Analysis, global_batch: int | None) -> None:
    from galvatron_fx.passes.search_costs import captured_batch

    if global_batch is not None and global_batch != captured_batch(analysis):
        raise PlanError(
            f"compile: global_batch={global_batch} but the example inputs hold a batch of "
            f"{captured_batch(analysis)}; pass example inputs of the whole global batch"
        )


def _searched_plan(
    analysis: Analysis, cluster: Any, memory_budget_gb: float | None, pipeline: bool = True
) -> Plan:
    """Rank 0 searches, every rank gets its plan (one decision, however the ranks' clocks
    or libraries differ)."""
    from galvatron_fx.passes.search import run_search
    from galvatron_fx.passes.search_costs import captured_batch

    if memory_budget_gb is None:
        raise PlanError("compile: cluster= needs memory_budget_gb= to search a plan")
    world = _world()
    found: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = run_search(
                analysis, cluster=cluster, memory_budget_gb=memory_budget_gb,
                global_batch=captured_batch(analysis), world_size=world, baselines=False,
                max_pipeline=None if pipeline else 1,
            )  # fmt: skip
            found[0] = result.plan.to_json()
        except (PlanError, ValueError) as err:
            # every rank waits for the plan: send them the error, or they hang until timeout
            found[0] = {"error": str(err)}
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    if "error" in found[0]:
        raise PlanError(found[0]["error"])
    return Plan.from_json(found[0], source="the searched plan")


def _compile_pipelined(
    analysis: Analysis,
    micro_inputs: list[Any],
    plan: Plan,
    optimizer: OptimizerFactory | None,
    bucket_mb: float,
) -> Any:
    """A plan with pipeline stages, on a graph captured at the micro-batch size: rewritten
    by the parallel passes for one stage's ranks (`stage_ranks`), then cut into stages;
    this rank runs its stage(s)."""
    from galvatron_fx.passes.split_stages import split_stages, unit_stages
    from galvatron_fx.passes.stage_ranks import pipeline_groups, shift_ranks
    from galvatron_fx.runtime.compiled import input_slices, loss_reduction
    from galvatron_fx.runtime.pipeline import (
        PipelinedModel,
        StageProgram,
        held_specs,
        shared_groups,
        shared_params,
        stages_holding,
    )

    world, rank, p = _world(), _rank(), plan.pipeline
    per_stage = world // p.degree
    offset, local = rank - rank % per_stage, rank % per_stage
    gm, ctx = analysis.graph_module, analysis.context
    if analysis.units != list(plan.units):  # compile checked the plan on the whole batch
        raise PlanError(f"plan's units {list(plan.units)[:4]}... are not this model's")
    stage_plan = dataclasses.replace(plan, world_size=per_stage, pipeline=PipelineConfig())
    stage_of = unit_stages(analysis.units, p.stage_starts)
    ctx.results.update(
        plan=stage_plan, rank=local, unit_stage=stage_of, micro_batches=p.micro_batches
    )
    gm = run_passes(gm, ctx, PARALLEL_PASSES)
    specs = shift_ranks(gm, ctx.results["params"], offset)
    pp_groups = pipeline_groups(world, p.degree)
    loss_group, loss_avg = loss_reduction(gm, stage_plan, local)
    program = StageProgram(
        split=_timed(ctx, "split_stages", lambda: split_stages(gm, plan)),
        module=gm,
        specs=specs,
        inputs=input_slices(gm, stage_plan, local),
        local_rank=local,
        loss_group=GroupRef(tuple(r + offset for r in loss_group.ranks)),
        loss_avg=loss_avg,
        zero3=any(spec.zero3_flat for spec in specs.values()),
    )
    # a weight tied across stages: summed over the pipeline ranks holding it, per position
    shared = shared_params(program, p.degree)
    sums = [g for ranks in shared.values() for g in shared_groups(ranks, per_stage)]
    if world > 1:
        GROUPS.create([*_all_groups(gm, specs), *pp_groups, *sums])
    stages = range(rank // per_stage, len(program.split.stages), p.degree)
    mine = held_specs(program, stages)
    tied = _TiedSync(
        {n: GroupRef(shared_groups(ranks, per_stage)[local]) for n, ranks in shared.items()},
        stages_holding(program, stages),
    )
    sync = _grad_sync(gm, mine, stage_plan, rank, optimizer, bucket_mb, p.micro_batches, tied)
    pp_group = GROUPS.groups.get(pp_groups[local]) if world > 1 else None
    return PipelinedModel(program, plan, micro_inputs, sync, rank, world, pp_group)


def _timed(ctx: PassContext, name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    ctx.timings_s[name] = time.perf_counter() - start
    return out


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def parallelize(
    analysis: Analysis,
    *,
    plan: Plan | None = None,
    optimizer: OptimizerFactory | None = None,
    loss_fn: LossFn | None = None,
    bucket_mb: float = 25.0,
    rank: int | None = None,
) -> CompiledModel:
    """The back half of `compile`: rewrite an analysed graph (in place: pass a deep copy to
    keep it) for this rank. `rank` overrides the process group's (planning for another rank
    in one process, e.g. with the fake backend); groups are created only in a real job."""
    world = _world()
    rank = _rank() if rank is None else rank
    if plan is None:
        plan = analysis.plan(LayerStrategy(dp=world), world_size=world)
    check_plan(plan, analysis.graph_module, world)
    return _rewrite(analysis, plan, optimizer, loss_fn, bucket_mb, rank, world)


def _rewrite(
    analysis: Analysis,
    plan: Plan,
    optimizer: OptimizerFactory | None,
    loss_fn: LossFn | None,
    bucket_mb: float,
    rank: int,
    world: int,
) -> CompiledModel:
    gm, ctx = analysis.graph_module, analysis.context
    ctx.results.update(plan=plan, rank=rank)
    gm = run_passes(gm, ctx, PARALLEL_PASSES)
    specs: dict[str, ParamSpec] = ctx.results["params"]
    if world > 1:
        GROUPS.create(_all_groups(gm, specs))
    sync = _grad_sync(gm, specs, plan, rank, optimizer, bucket_mb, plan.pipeline.micro_batches)
    return CompiledModel(gm, plan, specs, sync, loss_fn, rank)


@dataclasses.dataclass(frozen=True)
class _TiedSync:
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
    tied: _TiedSync | None = None,
) -> GradSync:
    """The gradient sync and optimizer over the parameters in `specs`."""
    return GradSync(
        _synced(gm, specs, plan, rank, tied or _TiedSync()),
        optimizer or _adamw,
        bucket_mb,
        _zero3_tp_sums(gm, specs, rank),
        accumulations=micro_batches,
    )


def _adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _synced(
    gm: fx.GraphModule, specs: dict[str, ParamSpec], plan: Plan, rank: int, tied: _TiedSync
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


def _all_groups(gm: fx.GraphModule, specs: dict[str, ParamSpec]) -> list[tuple[int, ...]]:
    """Every rank set any rank uses: all ranks must create every group, in the same order."""
    mine: set[tuple[int, ...]] = set()
    graphs = [m.graph for m in gm.modules() if isinstance(m, fx.GraphModule)]  # regions too
    for node in (n for graph in graphs for n in graph.nodes):
        mine.update(collectives.groups_of(node.target, node.args))
    for spec in specs.values():
        mine.update({spec.tp_group.ranks, spec.dp_group.ranks})
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    return [tuple(g) for groups in everyone for g in groups]
