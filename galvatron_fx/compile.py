"""The driver: capture -> analyze -> search -> lower -> assemble.

`compile` runs on every rank of a job: it analyses the model (`lowering.analyze`), gets a plan
(given, searched on rank 0 and broadcast, or plain data parallel), lowers it to this rank's
program (`lowering.lower`; with pipeline stages, on a graph captured at the micro-batch size)
and assembles that into a trainable model (`runtime.assemble`). `search` and `parallelize` are
its two halves on their own. Only the package's face (`galvatron_fx`) and the CLI import this.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.cost_models.memory import Precision
from galvatron_fx.lowering import Analysis, analyze, lower
from galvatron_fx.plan import LayerStrategy, Plan, PlanError
from galvatron_fx.plan_checks import check_plan
from galvatron_fx.planning.search_step import SearchResult, search_analysis
from galvatron_fx.runtime.assemble import OptimizerFactory, assemble, assemble_pipelined
from galvatron_fx.runtime.compiled import CompiledModel, LossFn, micro_batch
from galvatron_fx.runtime.pipeline import PipelinedModel

__all__ = ["compile", "parallelize", "search"]


def search(
    model: nn.Module | Analysis,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    cluster: ClusterSpec | str,
    memory_budget_gb: float,
    global_batch: int,
    world_size: int | None = None,
    precision: Precision = "mixed",
    baselines: bool = True,
    max_pipeline: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    efficiency: float = 1.0,
    ulysses: bool = True,
) -> SearchResult:
    """The best plan for `model` (or an `Analysis` of it) on `world_size` devices of
    `cluster` (a `ClusterSpec`, a preset name like `a100-80gb-sxm:nodes=8`, or `local`), each
    with `memory_budget_gb`, training `global_batch` samples a step: a `SearchResult` with
    `.plan`, `.predicted`, `.baselines` and per-unit explanations; `max_pipeline` caps the
    pipeline degree; `efficiency` is the fraction of peak FLOP/s the layers reach
    (`planning.price.measured_efficiency` reads it off a profiled layer table);
    `ulysses=False` leaves Ulysses sequence parallelism out of the candidates. Plans
    for any cluster from any machine: a model built on the meta device allocates nothing."""
    analysis = (
        model if isinstance(model, Analysis) else analyze(model, example_inputs, example_kwargs)
    )
    return search_analysis(
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
    cluster: ClusterSpec | str | None = None,
    memory_budget_gb: float | None = None,
    global_batch: int | None = None,
    check_finite: bool = False,
) -> CompiledModel | PipelinedModel:
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
    cluster: ClusterSpec | str | None,
    memory_budget_gb: float | None,
    global_batch: int | None,
    timings_s: dict[str, float],
) -> CompiledModel | PipelinedModel:
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
    compiled: CompiledModel | PipelinedModel
    if plan is None or plan.pipeline.micro_batches * plan.pipeline.degree == 1:
        compiled = parallelize(
            analysis, plan=plan, optimizer=optimizer, loss_fn=loss_fn, bucket_mb=bucket_mb
        )
    else:
        # checked on the whole batch's graph: the plan's fingerprint is of that graph
        check_plan(plan, analysis.graph_module, _world(), micro_batches=True)
        m = plan.pipeline.micro_batches  # the graph bakes its batch into view shapes
        inputs, kwargs = micro_batch((inputs, kwargs), m, 0)
        micro = analyze(model, inputs, kwargs)
        timings_s.update({f"{k} (micro-batch)": v for k, v in micro.timings_s.items()})
        program = lower(micro, plan, _rank())
        if plan.pipeline.degree > 1:
            micro_inputs = [*inputs, *kwargs.values()]
            compiled = assemble_pipelined(
                program, plan, micro_inputs, rank=_rank(), world=_world(),
                optimizer=optimizer, bucket_mb=bucket_mb,
            )  # fmt: skip
        else:
            compiled = assemble(
                program, world=_world(), optimizer=optimizer, loss_fn=loss_fn, bucket_mb=bucket_mb
            )
        analysis = micro
    timings_s.update(
        {k: v for k, v in analysis.context.timings_s.items() if k not in analysis.timings_s}
    )
    return compiled


def _check_batch(analysis: Analysis, global_batch: int | None) -> None:
    if global_batch is not None and global_batch != analysis.batch_size:
        raise PlanError(
            f"compile: global_batch={global_batch} but the example inputs hold a batch of "
            f"{analysis.batch_size}; pass example inputs of the whole global batch"
        )


def _searched_plan(
    analysis: Analysis,
    cluster: ClusterSpec | str,
    memory_budget_gb: float | None,
    pipeline: bool = True,
) -> Plan:
    """Rank 0 searches, every rank gets its plan (one decision, however the ranks' clocks
    or libraries differ)."""
    if memory_budget_gb is None:
        raise PlanError("compile: cluster= needs memory_budget_gb= to search a plan")
    world = _world()
    found: list[dict[str, Any] | None] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            # the runtime keeps parameters, gradients and Adam states in the model's own
            # dtype (fp32), and moves and saves values in it: price what it will run
            result = search_analysis(
                analysis, cluster=cluster, memory_budget_gb=memory_budget_gb,
                global_batch=analysis.batch_size, world_size=world, baselines=False,
                max_pipeline=None if pipeline else 1, precision="fp32",
            )  # fmt: skip
            found[0] = result.plan.to_json()
        except (PlanError, ValueError) as err:
            # every rank waits for the plan: send them the error, or they hang until timeout
            found[0] = {"error": str(err)}
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    message = found[0]
    assert message is not None, "rank 0 broadcasts a plan or an error"
    if "error" in message:
        raise PlanError(message["error"])
    return Plan.from_json(message, source="the searched plan")


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
    """The back half of `compile` for a plan without pipeline stages: lower an analysed graph
    (in place: pass a deep copy to keep it) for this rank and assemble it. `rank` overrides
    the process group's (planning for another rank in one process, e.g. with the fake
    backend); groups are created only in a real job."""
    world = _world()
    rank = _rank() if rank is None else rank
    if plan is None:
        plan = analysis.plan(LayerStrategy(dp=world), world_size=world)
    check_plan(plan, analysis.graph_module, world)
    program = lower(analysis, plan, rank)
    return assemble(program, world=world, optimizer=optimizer, loss_fn=loss_fn, bucket_mb=bucket_mb)
