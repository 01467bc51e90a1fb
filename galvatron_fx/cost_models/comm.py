"""Collectives as data: what the runtime will communicate for a layer under a strategy.

Produced by `galvatron_fx.passes.collective_list` from the very rewrite the runtime runs, and
consumed by the communication cost model: a strategy costs what it really does.
Pure data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Collective", "CollectiveKind", "Phase"]

CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter"]
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
