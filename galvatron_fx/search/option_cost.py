"""What one unit costs under one candidate strategy, at any micro-batch size, for the search.

The graph's part comes in as `UnitTerms`: read once per distinct layer from the compiler's
own rewrite at one tensor-parallel layout (tp, sp, vocab) and dp = 1, at the captured batch
(`planning/model_terms.py`). Everything the batch split changes is proportional to the local
batch: the roofline of a node whose FLOPs and bytes both shrink by 1/dp shrinks by 1/dp, saved
activations and the tensor-parallel collectives too (`planning.price` divides each node the same
way, so at equal batch the two agree; the tests check it). What data parallelism adds is
priced from the unit's parameters, with the same rules as `planning.collective_list` and
`planning.plan_memory.unit_memory`.

Per micro-batch of `b` samples on a stage holding `a` micro-batches in flight:

    time_mb   = (fwd + bwd + recompute)(b) + ops * op_overhead     (kernel work x b / b_ref,
                                                                    at least its floors)
                + exposed(TP/SP collectives * b / b_ref, ZeRO-3 gathers and reduce-scatters)
    step      = exposed(gradient sync) + optimizer step                    (once a step)
    state     = parameters, optimizer states, held gradients (`runtime_state`), and
                ZeRO-3's whole gradient in flight beyond what the unit's act frees
    act       = activations kept for backward                              (x a on the stage)
    transient = what the unit's own backward adds on top (rebuilt activations, ZeRO-3's
                gathered parameters) or the optimizer step's largest parameter buffer

`exposed` hides each phase's asynchronous collectives behind that phase's compute, at most
as long as it lasts (`communication.collectives_time`).

A stage's memory is `sum(state + a * act) + max(transient)`: an upper bound of the
three-moment peak of `cost_models/peak_memory.py` (a unit's backward holds the earlier units'
activations and the later units' gradients, never more than all of both, and the whole
gradient of one later ZeRO-3 unit, whose own activations are gone by then), so a plan the
search accepts also fits under `plan_peak`. Pure: no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from galvatron_fx.cost_models.communication import (
    collective_time_s,
    collectives_time,
    group_spans_nodes,
    spans_nodes,
)
from galvatron_fx.cost_models.compute import adam_step_time_s
from galvatron_fx.cost_models.efficiency import KernelWork
from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.cost_models.memory import PRECISIONS, Precision
from galvatron_fx.cost_models.peak_memory import runtime_state, zero3_in_flight, zero3_live
from galvatron_fx.cost_models.traffic import Collective, grad_sync, tp_grad_sum
from galvatron_fx.plan import DPMode, LayerStrategy, Recompute

__all__ = [
    "OptionCost",
    "UnitTerms",
    "boundary_bytes",
    "option_cost",
    "p2p_time_s",
    "switch_time_s",
    "with_tied_copy",
]


@dataclass(frozen=True)
class UnitTerms:
    """One unit under one tensor-parallel layout, at dp = 1 and `ref_batch` samples."""

    unit: str
    tp: int
    sp: bool
    vocab_parallel: bool
    ulysses: bool
    ref_batch: int
    fwd_s: float
    """Roofline forward time, launch overhead excluded."""
    bwd_s: float
    recompute_selective_s: float
    recompute_full_s: float
    ops: int
    """Forward ops (backward runs about two per forward op): the launch-overhead count."""
    selective_ops: int
    collectives: tuple[Collective, ...]
    """Tensor-parallel collectives of one micro-batch (proportional to the batch)."""
    tp_grad_sum_bytes: float
    """Gradients summed over the TP group (sequence-parallel norms), once a step."""
    params: int
    """Parameters of this rank's TP piece."""
    param_bytes: int
    """Element size of the graph's parameters (what gradient collectives move)."""
    largest_param: int
    saved_bytes: float
    """Everything the unit saves for backward (no recomputation)."""
    kept_selective_bytes: float
    """What it keeps with selective recomputation."""
    full_kept_bytes: float
    """Full recomputation: the unit's inputs."""
    full_live_bytes: float
    """Full recomputation: inputs plus rebuilt activations, during its backward."""
    largest_value_bytes: float
    boundary_bytes: float
    """The activations it receives from the unit before, whole (no split)."""
    previous_params: int = 0
    """Parameters of the unit before it (ZeRO-3 prefetches them during its backward)."""
    dp_collectives: tuple[Collective, ...] = ()
    """Graph collectives over the data-parallel group (a mean loss's count of targets), at
    dp = 2 and `ref_batch / 2` samples: priced at the strategy's dp and batch."""
    full_recompute_collectives: tuple[Collective, ...] = ()
    """Full recomputation: the forward collectives of `collectives` that backward runs
    again (those before the unit's last tensor saved for backward), in line."""
    work: KernelWork | None = None
    """The unit's kernels at `ref_batch`: another batch scales their work but not their
    floors. None: the times above scale with the batch."""

    def compute_s(self, scale: float) -> tuple[float, float, float, float]:
        """(forward, backward, full and selective recomputation) seconds at `scale` times
        `ref_batch`, launch overhead excluded."""
        if self.work is not None:
            return self.work.at(scale)
        return (
            self.fwd_s * scale,
            self.bwd_s * scale,
            self.recompute_full_s * scale,
            self.recompute_selective_s * scale,
        )


