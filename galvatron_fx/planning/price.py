"""The price of a plan: time and memory of every unit on one rank, read off the program
`lowering.lower` makes of it (`lowered.lower_for_pricing`), recomputation included.

Each unit's compute, kept activations and parameters come from `unit_terms`; what it
communicates from `collective_list` (a recomputed region's forward collectives twice); model
states follow ZeRO per the unit's dp mode.
Compute times are measured where the profiler timed the unit's fingerprint under this
strategy (`profile --model`, `LayerTimes`), and a roofline elsewhere; collectives are
alpha-beta with overlap (`cost_models`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from galvatron_fx.cost_models.communication import collectives_time, spans_nodes
from galvatron_fx.cost_models.compute import adam_step_time_s
from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.cost_models.layer_times import LayerTimes, default_strategies
from galvatron_fx.cost_models.memory import Precision, model_state_bytes
from galvatron_fx.cost_models.peak_memory import PeakMemory, UnitMemory
from galvatron_fx.cost_models.traffic import Collective
from galvatron_fx.lowering import Analysis
from galvatron_fx.meta import COST, PLACEMENT
from galvatron_fx.plan import Plan
from galvatron_fx.planning.lowered import lower_for_pricing
from galvatron_fx.planning.plan_memory import (
    UnitMemoryInputs,
    plan_peak_memory,
    unit_memory,
)
from galvatron_fx.planning.unit_terms import (
    compute_times,
    local_params,
    memory_inputs,
    stepped_elems,
    trained_width,
)
from galvatron_fx.unit_graph.attention import attention_cores
from galvatron_fx.unit_graph.units import unit_nodes

__all__ = [
    "UnitCost",
    "measured_efficiency",
    "plan_peak",
    "price_plan",
]


@dataclass(frozen=True)
class UnitCost:
    """One unit on one rank for one training step."""

    unit: str
    strategy: str
    fwd_s: float
    bwd_s: float
    recompute_s: float
    step_s: float
    """The optimizer step over what this rank steps."""
    comm_total_s: float
    comm_exposed_s: float
    """Communication the step waits for (in-line, plus what overlap does not hide)."""
    model_state_bytes: float
    """Parameters, gradients and optimizer states on this rank."""
    params: int
    """The unit's parameters this rank's TP piece holds (before any ZeRO sharding)."""
    activation_bytes: float
    """Saved for backward on this rank."""
    collectives: tuple[Collective, ...] = ()
    """What the unit communicates (priced in `comm_total_s`)."""
    measured: bool = False
    """Compute times come from the profiler's table, not the roofline."""
    memory: UnitMemory | None = None
    """The unit's terms of the step's peak memory (`plan_peak`)."""
    memory_inputs: UnitMemoryInputs | None = None

    @property
    def compute_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.recompute_s + self.step_s

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_exposed_s

    @property
    def memory_bytes(self) -> float:
        return self.model_state_bytes + self.activation_bytes


