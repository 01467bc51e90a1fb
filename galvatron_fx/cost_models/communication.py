"""Collective time: the alpha-beta model with nccl-tests' bus-bandwidth factors.

    time = latency + size * factor(n) / bus_bandwidth

with factor 2(n-1)/n for all-reduce and (n-1)/n for all-gather, reduce-scatter and
all-to-all (nccl-tests PERFORMANCE.md: these factors turn a collective's algorithm bandwidth
into the bus bandwidth a link sustains, the same for every kind), 1 for point-to-point.
Each formula is written once as a sympy expression and compiled to numpy, so the search can
price every candidate at once and `explain` can print it with its numbers substituted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from galvatron_fx.cost_models.hardware import ClusterSpec, Link
from galvatron_fx.cost_models.traffic import Collective
from galvatron_fx.plan import LayerStrategy

__all__ = [
    "BUS_FACTOR",
    "TIME",
    "CommTime",
    "collective_time_s",
    "collectives_time",
    "explain",
    "group_spans_nodes",
    "spans_nodes",
]

n, size_bytes, latency_s, bus_bw = sympy.symbols(
    "n size_bytes latency_s bus_bandwidth_bytes_per_s", positive=True
)

BUS_FACTOR: dict[str, sympy.Expr] = {
    "all_reduce": 2 * (n - 1) / n,
    "all_gather": (n - 1) / n,
    "reduce_scatter": (n - 1) / n,
    "all_to_all": (n - 1) / n,
    "p2p": sympy.Integer(1),
}
"""nccl-tests' bus factor per collective kind on n ranks."""

TIME: dict[str, sympy.Expr] = {
    k: latency_s + size_bytes * f / bus_bw for k, f in BUS_FACTOR.items()
}
"""Seconds for one collective of `size_bytes` (the whole buffer) on n ranks."""

_COMPILED: dict[str, Callable[..., Any]] = {
    k: sympy.lambdify((n, size_bytes, latency_s, bus_bw), e, "numpy") for k, e in TIME.items()
}


def collective_time_s(kind: str, size: Any, group_size: Any, link: Link) -> Any:
    """Seconds (numpy-broadcast over arrays of sizes / group sizes); 0 on one rank."""
    group = np.asarray(group_size)
    sizes = np.asarray(size, dtype=float)
    t = _COMPILED[kind](group, sizes, link.latency_s, link.bus_bandwidth_bytes_per_s)
    return np.where(group > 1, t, 0.0) if isinstance(t, np.ndarray) else (t if group > 1 else 0.0)


def explain(kind: str, size: float, group_size: int, link: Link) -> str:
    """The formula, then with this collective's numbers, then its value."""
    values = {
        n: group_size,
        size_bytes: size,
        latency_s: link.latency_s,
        bus_bw: link.bus_bandwidth_bytes_per_s,
    }
    expr = TIME[kind]
    return (
        f"{kind}: t = {expr}\n"
        f"  = {link.latency_s:g} + {size:g} * {BUS_FACTOR[kind].subs(n, group_size)} / "
        f"{link.bus_bandwidth_bytes_per_s:g}\n"
        f"  = {float(expr.subs(values)):.6g} s"
    )


def group_spans_nodes(group_size: int, stride: int, devices_per_node: int) -> bool:
    """Whether ranks r, r + stride, ..., r + (group_size - 1) * stride can leave one node
    (groups start at node-aligned ranks in our meshes)."""
    return (group_size - 1) * stride + 1 > devices_per_node


@dataclass(frozen=True)
class CommTime:
    total_s: float
    """Every collective's time, one after the other."""
    exposed_s: float
    """What the step waits for: in-line collectives, plus the part of overlappable ones
    that the compute beside them does not hide."""


def collectives_time(
    collectives: Sequence[Collective],
    cluster: ClusterSpec,
    spans_nodes: Callable[[int], bool],
    compute_s: Mapping[str, float] | None = None,
) -> CommTime:
    """Price a list of collectives; `spans_nodes(group_size)` says whether a group of that
    size leaves a node (the caller knows the mesh). Overlap as it happens: the asynchronous
    collectives of a phase (ZeRO-3's prefetched gathers and reduce-scatters, the bucketed
    gradient sync) run beside that phase's compute, `compute_s[phase]` seconds of it, and
    hide at most that long:

        exposed = in-line + sum_phase [ async_phase - overlap * min(async_phase, compute_phase) ]

    In-line collectives (tensor parallelism's, which the runtime waits for where their
    result is used) hide behind nothing; without `compute_s` nothing is hidden."""
    total = inline = 0.0
    asynchronous: dict[str, float] = {}
    for c in collectives:
        link = cluster.link(c.kind, c.group_size, spans_nodes(c.group_size))
        t = float(collective_time_s(c.kind, c.size_bytes, c.group_size, link))
        total += t
        if c.overlappable:
            asynchronous[c.phase] = asynchronous.get(c.phase, 0.0) + t
        else:
            inline += t
    windows = compute_s or {}
    hidden = sum(
        cluster.overlap * min(t, max(windows.get(phase, 0.0), 0.0))
        for phase, t in asynchronous.items()
    )
    return CommTime(total, total - hidden)


def spans_nodes(s: LayerStrategy, cluster: ClusterSpec) -> Callable[[int], bool]:
    """Whether a group of a given size leaves a node, on this unit's mesh."""

    def spans(size: int) -> bool:
        if size == s.devices:  # the whole stage (Ulysses' weights): consecutive ranks
            return group_spans_nodes(size, 1, cluster.devices_per_node)
        if size == s.tp:
            stride = 1 if s.tp_consecutive else s.dp
        else:
            stride = s.tp if s.tp_consecutive else 1
        return group_spans_nodes(size, stride, cluster.devices_per_node)

    return spans