@dataclass(frozen=True)
class OptionCost:
    """One candidate on one unit at one micro-batch size."""

    time_mb_s: float
    step_s: float
    state_bytes: float
    act_bytes: float
    transient_bytes: float


def option_cost(
    t: UnitTerms,
    s: LayerStrategy,
    micro_batch: float,
    cluster: ClusterSpec,
    precision: Precision,
) -> OptionCost:
    """The unit's cost under `s` with `micro_batch` samples on each data-parallel rank."""
    width = _width(t, precision)
    scale = micro_batch / t.ref_batch
    overhead = cluster.op_overhead_s
    fwd_s, bwd_s, full_s, selective_s = t.compute_s(scale)
    forward = fwd_s + t.ops * overhead
    backward = bwd_s + 2 * t.ops * overhead
    if s.recompute is Recompute.FULL:
        backward += full_s + t.ops * overhead
    elif s.recompute is Recompute.SELECTIVE:
        backward += selective_s + t.selective_ops * overhead
    compute = forward + backward
    # asynchronous collectives hide behind the compute beside them: ZeRO-3's prefetch behind
    # a unit's forward (its neighbour's, priced as its own), its reduce-scatter and the
    # bucketed gradient sync behind backward (the last micro-batch's, for the sync)
    beside = {"forward": forward, "backward": backward}
    spans = spans_nodes(s, cluster)
    values = scale * width
    again = t.full_recompute_collectives if s.recompute is Recompute.FULL else ()
    per_mb = [dataclasses.replace(c, size_bytes=c.size_bytes * values) for c in t.collectives]
    per_mb += [dataclasses.replace(c, size_bytes=c.size_bytes * values) for c in again]
    per_mb += _zero3(t, s, width, asynchronous=not cluster.gloo)
    if s.dp > 1:
        per_mb += [
            dataclasses.replace(c, size_bytes=c.size_bytes * 2 * values, group_size=s.dp)
            for c in t.dp_collectives
        ]
    per_step = _grad_sync(t, s, width)
    n = s.state_dp
    stepped = t.params // n if n > 1 and s.dp_mode is not DPMode.ALLREDUCE else t.params
    state_width = 4 if precision == "fp32" else 2
    step = float(adam_step_time_s(stepped, cluster, state_width))
    time_mb = compute + collectives_time(per_mb, cluster, spans, beside).exposed_s
    state, held, _ = runtime_state(t.params, n, s.dp_mode, precision, n > 1)
    kept, live = _activations(t, s, values)
    p, g, _ = PRECISIONS[precision]
    flight = 0.0
    if n > 1 and s.dp_mode is DPMode.ZERO3:
        live = zero3_live(live, t.params, t.previous_params, p, n)
        # its whole gradient, in flight while earlier units run backward (NCCL), when its
        # own activations of that micro-batch are freed: charged where they do not cover it
        flight = max(zero3_in_flight(t.params, n, precision, gloo=False) - kept, 0.0)
    transient = max(live - kept - held, 2 * g * t.largest_param, 0.0)
    return OptionCost(
        time_mb,
        step + collectives_time(per_step, cluster, spans, beside).exposed_s,
        state + held + flight,
        kept,
        transient,
    )


def with_tied_copy(t: UnitTerms, s: LayerStrategy, params: int) -> UnitTerms:
    """`t` also holding its own copy of a tied weight of `params` elements (whole), as a
    unit in another pipeline stage than the weight's first reader does: its parameters,
    gradient, optimizer states, sync and step. The copy is split as the unit stores its
    vocabulary (the tied units share one storage layout)."""
    local = params // s.tp if s.tp > 1 and s.vocab_parallel else params
    return dataclasses.replace(
        t, params=t.params + local, largest_param=max(t.largest_param, local)
    )


