"""The price of a whole plan under the search's own model: `price(analysis, plan, cluster)`.

Reads an `Analysis` and a `Plan` (per-unit strategies, pipeline degree, stage boundaries,
micro-batches, schedule, virtual stages); writes nothing. The plan is priced by the code the
search prices its candidates with: the units' terms (`model_terms`), each unit's
`OptionCost` at the plan's micro-batch size (`SearchSpace.cost`), the layout switches and
the stage boundaries' point-to-point sends (`SearchSpace.problem_for`), and the step time
and memory of a fixed cut and assignment (`dp.evaluate`: the schedule's bubble included).

Guarantees: a plan the search returned is priced at the step time the search predicted for
it; a stage's memory is `sum(state + in_flight x act) + max(transient)` over its units, a
device's the sum over the stages (chunks) it runs, as the search charges it
(`search/option_cost.py`: an upper bound of the three-moment peak) but not rounded to the
search's memory buckets. A plan made for another model, more devices than the cluster has, a
batch its degrees do not divide, a layout the search does not price, or (with
`memory_budget_gb`) a stage over the budget raises a PlanError that says which.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from galvatron_fx.cost_models.hardware import ClusterSpec, load_cluster
from galvatron_fx.cost_models.memory import Precision
from galvatron_fx.lowering import Analysis
from galvatron_fx.plan import LayerStrategy, Plan, PlanError
from galvatron_fx.plan_checks import SharedWeight, shared_weights, tie_error
from galvatron_fx.planning.model_terms import ModelTerms, model_terms
from galvatron_fx.search.dp import Problem, evaluate
from galvatron_fx.search.planner import Config, SearchSpace
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint

__all__ = ["PlanPrice", "UnitPrice", "plan_config", "price", "tied_copies"]

GiB = 2**30


@dataclass(frozen=True)
class UnitPrice:
    """One unit of the plan on one rank of its stage, per micro-batch."""

    unit: str
    stage: int
    """Index of its stage (pipeline degree x chunks of them; stage k runs on device k % p)."""
    strategy: LayerStrategy
    time_s: float
    """Per micro-batch: compute, exposed communication, and its once-a-step work (gradient
    sync, optimizer step) spread over the micro-batches."""
    step_s: float
    """The once-a-step work (included in `time_s` as `step_s / micro_batches`)."""
    boundary_s: float
    """Per micro-batch: the layout switch from the unit before it, or, first in a stage
    after the first, receiving the stage's input (activations in, gradients out)."""
    state_bytes: float
    """Parameters, gradients and optimizer states this rank holds."""
    activation_bytes: float
    """Kept for backward, per micro-batch in flight."""
    transient_bytes: float
    """What its own backward or the optimizer step adds on top, once per stage (the largest)."""


@dataclass(frozen=True)
class PlanPrice:
    """A plan's step time and memory under the search's model."""

    step_time_s: float
    samples_per_s: float
    tflops_per_device: float
    global_batch: int
    stage_time_s: tuple[float, ...]
    """Per stage, in order (pipeline degree x chunks): seconds per micro-batch."""
    stage_memory_bytes: tuple[float, ...]
    """Per stage: its units' states, their activations x the micro-batches it holds in
    flight, and its largest transient."""
    in_flight: tuple[float, ...]
    """Per stage: micro-batches whose activations it holds at its peak (the schedule's)."""
    peak_memory_bytes: tuple[float, ...]
    """Per pipeline device: the memory of the stages it runs."""
    units: tuple[UnitPrice, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "step_time_s": self.step_time_s,
            "samples_per_s": self.samples_per_s,
            "tflops_per_device": self.tflops_per_device,
            "global_batch": self.global_batch,
            "stage_time_per_micro_batch_s": list(self.stage_time_s),
            "stage_memory_bytes": list(self.stage_memory_bytes),
            "in_flight": list(self.in_flight),
            "peak_memory_bytes": list(self.peak_memory_bytes),
            "units": [
                {
                    "unit": u.unit,
                    "stage": u.stage,
                    "strategy": u.strategy.short(),
                    "time_per_micro_batch_s": u.time_s,
                    "step_s": u.step_s,
                    "boundary_s": u.boundary_s,
                    "state_bytes": u.state_bytes,
                    "activation_bytes": u.activation_bytes,
                    "transient_bytes": u.transient_bytes,
                }
                for u in self.units
            ],
        }


