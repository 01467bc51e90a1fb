"""The compiler's pass list, literally, in order, and the entry points that run it.

Step 0 is `capture` (model -> GraphModule); every later step is a `Pass` `(gm, ctx) -> gm`
run by `run_passes`, which checks the meta keys each pass declares, lints the graph, checks
the invariants and times every pass. To add a pass of your own, build a new list, e.g.
`insert_after(FRONTEND_PASSES, "annotate_costs", my_pass)`, and hand it to `analyze`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import fx, nn

from galvatron_fx.passes.annotate_costs import annotate_costs
from galvatron_fx.passes.capture import capture
from galvatron_fx.passes.group_layers import group_layers
from galvatron_fx.passes.manager import Pass, PassContext, run_passes
from galvatron_fx.summary import LayerSummary, layer_table

__all__ = ["FRONTEND_PASSES", "Analysis", "analyze"]

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