def _activations(t: UnitTerms, s: LayerStrategy, scale: float) -> tuple[float, float]:
    """(kept, live during its backward) bytes, as `plan_memory.unit_memory` counts them."""
    extra = 2 * t.largest_value_bytes * scale if t.params == 0 else 0.0
    if s.recompute is Recompute.FULL:
        return t.full_kept_bytes * scale, t.full_live_bytes * scale + extra
    kept = t.kept_selective_bytes if s.recompute is Recompute.SELECTIVE else t.saved_bytes
    return kept * scale, t.saved_bytes * scale + extra


def _width(t: UnitTerms, precision: Precision) -> float:
    """Bytes of a trained value over the graph's: a model captured in fp32 and trained in
    mixed precision moves and saves half of what its graph says (compute times keep the
    graph's bytes: a small overestimate on memory-bound ops)."""
    return PRECISIONS[precision][0] / t.param_bytes


def _zero3(
    t: UnitTerms, s: LayerStrategy, width: float, asynchronous: bool = True
) -> list[Collective]:
    """ZeRO-3 gathers the unit's shard before forward and again in backward, and
    reduce-scatters its gradient: every micro-batch; prefetched and left in flight
    (`asynchronous`) except on gloo, where the runtime waits for each at once."""
    n = s.state_dp
    if n == 1 or s.dp_mode is not DPMode.ZERO3 or t.params == 0:
        return []
    size = -(-t.params // n) * n * t.param_bytes * width
    return [
        Collective("all_gather", size, n, "forward", asynchronous, t.unit, "zero3_issue"),
        Collective("all_gather", size, n, "backward", asynchronous, t.unit, "zero3_use"),
        Collective("reduce_scatter", size, n, "backward", asynchronous, t.unit, "zero3_use"),
    ]


def _grad_sync(t: UnitTerms, s: LayerStrategy, width: float) -> list[Collective]:
    """Once a step, after the last micro-batch's backward (the rules of `comm.grad_sync`)."""
    out: list[Collective] = []
    n = s.state_dp
    zero3 = n > 1 and s.dp_mode is DPMode.ZERO3
    if t.tp_grad_sum_bytes:
        size = t.tp_grad_sum_bytes * width / (n if zero3 else 1)
        out.append(tp_grad_sum(t.unit, size, s.tp, zero3))
    if zero3 or t.params == 0:
        return out
    size = t.params * t.param_bytes * width
    padded = -(-t.params // n) * n * t.param_bytes * width
    return out + grad_sync(t.unit, size, padded, n, s.dp_mode)


def boundary_bytes(t: UnitTerms, micro_batch_samples: float, precision: Precision) -> float:
    """The whole boundary tensor entering a unit, for a micro-batch of that many samples."""
    return t.boundary_bytes * micro_batch_samples / t.ref_batch * _width(t, precision)


def switch_time_s(
    boundary_bytes: float,
    before: LayerStrategy,
    after: LayerStrategy,
    cluster: ClusterSpec,
) -> float:
    """The layout switch between two adjacent units of one stage, for a micro-batch whose
    boundary activations are `boundary_bytes` whole: a dimension split fewer ways after the
    switch is all-gathered in forward, one split more ways is sliced in forward and
    all-gathered in backward (`runtime.collectives.switch_layout`)."""
    total = 0.0
    q_before, q_after = before.seq_split, after.seq_split
    groups_differ = before.tp_consecutive != after.tp_consecutive and before.dp == after.dp
    for x, y in ((before.dp, after.dp), (q_before, q_after)):
        factor = max(x, y) // min(x, y)
        if factor == 1:
            continue
        whole = boundary_bytes / (min(before.dp, after.dp) * min(q_before, q_after))
        stride = after.tp if after.tp_consecutive else 1
        link = cluster.link(
            "all_gather", factor, group_spans_nodes(factor, stride, cluster.devices_per_node)
        )
        total += float(collective_time_s("all_gather", whole, factor, link))
    if groups_differ:  # the same degrees on other ranks: gather whole, keep this rank's part
        total += switch_time_s(boundary_bytes, before, LayerStrategy(dp=1), cluster)
    return total


def p2p_time_s(boundary_bytes: float, first: LayerStrategy, cluster: ClusterSpec) -> float:
    """A stage boundary: activations forward and their gradient backward, each rank sending
    its own part of the boundary tensor."""
    size = boundary_bytes / (first.dp * first.seq_split)
    across = first.devices >= cluster.devices_per_node
    link = cluster.link("p2p", 2, across)
    return 2 * (link.latency_s + size / link.bus_bandwidth_bytes_per_s)
