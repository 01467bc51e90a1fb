"""`CompiledModel`: one rank's program, its gradient sync and optimizer, and a train step.

Inputs are given whole (the global batch, the same on every rank); each rank keeps its
slice, so a test or a single-machine script feeds every rank alike. `full_params()` and
`full_grads()` reassemble whole tensors from the pieces (collectives: call on every rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx
from torch.distributed.tensor import Partial, Shard
from torch.utils import _pytree as pytree

from galvatron_fx.meta import LAYER, PLACEMENT
from galvatron_fx.plan import Plan
from galvatron_fx.runtime.collectives import (
    GROUPS,
    GroupRef,
    counting,
    global_count,
    whole_inputs,
    zero3_saved_tensors,
)
from galvatron_fx.runtime.data_parallel import GradSync
from galvatron_fx.runtime.finite import first_nonfinite, raise_nonfinite
from galvatron_fx.runtime.mesh import Mesh
from galvatron_fx.runtime.whole_state import WholeState

__all__ = [
    "CompiledModel",
    "InputSlice",
    "LossFn",
    "input_slices",
    "loss_reduction",
    "micro_batch",
    "slice_batch",
]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class InputSlice:
    dp_group: GroupRef | None
    """Split the batch (dim 0) across this group; None: every rank takes the whole input."""


class CompiledModel(WholeState):
    """The per-rank module (`.module`), its `.plan` and `.graph`, and `train_step`."""

    check_finite = False
    """Stop with `NonFiniteLossError` (step and layer) on an inf or NaN loss (`finite.py`)."""

    def __init__(
        self,
        module: fx.GraphModule,
        plan: Plan,
        params: dict[str, Any],
        sync: GradSync,
        loss_fn: LossFn | None,
        rank: int,
    ) -> None:
        self.module, self.plan, self.params, self.sync = module, plan, params, sync
        self.loss_fn, self.rank = loss_fn, rank
        self.inputs = input_slices(module, plan, rank)
        self.zero3 = any(spec.zero3_flat for spec in params.values())
        """Only ZeRO-3 needs the saved-tensor hooks (a Python call per saved tensor)."""
        self.loss_group, self.loss_avg = loss_reduction(module, plan, rank)
        self.micro_batches = plan.pipeline.micro_batches if plan.pipeline.degree == 1 else 1
        """Gradient accumulation: the module was captured at 1/micro_batches of the batch."""
        self.steps = 0
        """train_step calls so far (the step a non-finite loss names)."""
        self.counts_targets = counts_targets(module)
        """The loss is a sum over one counted-target denominator (`train_step`)."""

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.sync.optimizer

    def local_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """This rank's slice of whole inputs."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if len(leaves) != len(self.inputs):
            raise ValueError(
                f"train_step got {len(leaves)} input tensors, the compiled model takes "
                f"{len(self.inputs)} (the example inputs' structure)"
            )
        local = [
            slice_batch(x, s.dp_group, self.rank) for x, s in zip(leaves, self.inputs, strict=True)
        ]
        return pytree.tree_unflatten(local, spec)

    def forward_loss(self, *args: Any, target: Any = None, **kwargs: Any) -> torch.Tensor:
        """This rank's loss, scaled so that summing gradients over ranks gives the mean."""
        largs, lkwargs = self.local_inputs(args, kwargs)
        with (
            zero3_saved_tensors() if self.zero3 else contextlib.nullcontext(),
            whole_inputs([*args, *kwargs.values()]),
        ):
            out = self.module(*largs, **lkwargs)
        loss = self._loss(out, target)
        return loss / self.loss_group.size if self.loss_avg else loss

    def train_step(self, *args: Any, target: Any = None, **kwargs: Any) -> torch.Tensor:
        """Forward, backward, gradient sync and optimizer step on the whole batch (in the
        plan's micro-batches, gradients accumulated, when it has several); returns the loss
        of the whole batch (the same on every rank).

        A mean loss over counted targets (cross-entropy with `ignore_index`, split over
        ranks: `collectives.global_count`) stays exact across micro-batches: each
        micro-batch's backward is weighed by its count and the summed gradients divided by
        the batch's, since a mean of micro-batch means is not the batch's mean when padding
        falls unevenly."""
        self.sync.zero_grad()
        m = self.micro_batches
        weighed = m > 1 and self.counts_targets
        total: torch.Tensor | None = None
        counted: torch.Tensor | None = None
        for i in range(m):
            margs, mtarget, mkwargs = (micro_batch(x, m, i) for x in (args, target, kwargs))
            with counting() as counts:
                loss = self.forward_loss(*margs, target=mtarget, **mkwargs)
            if weighed:  # the micro-batch's share of the sum; divided by the count below
                loss = loss * counts[-1]
                counted = counts[-1] if counted is None else counted + counts[-1]
            elif m > 1:
                loss = loss / m
            total = loss.detach().clone() if total is None else total + loss.detach()
            if i == m - 1:
                total = total / counted if counted is not None else total
                reported, work = self._global(total)  # overlaps the last backward
            loss.backward()
        self.sync.finish()
        if counted is not None:
            self.sync.scale_grads(1.0 / counted)
        self.steps += 1
        if self.check_finite:  # decide before the update, so a bad step changes nothing
            if work is not None:
                work.wait()
                work = None
            if not bool(reported.isfinite()):
                self._stop_nonfinite(reported, args, target, kwargs)
        self.sync.step()
        if work is not None:
            work.wait()
        return reported

    def _stop_nonfinite(self, loss: torch.Tensor, args: Any, target: Any, kwargs: Any) -> None:
        m, found = self.micro_batches, None
        for i in range(m):  # every micro-batch on every rank: the collectives pair up
            margs, mkwargs = micro_batch(args, m, i), micro_batch(kwargs, m, i)
            with whole_inputs([*margs, *mkwargs.values()]):
                hit = first_nonfinite(self.module, *self.local_inputs(margs, mkwargs))
            found = found or hit
        raise_nonfinite(self.steps, loss, found, self.plan.units)

    def _loss(self, out: Any, target: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            t = slice_batch(target, self.loss_group, self.rank) if target is not None else None
            return self.loss_fn(out, t)
        loss = _find_loss(out)
        if loss is None:
            raise ValueError(
                "the model returns no scalar loss (no `loss` field, not a scalar); pass "
                "loss_fn=(output, target) -> loss to galvatron_fx.compile"
            )
        return loss

    def _global(self, loss: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The whole batch's loss: the sum of the ranks' (already scaled) losses, reduced
        asynchronously; wait for the returned work before reading it."""
        if self.loss_group.size == 1:
            return loss, None
        group = GROUPS.groups[tuple(sorted(self.loss_group.ranks))]
        return loss, dist.all_reduce(loss, group=group, async_op=True)

    # whole tensors -----------------------------------------------------------------------

    def state_parts(self) -> tuple[Any, GradSync, dict[str, Any], int]:
        return (self.module, self.sync, self.params, self.rank)


def counts_targets(gm: fx.GraphModule) -> bool:
    """The program's loss divides by exactly one `global_count` (a mean over counted targets
    of a batch split across ranks)."""
    graphs = [m.graph for m in gm.modules() if isinstance(m, fx.GraphModule)]
    return sum(n.target is global_count for g in graphs for n in g.nodes) == 1


def micro_batch(x: Any, micro_batches: int, i: int) -> Any:
    """The i-th of `micro_batches` equal pieces (dim 0) of every tensor in `x` (scalars and
    non-tensors whole): how inputs are cut for gradient accumulation and pipelines."""
    if micro_batches == 1:
        return x
    return pytree.tree_map(lambda t: _piece(t, micro_batches, i), x)


def _piece(x: Any, micro_batches: int, i: int) -> Any:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    if x.shape[0] % micro_batches:
        raise ValueError(
            f"a batch of {x.shape[0]} does not split into {micro_batches} micro-batches"
        )
    return x.chunk(micro_batches)[i]


def slice_batch(x: Any, group: GroupRef | None, rank: int) -> Any:
    if not isinstance(x, torch.Tensor) or group is None or group.size == 1:
        return x
    return x.chunk(group.size)[group.index(rank)]


def input_slices(gm: fx.GraphModule, plan: Plan, rank: int) -> list[InputSlice]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            split = PLACEMENT.get(node).dp == Shard(0)
            out.append(InputSlice(_dp_group(node, plan, rank) if split else None))
    return out


def _dp_group(node: fx.Node, plan: Plan, rank: int) -> GroupRef:
    s = plan.strategy(LAYER.get(node).name)
    return GroupRef(Mesh(plan.world_size, s.tp, s.dp, s.tp_consecutive).group("dp", rank))


def loss_reduction(gm: fx.GraphModule, plan: Plan, rank: int) -> tuple[GroupRef, bool]:
    """The dp group the loss is split over and whether ranks' losses average (mean loss)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [x for x in pytree.tree_leaves(out.args[0]) if isinstance(x, fx.Node)]
    for leaf in leaves:
        dp = PLACEMENT.get(leaf).dp
        if isinstance(dp, Partial):
            return _dp_group(leaf, plan, rank), dp.reduce_op == "avg"
    return _dp_group(leaves[0], plan, rank), True


def _find_loss(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.numel() == 1 else None
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        loss = out[0] if out[0].numel() == 1 else None
    return loss