def price(
    analysis: Analysis,
    plan: Plan,
    cluster: ClusterSpec | str,
    *,
    global_batch: int | None = None,
    precision: Precision = "mixed",
    dtype: str = "bf16",
    memory_budget_gb: float | None = None,
    efficiency: float = 1.0,
    compiled: bool = False,
) -> PlanPrice:
    """`plan`'s step time and memory on `cluster` (a spec or a preset name) for
    `global_batch` samples a step (default: the batch `analysis` was captured with), trained
    in `precision` with compute at `dtype`'s peak: the search's price of it (module
    docstring). `memory_budget_gb`: refuse a plan whose stages do not fit it, as the search
    would; `efficiency`: the search's (`search(efficiency=)`), times the cluster's own;
    `compiled`: each rank's program runs under `torch.compile` (memory-bound kernels
    fused)."""
    spec = load_cluster(cluster) if isinstance(cluster, str) else cluster
    batch = analysis.batch_size if global_batch is None else global_batch
    shared = shared_weights(analysis.graph_module)
    _check(analysis, plan, spec, batch, memory_budget_gb, shared)
    tps = sorted({s.tp for _, s in plan.strategies})
    terms = model_terms(
        analysis,
        spec,
        tps,
        dtype=dtype,
        efficiency=efficiency,
        precision=precision,
        compiled=compiled,
    )
    strategies = [plan.strategy(u) for u in terms.units]
    for unit, kind, s in zip(terms.units, terms.kinds, strategies, strict=True):
        if not terms.has(unit, s):
            raise PlanError(f"price: unit {unit!r}: {_unpriced(terms, kind, s)}")
    copies = tied_copies(shared, terms.units)
    # memory is checked below unrounded: the budget's buckets only round it up
    space = SearchSpace(terms, spec, plan.world_size, batch, float("inf"), precision, copies=copies)
    config = plan_config(plan)
    problem = space.problem_for(config, strategies)
    order = {u: i for i, u in enumerate(terms.units)}
    starts = (0, *(order[u] for u in plan.pipeline.stage_starts))
    solution = evaluate(problem, starts, [0] * len(strategies))
    assert solution is not None, "an unbounded budget fits every stage"
    stage_of = [k for k, (i, j) in enumerate(_bounds(starts, len(strategies))) for _ in range(i, j)]
    units = _unit_prices(problem, terms.units, strategies, stage_of, starts, space, config)
    in_flight = config.in_flight()
    stage_mem = _stage_memory(units, in_flight)
    if memory_budget_gb is not None:
        _check_memory(stage_mem, config, memory_budget_gb)
    per_device = tuple(
        sum(stage_mem[k] for k in range(d, config.stages, config.pipeline))
        for d in range(config.pipeline)
    )
    step_s = solution.time_s
    return PlanPrice(
        step_s,
        batch / step_s,
        terms.flops_per_sample * batch / step_s / plan.world_size / 1e12,
        batch,
        tuple(solution.stage_time_s),
        stage_mem,
        in_flight,
        per_device,
        units,
    )


def plan_config(plan: Plan) -> Config:
    """The search's configuration for `plan`'s pipeline."""
    p = plan.pipeline
    return Config(p.degree, p.micro_batches, p.schedule, p.virtual_stages)


def tied_copies(shared: Sequence[SharedWeight], units: Sequence[str]) -> dict[str, int]:
    """Per unit, the parameters of the tied weights it reads after their first reader (the
    unit whose costs count them): its own copy when a stage boundary separates them
    (`SearchSpace.copies`)."""
    order = {u: i for i, u in enumerate(units)}
    out: dict[str, int] = {}
    for w in shared:
        for u in sorted(w.units, key=order.__getitem__)[1:]:
            out[u] = out.get(u, 0) + w.numel
    return out


