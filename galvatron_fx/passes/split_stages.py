"""Split stages: cut a graph at a plan's pipeline stage boundaries, one submodule per stage.

Reads: `gfx_layer` on every node; `ctx.target.pipeline.stage_starts` (chunks counted as
stages). Writes: nothing on the input graph; `ctx.stages`, a `StageSplit` whose graph module runs
`stage_0`, `stage_1`, ... in order and passes the activations between them (what a pipeline
runtime sends between ranks).
Guarantees:
- every computed node goes to its unit's stage, or to the latest stage among its inputs when
  that is later (index arithmetic and masks outside any block), so no stage reads a later one;
- a parameter lives in the stages that use it, under its original name
  (`torch.fx.passes.split_utils.split_by_tags` copies a `get_attr` into its user's
  submodule, and the copy refers to the very Parameter object, so gradients land on it);
- a parameter used by several stages (a tied embedding and head) is in each of them; the
  runtime sums its gradient over the pipeline ranks running them before the optimizer
  steps each copy alike (`runtime.pipeline.shared_params`), as Megatron's embedding group
  does;
- `StageSplit.param_names[k]` maps stage k's parameter names to the model's.

The runtime puts the stages on ranks with `torch.distributed.pipelining`
(`runtime.pipeline`); `cut_stages` is the same cut on any tagged graph.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from torch import fx, nn
from torch.fx.passes.split_utils import split_by_tags

from galvatron_fx.meta import LAYER
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.plan import PipelineConfig, PlanError
from galvatron_fx.runtime.program import StageSplit

__all__ = ["cut_stages", "split_stages", "unit_stages"]


def unit_stages(units: Sequence[str], stage_starts: Sequence[str]) -> dict[str, int]:
    """Each unit's stage: how many stage starts are at or before it."""
    position = {u: i for i, u in enumerate(units)}
    missing = [s for s in stage_starts if s not in position]
    if missing:
        raise PlanError(f"pipeline stage starts {missing} are not units of this model")
    starts = sorted(position[s] for s in stage_starts)
    return {u: bisect.bisect_right(starts, i) for u, i in position.items()}


@graph_pass(reads=(LAYER.name,), writes=())
def split_stages(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Cut the program into `ctx.target.pipeline`'s stages (`ctx.stages`); `gm` is kept."""
    target = ctx.require_target("split_stages")
    ctx.stages = cut_stages(gm, target.plan.units, target.pipeline)
    return gm


def cut_stages(gm: fx.GraphModule, units: Sequence[str], p: PipelineConfig) -> StageSplit:
    """Cut `gm` (any graph whose nodes carry `gfx_layer`) into the stages of pipeline `p`;
    `units` in the model's order."""
    n = p.degree * p.virtual_stages
    # the plan's order (the model's), not the graph's: the rewrite inserts a unit's input
    # slicing next to the inputs, ahead of the units before it
    of_unit = unit_stages(list(units), p.stage_starts)
    tags = [f"stage_{k}" for k in range(n)]
    _tag_nodes(gm, of_unit, tags)
    split = split_by_tags(gm, tags)
    assert isinstance(split, fx.GraphModule)
    used = [t for t in tags if hasattr(split, t)]
    if len(used) != n:
        raise PlanError(f"pipeline: stages {sorted(set(tags) - set(used))} would hold no op")
    names = tuple(_param_names(getattr(split, t), gm) for t in used)
    return StageSplit(split, tuple(used), names)


def _tag_nodes(gm: fx.GraphModule, of_unit: dict[str, int], tags: list[str]) -> dict[fx.Node, int]:
    """Stage of every computed node (inputs first: a node never precedes its inputs)."""
    stage_of: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = [stage_of[a] for a in node.all_input_nodes if a in stage_of]
        stage_of[node] = max([of_unit[LAYER.get(node).name], *inputs])
        node.tag = tags[stage_of[node]]  # split_by_tags reads this attribute
    return stage_of


def _param_names(stage: nn.Module, root: fx.GraphModule) -> dict[str, str]:
    """Stage parameter name -> the model's, matched by identity (the same Parameter)."""
    by_id = {id(p): name for name, p in root.named_parameters(remove_duplicate=False)}
    return {name: by_id[id(p)] for name, p in stage.named_parameters() if id(p) in by_id}
