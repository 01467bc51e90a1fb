"""Fitting measured collective times to the alpha-beta model, by least squares.

t = latency + size * factor(n) / bus_bandwidth is linear in x = size * factor(n): the
intercept is the latency, the slope 1 / bus bandwidth. Sizes span five orders of magnitude,
so the fit weighs each point by 1 / t (relative errors): otherwise the largest messages
decide the latency alone. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from galvatron_fx.cost_models.communication import BUS_FACTOR, n

__all__ = ["AlphaBeta", "fit_alpha_beta"]


@dataclass(frozen=True)
class AlphaBeta:
    latency_s: float
    bus_bandwidth_bytes_per_s: float
    relative_error: float
    """Median |fit - measured| / measured over the points."""


def fit_alpha_beta(
    kind: str, group_size: int, sizes: Sequence[float], times_s: Sequence[float]
) -> AlphaBeta:
    """Least-squares alpha-beta fit of one collective kind on one group size."""
    if len(sizes) < 2 or len(sizes) != len(times_s):
        raise ValueError("fit_alpha_beta needs two or more (size, time) points")
    factor = float(BUS_FACTOR[kind].subs(n, group_size))
    x = np.asarray(sizes, dtype=float) * factor
    t = np.asarray(times_s, dtype=float)
    slope, latency = np.polyfit(x, t, 1, w=1.0 / t)
    slope = max(float(slope), 1e-18)  # a flat line would mean infinite bandwidth
    latency = max(float(latency), 0.0)
    predicted = latency + x * slope
    error = float(np.median(np.abs(predicted - t) / t))
    return AlphaBeta(latency, 1.0 / slope, error)