def _check(
    analysis: Analysis,
    plan: Plan,
    spec: ClusterSpec,
    batch: int,
    budget_gb: float | None,
    shared: Sequence[SharedWeight],
) -> None:
    """The plan fits the model, the cluster and the batch (PlanError says where not)."""
    gm = analysis.graph_module
    plan.check_model(model_fingerprint(gm), layer_shapes(gm), source="price: the plan")
    devices = spec.nodes * spec.devices_per_node
    if plan.world_size > devices:
        raise PlanError(
            f"price: the plan uses {plan.world_size} devices but cluster {spec.name!r} has "
            f"{devices}; describe more nodes (e.g. "
            f"'{spec.name}:nodes={-(-plan.world_size // spec.devices_per_node)}')"
        )
    if budget_gb is not None and budget_gb <= 0:
        raise PlanError(f"price: memory budget must be > 0 GB, got {budget_gb}")
    if batch < 1:
        raise PlanError(f"price: global batch must be >= 1, got {batch}")
    m = plan.pipeline.micro_batches
    for unit, s in plan.strategies:
        if batch % (m * s.dp):
            raise PlanError(
                f"price: unit {unit!r}: a global batch of {batch} does not split into {m} "
                f"micro-batch(es) over dp={s.dp}: it must be a multiple of {m * s.dp}"
            )
    errors = [e for e in (tie_error(plan, w) for w in shared) if e]
    if errors:
        raise PlanError(f"price: {errors[0]}")


def _unpriced(terms: ModelTerms, kind: str, s: LayerStrategy) -> str:
    """Why the search has no terms for `s` on a unit of `kind`."""
    if s.tp in terms.refused:
        return terms.refused[s.tp]
    if kind == "segment" and s.sp:
        return (
            f"{s.short()}: the search prices segments without sequence parallelism (a layout "
            "switch gathers their input); set sp to false on it"
        )
    if kind == "layer" and s.vocab_parallel:
        return f"{s.short()}: vocab_parallel splits a segment's vocabulary, not a layer"
    if s.ulysses:
        return f"{s.short()}: Ulysses needs attention whose heads and sequence tp={s.tp} divides"
    return f"{s.short()}: no priced layout (tp={s.tp}, sp={s.sp}, vocab={s.vocab_parallel})"


def _bounds(starts: Sequence[int], n: int) -> list[tuple[int, int]]:
    return list(itertools.pairwise([*starts, n]))


def _unit_prices(
    problem: Problem,
    units: Sequence[str],
    strategies: Sequence[LayerStrategy],
    stage_of: Sequence[int],
    starts: Sequence[int],
    space: SearchSpace,
    config: Config,
) -> tuple[UnitPrice, ...]:
    """Per unit: the one option `problem` holds for it, with its boundary as `dp.stage_cost`
    charges it (p2p first in a stage after the first, else the switch from the unit before)."""
    m, pipelined = config.micro_batches, config.pipeline > 1
    out = []
    for i, (unit, s) in enumerate(zip(units, strategies, strict=True)):
        u = problem.units[i]
        if i in starts:
            boundary = float(u.p2p_s[u.layout[0]]) if i > 0 else 0.0
        else:
            boundary = float(u.switch_s[problem.units[i - 1].layout[0], u.layout[0]])
        c = space.cost(unit, s, space.global_batch / (m * s.dp), pipelined)
        out.append(
            UnitPrice(
                unit, stage_of[i], s, float(u.time_s[0]), c.step_s, boundary,
                float(u.state_bytes[0]), float(u.act_bytes[0]), float(u.transient_bytes[0]),
            )
        )  # fmt: skip
    return tuple(out)


def _stage_memory(units: Sequence[UnitPrice], in_flight: Sequence[float]) -> tuple[float, ...]:
    out = []
    for k, a in enumerate(in_flight):
        mine = [u for u in units if u.stage == k]
        held = sum(u.state_bytes + a * u.activation_bytes for u in mine)
        out.append(held + max((u.transient_bytes for u in mine), default=0.0))
    return tuple(out)


def _check_memory(stage_mem: Sequence[float], config: Config, budget_gb: float) -> None:
    """Every stage within its share of a device's budget (a device runs `chunks` stages),
    the search's constraint."""
    share = budget_gb * GiB / config.chunks
    over = [k for k, mem in enumerate(stage_mem) if mem > share]
    if over:
        k = max(over, key=stage_mem.__getitem__)
        of = f" (1/{config.chunks} of {budget_gb} GB: a device runs {config.chunks} stages)"
        raise PlanError(
            f"price: the plan does not fit {budget_gb} GB per device: stage {k} needs "
            f"{stage_mem[k] / GiB:.3f} GiB of {share / GiB:.3f} GiB"
            + (of if config.chunks > 1 else "")
            + "; recompute, shard with ZeRO, use more micro-batches or more pipeline stages"
        )