def price_plan(
    analysis: Analysis,
    plan: Plan,
    cluster: ClusterSpec,
    *,
    rank: int = 0,
    dtype: str = "fp32",
    precision: Precision = "fp32",
    efficiency: float = 1.0,
    layer_times: LayerTimes | None = None,
) -> list[UnitCost]:
    """Per unit, in order: what `plan` costs rank `rank` on `cluster`; compute measured
    where `layer_times` has the unit under its strategy."""
    original = unit_nodes(analysis.graph_module)
    lowered = lower_for_pricing(analysis, plan, rank)
    params, comms, ratio = lowered.params, lowered.collectives, lowered.ratios
    rewritten = unit_nodes(lowered.graph_module)
    stepped = stepped_elems(params, plan)
    fingerprints = {u.name: u.fingerprint for u in analysis.layers}
    previous_params = 0
    state_bytes = 4 if precision == "fp32" else 2
    out = []
    for unit, s in plan.strategies:
        nodes = [n for n in rewritten.get(unit, []) if COST.has(n) and PLACEMENT.has(n)]
        cores = {n.name for core in attention_cores(original.get(unit, [])) for n in core}
        found = layer_times.lookup(fingerprints[unit], s) if layer_times else None
        if found is not None:
            work_s = (found.fwd_s, found.bwd_s, found.recompute_s, found.step_s)
        else:
            step_s = float(adam_step_time_s(stepped.get(unit, 0), cluster, state_bytes))
            width = trained_width(rewritten.get(unit, []), precision)
            times = compute_times(nodes, cores, s, cluster, dtype, width, efficiency)
            work_s = (*times, step_s)
        # what the rank moves and keeps at the trained width, as the search prices them
        trained = trained_width(rewritten.get(unit, []), precision)
        listed = tuple(_at_width(c, trained, cluster.gloo) for c in comms.get(unit, []))
        beside = {"forward": work_s[0], "backward": work_s[1] + work_s[2]}
        comm = collectives_time(listed, cluster, spans_nodes(s, cluster), beside)
        held = local_params(params, unit)
        states = model_state_bytes(held, s.state_dp, s.dp_mode, precision).total_bytes
        inputs = memory_inputs(nodes, rewritten.get(unit, []), ratio, cores, s, params, unit, held)
        inputs = _saved_at_width(inputs, trained)
        memory = unit_memory(inputs, s, precision, previous_params, gloo=cluster.gloo)
        previous_params = inputs.local_params
        comm_s = (comm.total_s, comm.exposed_s)
        out.append(
            UnitCost(
                unit, s.short(), *work_s, *comm_s, states, held, inputs.kept_bytes,
                listed, measured=found is not None, memory=memory, memory_inputs=inputs,
            )
        )  # fmt: skip
    return out


def _at_width(c: Collective, width: float, gloo: bool) -> Collective:
    """`c` at the trained width; in line where the runtime waits for it at once (ZeRO-3's
    gathers and reduce-scatters on gloo)."""
    waited = gloo and c.source.startswith("zero3")
    return dataclasses.replace(
        c, size_bytes=c.size_bytes * width, overlappable=c.overlappable and not waited
    )


def _saved_at_width(m: UnitMemoryInputs, width: float) -> UnitMemoryInputs:
    """A unit's activation bytes at the trained width (parameter counts stay)."""
    return dataclasses.replace(
        m,
        all_saved_bytes=m.all_saved_bytes * width,
        kept_bytes=m.kept_bytes * width,
        largest_value_bytes=m.largest_value_bytes * width,
    )


def plan_peak(
    costs: list[UnitCost],
    plan: Plan,
    cluster: ClusterSpec,
    precision: Precision = "fp32",
    bucket_mb: float = 25.0,
) -> PeakMemory:
    """The rank's peak memory over a step, from `price_plan`'s units. Collectives run on gloo
    when the cluster is this machine's CPU ranks (`local`)."""
    units = [(c.unit, c.memory, c.memory_inputs) for c in costs]
    known = [(u, m, i) for u, m, i in units if m is not None and i is not None]
    return plan_peak_memory(plan, known, precision, gloo=cluster.gloo, bucket_mb=bucket_mb)


def measured_efficiency(
    analysis: Analysis,
    cluster: ClusterSpec,
    layer_times: LayerTimes,
    world: int,
    *,
    dtype: str = "fp32",
    max_strategies: int = 3,
) -> float | None:
    """How much of the roofline's compute speed this model's profiled layers reach on
    `cluster`: the roofline's forward + backward seconds over the measured ones, summed over
    the units of up to `max_strategies` uniform plans the table has entries for (None when
    it has none). The search prices compute with it (`search(efficiency=)`): the roofline
    alone assumes the matmul peak, which CPU layers here reach about half of."""
    fingerprints = {u.name: u.fingerprint for u in analysis.layers}
    roofline_s = measured_s = 0.0
    found = 0
    for s in default_strategies(world):
        if found == max_strategies:
            break
        if not any(layer_times.lookup(f, s) for f in fingerprints.values()):
            continue
        plan = analysis.plan(s, world_size=world)
        roof = price_plan(analysis, plan, cluster, dtype=dtype)
        meas = price_plan(analysis, plan, cluster, dtype=dtype, layer_times=layer_times)
        for r, m in zip(roof, meas, strict=True):
            if m.measured:
                roofline_s += r.fwd_s + r.bwd_s
                measured_s += m.fwd_s + m.bwd_s
        found += 1
    if measured_s <= 0:
        return None
    return min(max(roofline_s / measured_s, 0.01), 1.0)
