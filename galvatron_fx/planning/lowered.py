"""A plan lowered for pricing: `lowering.lower` on a copy of the analysis, read as one graph.

Pricing reads the program `compile` runs, recomputation included: checkpointed regions are
inlined back into one graph for the readers (`recompute.inline_regions`), and the nodes they
hold are the ones backward runs again, so their forward collectives are listed twice
(`collective_list.collectives_of`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import fx

from galvatron_fx.cost_models.traffic import Collective
from galvatron_fx.lowering import Analysis, lower
from galvatron_fx.passes.recompute import inline_regions
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.planning.collective_list import collectives_of
from galvatron_fx.planning.plan_memory import local_ratios
from galvatron_fx.runtime.program import ParamSpec

__all__ = ["LoweredForPricing", "lower_for_pricing", "plan_collectives", "switch_collectives"]


@dataclass(frozen=True)
class LoweredForPricing:
    """One rank's program under a plan, as the price readers see it."""

    graph_module: fx.GraphModule
    """The lowered graph with its checkpointed regions inlined."""
    params: dict[str, ParamSpec]
    collectives: dict[str, list[Collective]]
    """Per unit, every collective the rank runs in a step (recomputed ones included)."""
    ratios: dict[str, float]
    """Per node name: local elements over the captured (global) elements."""
    recomputed: frozenset[str]
    """Names of the nodes backward runs again."""


def lower_for_pricing(
    analysis: Analysis, plan: Plan, rank: int = 0, *, quiet: bool = False
) -> LoweredForPricing:
    """Rank `rank`'s program under `plan`, lowered from a copy of `analysis` (kept intact).
    `quiet`: without the rewrite's warnings (ops that gather), for the search's many
    rewrites of one model; pricing a plan the user asked about keeps them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep-copying the graph's pytree specs warns
        work = analysis.copy()
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        program = lower(work, plan, rank, codegen=False)
    gm, recomputed = inline_regions(program.graph_module)
    comms = collectives_of(gm, program.params, program.plan, recomputed)
    ratios = local_ratios(analysis.graph_module.graph, gm.graph)
    return LoweredForPricing(gm, program.params, comms, ratios, recomputed)


def plan_collectives(analysis: Analysis, plan: Plan, rank: int = 0) -> dict[str, list[Collective]]:
    """What `plan` makes rank `rank` communicate in a step, per unit, from the program
    `compile` would run (recomputation included); needs no process group."""
    return lower_for_pricing(analysis, plan, rank).collectives


def switch_collectives(
    analysis: Analysis, unit: str, before: LayerStrategy, after: LayerStrategy, world_size: int
) -> list[Collective]:
    """The layout switch into `unit` when every unit before it runs `before` and it (and
    everything after) runs `after`: the redistributions `unit` issues for its inputs."""
    i = analysis.units.index(unit)
    strategies = {u: before if k < i else after for k, u in enumerate(analysis.units)}
    plan = analysis.plan(strategies, world_size=world_size)
    listed = plan_collectives(analysis, plan).get(unit, [])
    return [c for c in listed if c.source == "switch_layout"]
