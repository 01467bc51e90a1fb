"""Collectives as data: what the runtime will communicate for a layer under a strategy.

Produced by `galvatron_fx.planning.collective_list` from the very rewrite the runtime runs, and
consumed by the communication cost model: a strategy costs what it really does.
Pure data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from galvatron_fx.plan import DPMode

__all__ = ["Collective", "CollectiveKind", "Phase", "grad_sync", "tp_grad_sum"]

CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all"]
Phase = Literal["forward", "backward", "step"]


@dataclass(frozen=True)
class Collective:
    """One collective call on one rank."""

    kind: CollectiveKind
    size_bytes: float
    """The whole buffer (nccl-tests' size): the reduced tensor of an all-reduce, the output of
    an all-gather, the input of a reduce-scatter."""
    group_size: int
    phase: Phase
    """`forward` and `backward` run inside the step's compute; `step` after backward (ZeRO-1/2
    parameter all-gather)."""
    overlappable: bool
    """Launched asynchronously (bucketed gradient sync) rather than waited for in line."""
    unit: str
    """The layer or segment that issues it."""
    source: str
    """What inserted it: the graph op (`tp_copy`, `zero3_gather`, `switch_layout`, ...) or
    `grad_sync`."""


def grad_sync(
    unit: str, size_bytes: float, padded_bytes: float, dp: int, mode: DPMode
) -> list[Collective]:
    """What `runtime.data_parallel.GradSync` runs for gradients of `size_bytes`
    (`padded_bytes` once padded to split `dp` ways) outside ZeRO-3, whose gather's backward
    already reduce-scatters: plain DP and ZeRO-1 all-reduce, ZeRO-2 reduce-scatters, and
    ZeRO-1/2 all-gather the stepped shards after the optimizer step."""
    if dp == 1:
        return []
    if mode is DPMode.ZERO2:
        out = [Collective("reduce_scatter", padded_bytes, dp, "backward", True, unit, "grad_sync")]
    else:
        out = [Collective("all_reduce", size_bytes, dp, "backward", True, unit, "grad_sync")]
    if mode in (DPMode.ZERO1, DPMode.ZERO2):
        out.append(Collective("all_gather", padded_bytes, dp, "step", False, unit, "grad_sync"))
    return out


def tp_grad_sum(unit: str, size_bytes: float, tp: int, zero3: bool) -> Collective:
    """Gradients that are partial sums over the TP group (sequence-parallel norms and
    biases): all-reduced there, in line with ZeRO-3's shards, bucketed otherwise."""
    return Collective("all_reduce", size_bytes, tp, "backward", not zero3, unit, "grad_sync_tp")
