"""From a model to one rank's program: the analysis, the literal pass lists, and `lower()`.

Step 0 is `capture` (model -> GraphModule); every later step is a `Pass` `(gm, ctx) -> gm`
run by `run_passes`, which checks the meta keys each pass declares, lints the graph, checks
the invariants and times every pass. To add a pass of your own, build a new list, e.g.
`insert_after(FRONTEND_PASSES, "annotate_costs", my_pass)`, and hand it to `analyze`.

`lower(analysis, plan, rank)` is the one place a plan becomes a program: `compile` runs what
it returns, pricing (`galvatron_fx.planning`) reads its graph, the collective listing reads
its collectives, so what is priced is what runs (recomputation included).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from galvatron_fx.passes.annotate_costs import annotate_costs
from galvatron_fx.passes.capture import capture
from galvatron_fx.passes.check_program import check_program
from galvatron_fx.passes.group_layers import group_layers
from galvatron_fx.passes.insert_collectives import insert_collectives
from galvatron_fx.passes.manager import Pass, PassContext, RewriteTarget, run_passes
from galvatron_fx.passes.recompute import recompute
from galvatron_fx.passes.shard import shard
from galvatron_fx.passes.split_stages import split_stages, unit_stages
from galvatron_fx.passes.stage_ranks import stage_ranks
from galvatron_fx.passes.zero3 import zero3
from galvatron_fx.plan import LayerStrategy, PipelineConfig, Plan, PlanError
from galvatron_fx.runtime.program import RankProgram
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import LayerSummary, layer_table, model_fingerprint

__all__ = [
    "FRONTEND_PASSES",
    "PARALLEL_PASSES",
    "PIPELINE_PASSES",
    "Analysis",
    "analyze",
    "lower",
]

FRONTEND_PASSES: tuple[Pass, ...] = (
    group_layers,  # gfx_layer: which repeated block or segment every node belongs to
    annotate_costs,  # gfx_cost: FLOPs, bytes, parameters, saved activations per node
)
"""After `capture`: what `analyze` runs. The search reads its result; it rewrites nothing."""

PARALLEL_PASSES: tuple[Pass, ...] = (
    shard,  # gfx_placement: dp/tp placement of every node, redistributions, column/row linears
    insert_collectives,  # this rank's program: collectives, local shapes, TP parameter slices
    check_program,  # the program is what the plan says: batch split, weights split, groups
    zero3,  # ZeRO-3 layers: parameters stored as dp shards, gathered before use
    recompute,  # checkpointed regions: whole layers or their attention cores
)
"""What `lower` runs for a plan without pipeline stages."""

PIPELINE_PASSES: tuple[Pass, ...] = (
    *PARALLEL_PASSES,  # on the graph of one micro-batch, for one stage's ranks
    stage_ranks,  # the stage's ranks moved to their global numbers
    split_stages,  # one submodule per pipeline stage
)
"""What `lower` runs for a plan with pipeline stages, on an analysis of one micro-batch (the
graph bakes its batch into view shapes, so the driver captures the micro-batch first)."""


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

    @property
    def batch_size(self) -> int:
        """The batch the model was captured with (the first tensor input's first dim)."""
        ctx = self.context
        for value in (*ctx.example_inputs, *ctx.example_kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        raise PlanError("the example inputs hold no tensor to read the batch size from")

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
        ctx = dataclasses.replace(
            self.context, timings_s=dict(self.timings_s), target=None, params={}, stages=None
        )
        return Analysis(copy.deepcopy(self.graph_module), self.layers, dict(self.timings_s), ctx)

    def with_graph(self, gm: fx.GraphModule) -> Analysis:
        """The same inputs with another annotated graph (a reduced copy of this one)."""
        ctx = dataclasses.replace(self.context, timings_s={}, target=None, params={}, stages=None)
        return Analysis(gm, layer_table(gm), {}, ctx)


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


def lower(
    analysis: Analysis,
    plan: Plan,
    rank: int = 0,
    *,
    codegen: bool = True,
    passes: Sequence[Pass] | None = None,
) -> RankProgram:
    """Rewrite `analysis` (in place: lower `analysis.copy()` to keep it) into rank `rank`'s
    program under `plan`, without process groups (collectives are graph ops naming ranks).

    A plan with pipeline stages is lowered for the ranks of `rank`'s stage
    (`PIPELINE_PASSES`: the stage's plan spans world / degree ranks, renumbered to global ranks
    after the rewrite, then cut into stages); `analysis` must then be of one micro-batch.
    `codegen=False` leaves the module's code stale: for readers of the graph (pricing).
    `passes` replaces the pass list (a user's own pass inserted, say)."""
    p = plan.pipeline
    if p.degree == 1:
        target = RewriteTarget(plan, rank, codegen, p.micro_batches)
        chosen = PARALLEL_PASSES
    else:
        if analysis.units != list(plan.units):
            raise PlanError(f"plan's units {list(plan.units)[:4]}... are not this model's")
        per_stage = plan.world_size // p.degree
        stage_plan = dataclasses.replace(plan, world_size=per_stage, pipeline=PipelineConfig())
        target = RewriteTarget(
            stage_plan,
            rank % per_stage,
            codegen,
            p.micro_batches,
            unit_stages(analysis.units, p.stage_starts),
            p,
            rank - rank % per_stage,
        )
        chosen = PIPELINE_PASSES
    ctx = analysis.context
    ctx.target = target
    gm = run_passes(analysis.graph_module, ctx, chosen if passes is None else passes)
    analysis.graph_module = gm
    return RankProgram(gm, ctx.params, target.plan, target.rank, ctx.stages, target.rank_offset)
