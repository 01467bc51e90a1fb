"""Model-state memory per device: parameters, gradients and optimizer states under ZeRO.

With Psi parameters on a data-parallel group of N devices (ZeRO, Rajbhandari et al. 2020,
section 3 and Figure 1): mixed-precision Adam keeps bf16/fp16 parameters and gradients
(2 + 2 bytes per parameter) and K = 12 bytes of optimizer state (fp32 master weights,
momentum and variance); plain fp32 Adam keeps 4 + 4 bytes and K = 8.

| stage | per device |
|---|---|
| plain DP | (2 + 2 + K) Psi |
| ZeRO-1 | 2 Psi + 2 Psi + K Psi / N |
| ZeRO-2 | 2 Psi + (2 + K) Psi / N |
| ZeRO-3 | (2 + 2 + K) Psi / N |

Written once as sympy expressions, compiled to numpy for the search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import sympy

from galvatron_fx.plan import DPMode

__all__ = ["MODEL_STATES", "PRECISIONS", "ModelStates", "explain_model_states", "model_state_bytes"]

Precision = Literal["mixed", "fp32"]

psi, N = sympy.symbols("psi N", positive=True)

PRECISIONS: dict[str, tuple[int, int, int]] = {"mixed": (2, 2, 12), "fp32": (4, 4, 8)}
"""Bytes per parameter of (parameters, gradients, optimizer states) with Adam."""


def _forms(p: int, g: int, k: int) -> dict[DPMode, tuple[sympy.Expr, sympy.Expr, sympy.Expr]]:
    return {
        DPMode.ALLREDUCE: (p * psi, g * psi, k * psi),
        DPMode.ZERO1: (p * psi, g * psi, k * psi / N),
        DPMode.ZERO2: (p * psi, g * psi / N, k * psi / N),
        DPMode.ZERO3: (p * psi / N, g * psi / N, k * psi / N),
    }


MODEL_STATES: dict[tuple[str, DPMode], tuple[sympy.Expr, sympy.Expr, sympy.Expr]] = {
    (precision, mode): forms
    for precision, sizes in PRECISIONS.items()
    for mode, forms in _forms(*sizes).items()
}
"""(precision, dp mode) -> bytes of (parameters, gradients, optimizer states) per device."""

_COMPILED: dict[tuple[str, DPMode], Callable[..., Any]] = {
    key: sympy.lambdify((psi, N), sympy.Matrix(exprs), "numpy")
    for key, exprs in MODEL_STATES.items()
}


@dataclass(frozen=True)
class ModelStates:
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def model_state_bytes(
    params: float, dp: int, mode: DPMode | str, precision: Precision = "mixed"
) -> ModelStates:
    """Per-device model-state bytes of `params` parameters on a dp group of `dp` devices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    values = np.asarray(_COMPILED[(precision, DPMode(mode))](params, dp), dtype=float)
    p, g, o = values.reshape(3)
    return ModelStates(float(p), float(g), float(o))


def explain_model_states(
    params: float, dp: int, mode: DPMode | str, precision: Precision = "mixed"
) -> str:
    """The model-state formula of this ZeRO stage, with the numbers, and its value."""
    exprs = MODEL_STATES[(precision, DPMode(mode))]
    total = sum(exprs, sympy.Integer(0))
    value = float(total.subs({psi: params, N: dp}))
    return (
        f"model states ({DPMode(mode).value}, {precision}): bytes = {total}\n"
        f"  with psi = {params:g} parameters, N = {dp}\n"
        f"  = {value:.6g} bytes ({value / 2**20:.1f} MiB)"
    )
