"""Compute: FLOPs of a training step per unit under recomputation, and roofline time.

A unit's FLOPs come from the graph (`annotate_costs`: forward, and backward as autograd
really runs it, e.g. 2.5x forward for flash attention). Recomputation adds a forward: the
whole unit's (full) or its attention core's (selective, Korthikanti et al. 2022). For a GPT
whose attention backward is 2x its forward, full recomputation of every layer gives
Megatron's count per iteration, 96 B s l h^2 (1 + s / 6h + V / 16 l h) (Narayanan et al. 2021,
appendix) - the tests check exactly that.

Time is a roofline: the larger of FLOPs over the sustained FLOP/s and bytes over memory
bandwidth. The optimizer step is memory-bound: Adam reads parameter, gradient and both
moments and writes back parameter and moments, 7 accesses per element of the states it steps.
Written as sympy expressions, compiled to numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.plan import Recompute

__all__ = [
    "ADAM_STEP",
    "TRAINING_FLOPS",
    "UnitFlops",
    "adam_step_time_s",
    "explain_training_flops",
    "roofline_time_s",
    "training_flops",
]

fwd, bwd, attn = sympy.symbols("fwd_flops bwd_flops attention_fwd_flops", nonnegative=True)
flops, nbytes, peak, bandwidth, efficiency = sympy.symbols(
    "flops bytes peak_flops memory_bandwidth efficiency", positive=True
)

TRAINING_FLOPS: dict[Recompute, sympy.Expr] = {
    Recompute.NONE: fwd + bwd,
    Recompute.SELECTIVE: fwd + bwd + attn,
    Recompute.FULL: 2 * fwd + bwd,
}
"""FLOPs of one unit in one training step, by recomputation mode."""

ROOFLINE: sympy.Expr = sympy.Max(flops / (peak * efficiency), nbytes / bandwidth)

elems, state_bytes = sympy.symbols("stepped_elements state_bytes", nonnegative=True)
ADAM_STEP: sympy.Expr = 7 * elems * state_bytes / bandwidth
"""Seconds of an Adam step over `stepped_elements` held at `state_bytes` each."""

_TRAINING: dict[Recompute, Callable[..., Any]] = {
    mode: sympy.lambdify((fwd, bwd, attn), e, "numpy") for mode, e in TRAINING_FLOPS.items()
}
_ADAM = sympy.lambdify((elems, state_bytes, bandwidth), ADAM_STEP, "numpy")
_ROOFLINE = sympy.lambdify((flops, nbytes, peak, bandwidth, efficiency), ROOFLINE, "numpy")


@dataclass(frozen=True)
class UnitFlops:
    """A unit's FLOPs at the captured shapes."""

    fwd_flops: float
    bwd_flops: float
    attention_fwd_flops: float = 0.0
    """Forward FLOPs of the attention cores (what selective recomputation repeats)."""


def training_flops(unit: UnitFlops, recompute: Recompute | str = Recompute.NONE) -> float:
    f = _TRAINING[Recompute(recompute)]
    return float(f(unit.fwd_flops, unit.bwd_flops, unit.attention_fwd_flops))


def roofline_time_s(
    flops_: Any, bytes_: Any, cluster: ClusterSpec, dtype: str = "bf16", efficiency: float = 1.0
) -> Any:
    """Seconds on one device of `cluster` (numpy-broadcast); `efficiency` scales the peak."""
    if dtype not in cluster.peak_flops:
        raise ValueError(f"cluster {cluster.name!r} has no peak FLOP/s for {dtype!r}")
    return _ROOFLINE(
        np.asarray(flops_, dtype=float),
        np.asarray(bytes_, dtype=float),
        cluster.peak_flops[dtype],
        cluster.memory_bandwidth_bytes_per_s,
        efficiency,
    )


def adam_step_time_s(elems_: Any, cluster: ClusterSpec, state_bytes_: int = 4) -> Any:
    """Seconds of one Adam step over `elems_` elements (numpy-broadcast)."""
    return _ADAM(
        np.asarray(elems_, dtype=float), state_bytes_, cluster.memory_bandwidth_bytes_per_s
    )


def explain_training_flops(unit: UnitFlops, recompute: Recompute | str = Recompute.NONE) -> str:
    """The FLOPs formula of this recomputation mode, with the unit's numbers, and its value."""
    expr = TRAINING_FLOPS[Recompute(recompute)]
    values = {fwd: unit.fwd_flops, bwd: unit.bwd_flops, attn: unit.attention_fwd_flops}
    return (
        f"training FLOPs (recompute={Recompute(recompute).value}): {expr}\n"
        f"  with fwd = {unit.fwd_flops:g}, bwd = {unit.bwd_flops:g}, "
        f"attention fwd = {unit.attention_fwd_flops:g} (whole unit, before splitting)\n"
        f"  = {float(expr.subs(values)):.6g} FLOPs"
    )
