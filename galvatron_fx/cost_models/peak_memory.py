"""Peak memory of one rank over a training step, from per-unit terms.

Gradients and activations do not peak together: activations are freed as backward walks back
through the units while gradients pile up. Measured on gloo ranks (`runtime/memory_probe.py`)
the peak is one of three moments, so the model takes the largest of them:

    S      = sum_u state_u                       (parameters and optimizer states, kept)
    during = max_u [ sum_{v<u} kept_v + live_u + sum_{v>u} grad_v + flight_{next(u)} ]
                                                 (u's backward: earlier units' activations,
                                                  u's own rebuilt activations, transients and
                                                  gathered parameters, later units' gradients,
                                                  the reduce-scatter launched last)
    end    = sum_u grad_u + flight_{first} + end_extra
                                                 (backward done, before the gradient sync ends)
    step   = sum_u steady_grad_u + step_extra    (the optimizer step)
    peak   = S + max(during, end, step)

`state_u`, `grad_u` and the extras follow what the runtime keeps for each ZeRO stage
(`runtime_state`); `kept_u` and `live_u` come from the graph's saved tensors (`planning.plan_memory`).
`flight_u` is the whole gradient a ZeRO-3 unit's reduce-scatter still reads once its backward
is done (`zero3_in_flight`): the runtime keeps one such reduce-scatter in flight, waiting for
it when the next one launches (`collectives._Zero3Use`), so during u's backward only the one
of `next(u)`, the nearest later unit that launched one, is alive, and at the end of backward
only that of `first`, the earliest.
Pure functions on dataclasses: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from galvatron_fx.cost_models.memory import PRECISIONS, Precision
from galvatron_fx.plan import DPMode

__all__ = [
    "PeakMemory",
    "UnitMemory",
    "peak_memory",
    "runtime_state",
    "zero3_in_flight",
    "zero3_live",
]


@dataclass(frozen=True)
class UnitMemory:
    """One unit's memory terms on one rank, in bytes."""

    state_bytes: float
    """Parameters and optimizer states, alive the whole step."""
    kept_bytes: float
    """Activations saved for backward once the unit's forward is done."""
    live_bytes: float
    """Alive while the unit's own backward runs: its saved (or rebuilt) activations, the
    largest transients, ZeRO-3's gathered parameters."""
    grad_bytes: float
    """Gradient memory held from the unit's backward until the gradient sync finishes."""
    steady_grad_bytes: float
    """Gradients still held during the optimizer step."""
    in_flight_bytes: float = 0.0
    """The whole gradient its reduce-scatter still reads after its backward, until the next
    reduce-scatter launches or the gradient sync ends (`zero3_in_flight`)."""


@dataclass(frozen=True)
class PeakMemory:
    peak_bytes: float
    state_bytes: float
    phase: str
    """`backward` (of `unit`), `end of backward` or `optimizer step`."""
    unit: str = ""


def runtime_state(
    params: float,
    dp: int,
    mode: DPMode,
    precision: Precision,
    bucketed: bool,
) -> tuple[float, float, float]:
    """(state, held gradient, steady gradient) bytes of `params` local parameters.

    What the runtime keeps, not the ZeRO paper's idealisation (`memory.model_state_bytes`):
    ZeRO-1/2 step a separate master shard (fp32 only: mixed precision's K already holds it);
    a bucketed gradient exists twice until the sync ends (the autograd gradient and its
    flat bucket); ZeRO-2 also holds the reduce-scattered shard. ZeRO-3 holds the shard only:
    its whole gradient lives during the unit's own backward (`zero3_live`) and, on NCCL, for
    a while after it (`zero3_in_flight`), never until the sync ends."""
    p, g, k = PRECISIONS[precision]
    n = dp if dp > 1 else 1
    mode = mode if dp > 1 else DPMode.ALLREDUCE
    master = 4 if precision == "fp32" else 0
    if mode is DPMode.ALLREDUCE:
        return (p + k) * params, g * params * (2 if bucketed else 1), g * params
    if mode is DPMode.ZERO3:
        return (p + k) * params / n, g * params / n, g * params / n
    state = p * params + (k + master) * params / n
    held = 2 * g * params + (g * params / n if mode is DPMode.ZERO2 else 0.0)
    return state, held, g * params / n


def zero3_in_flight(params: float, dp: int, precision: Precision, gloo: bool) -> float:
    """Bytes of a ZeRO-3 unit's whole gradient still alive once its backward is done: the
    reduce-scatter's input, until the next unit's reduce-scatter launches (the runtime waits
    for the one before it then) or the gradient sync waits for it. On `gloo` none: the
    runtime waits for each reduce-scatter at once (`collectives._overlapped`)."""
    if dp <= 1 or gloo:
        return 0.0
    return PRECISIONS[precision][1] * params


def peak_memory(
    units: Sequence[tuple[str, UnitMemory]], end_extra_bytes: float, step_extra_bytes: float
) -> PeakMemory:
    """The largest of the three moments (module docstring), with where it happens."""
    state = sum(m.state_bytes for _, m in units)
    best, phase, where = 0.0, "backward", ""
    flight = 0.0  # the reduce-scatter launched last, walking backward from the end
    for i in range(len(units) - 1, -1, -1):
        name, m = units[i]
        before = sum(v.kept_bytes for _, v in units[:i])
        after = sum(v.grad_bytes for _, v in units[i + 1 :])
        during = before + m.live_bytes + after + flight
        if during > best:
            best, where = during, name
        flight = m.in_flight_bytes or flight
    end = sum(m.grad_bytes for _, m in units) + flight + end_extra_bytes
    step = sum(m.steady_grad_bytes for _, m in units) + step_extra_bytes
    if end > best:
        best, phase, where = end, "end of backward", ""
    if step > best:
        best, phase, where = step, "optimizer step", ""
    return PeakMemory(state + best, state, phase, where)


def zero3_live(saved: float, params: float, previous_params: float, p: float, dp: int) -> float:
    """Alive during a ZeRO-3 unit's backward: its gathered buffer and the previous unit's
    (the prefetch) throughout; next to them, first the unit's saved activations, then, as
    those are freed, its gradient three times over (the flat buffer the views' gradients
    are summed into, its padded copy for the reduce-scatter, gloo's staging copy of that)
    and the reduce-scatter's output, the 1/dp shard. Measured on gloo ranks
    (`bench/cost_model.py`): the peak is the second moment for a transformer block, with or
    without recomputation."""
    return max(saved, 3 * p * params + p * params / dp) + p * params + p * previous_params
