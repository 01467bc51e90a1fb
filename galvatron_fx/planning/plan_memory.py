"""Memory terms of every unit under a plan, on one rank, from the rewritten graph.

Reads the saved tensors `annotate_costs` recorded (`NodeCost.saved`: producer and bytes of
each storage autograd keeps) and the rewritten graph's local `val`s; writes nothing. Each
saved storage is scaled by its *producer's* local size on this rank, as the saving node
receives it: a column-parallel linear saves its replicated input whole, not 1/tp of it, and
under sequence parallelism the gathered input, not the rank's slice of the sequence.

- kept activations: everything saved (no recomputation); the unit's inputs (full); with
  selective recomputation, what the attention core saves minus what survives anyway (its
  inputs, and tensors another node saves too);
- alive during the unit's own backward: all of its saved activations (rebuilt when
  recomputed), and under ZeRO-3 the gathered parameters and the whole gradient
  (`zero3_live`). A unit without parameters (the loss) also holds twice its largest value
  while every saved tensor is still alive: the logits' gradient next to the log-softmax's.
  Units with parameters free saved tensors as their gradients appear, so measured peaks
  show no such term for them (`bench/cost_model.py`);
- the state and gradient terms of `cost_models.peak_memory.runtime_state`, and ZeRO-3's
  whole gradient in flight after the unit's backward (`zero3_in_flight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from galvatron_fx.cost_models.memory import PRECISIONS, Precision
from galvatron_fx.cost_models.peak_memory import (
    PeakMemory,
    UnitMemory,
    peak_memory,
    runtime_state,
    zero3_in_flight,
    zero3_live,
)
from galvatron_fx.meta import COST
from galvatron_fx.plan import DPMode, LayerStrategy, Plan, Recompute
from galvatron_fx.runtime import collectives as C

__all__ = [
    "UnitMemoryInputs",
    "is_collective",
    "local_ratios",
    "plan_peak_memory",
    "saved_bytes",
    "unit_memory",
]

_FIRST_BUCKET_BYTES = 2**20


@dataclass(frozen=True)
class UnitMemoryInputs:
    """What `unit_memory` reads off one unit of the rewritten graph."""

    all_saved_bytes: float
    kept_bytes: float
    largest_value_bytes: float
    local_params: int
    largest_param: int


def is_collective(node: fx.Node) -> bool:
    """A runtime collective the rewrite inserted."""
    return getattr(node.target, "__module__", "") == C.__name__


def _numel(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() if isinstance(val, torch.Tensor) else 0


def local_ratios(original: fx.Graph, rewritten: fx.Graph) -> dict[str, float]:
    """Per node name: local elements on this rank over the captured (global) elements."""
    whole = {n.name: _numel(n) for n in original.nodes}
    return {
        n.name: _numel(n) / whole[n.name]
        for n in rewritten.nodes
        if whole.get(n.name) and _numel(n)
    }


def saved_bytes(
    nodes: Sequence[fx.Node], ratio: dict[str, float], cores: set[str], s: LayerStrategy
) -> tuple[float, float]:
    """(all saved, kept under `s.recompute` other than full) local bytes of a unit's nodes."""
    total = kept = 0.0
    for node in nodes:
        if not COST.has(node):
            continue
        own = _own_ratio(node, ratio)
        for producer, nbytes, shared in COST.get(node).saved:
            local = nbytes * (_fed_ratio(node, producer, ratio) if producer else own)
            total += local
            in_core = node.name in cores and (producer == "" or producer in cores)
            if not (s.recompute is Recompute.SELECTIVE and in_core and not shared):
                kept += local
    return total, kept


def _fed_ratio(node: fx.Node, producer: str, ratio: dict[str, float]) -> float:
    """How the producer's value shrinks as this node receives it: the rewrite may put a
    collective between them (sequence parallelism gathers a layer norm's output whole before
    a column-parallel linear, which saves the gathered tensor)."""
    for a in node.all_input_nodes:
        if a.name == producer:
            break
        source = next((x for x in a.all_input_nodes if x.name == producer), None)
        if is_collective(a) and source is not None and _numel(source) and producer in ratio:
            return ratio[producer] * _numel(a) / _numel(source)
    return ratio.get(producer, 1.0)


def _own_ratio(node: fx.Node, ratio: dict[str, float]) -> float:
    """How an op's internal tensors shrink: as its output, or for a scalar output (a loss)
    as its first input that shrinks."""
    if node.name in ratio and _numel(node) > 1:
        return ratio[node.name]
    return next((ratio[a.name] for a in node.all_input_nodes if a.name in ratio), 1.0)


def unit_memory(
    m: UnitMemoryInputs,
    s: LayerStrategy,
    precision: Precision,
    previous_params: int,
    gloo: bool = False,
) -> UnitMemory:
    """One unit's terms (module docstring); `previous_params`: the unit before it, for the
    ZeRO-3 prefetch; `gloo`: collectives the runtime waits for at once."""
    n = s.state_dp
    state, held, steady = runtime_state(m.local_params, n, s.dp_mode, precision, n > 1)
    live = m.all_saved_bytes + (2 * m.largest_value_bytes if m.local_params == 0 else 0.0)
    flight = 0.0
    if n > 1 and s.dp_mode is DPMode.ZERO3:
        p = PRECISIONS[precision][0]
        live = zero3_live(live, m.local_params, previous_params, p, n)
        flight = zero3_in_flight(m.local_params, n, precision, gloo)
    return UnitMemory(state, m.kept_bytes, live, held, steady, flight)


def plan_peak_memory(
    plan: Plan,
    units: Sequence[tuple[str, UnitMemory, UnitMemoryInputs]],
    precision: Precision,
    *,
    gloo: bool,
    bucket_mb: float = 25.0,
) -> PeakMemory:
    """The rank's peak over a step. Gradient buckets: the sync copies gradients into flat
    buckets of up to `bucket_mb` (the first one 1 MiB); gloo stages a ZeRO-2 reduce-scatter's
    whole input and a ZeRO-1/2 all-gather's output, NCCL does not."""
    g = PRECISIONS[precision][1]
    synced = sum(g * i.local_params for u, _, i in units if plan.strategy(u).state_dp > 1)
    bucket = min(bucket_mb * 2**20, max(synced - _FIRST_BUCKET_BYTES, 0.0))
    end_extra = 0.0
    sharded_step = False
    for unit, _, inputs in units:
        s = plan.strategy(unit)
        if s.state_dp == 1:
            continue
        if s.dp_mode is DPMode.ZERO1:
            end_extra += g * inputs.local_params / s.state_dp
        sharded_step |= s.dp_mode in (DPMode.ZERO1, DPMode.ZERO2)
    if gloo and any(plan.strategy(u).dp_mode is DPMode.ZERO2 for u, _, _ in units):
        end_extra += bucket
    largest = max((i.largest_param for _, _, i in units), default=0)
    staging = 2 if gloo else 1
    step_extra = max(2 * g * largest, staging * bucket if sharded_step else 0.0)
    return peak_memory([(u, m) for u, m, _ in units], end_extra, step_extra)
