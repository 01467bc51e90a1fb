"""Stop on a non-finite loss, naming the step and the layer where the first inf or NaN
appeared (`compile(..., check_finite=True)`, `galvatron-fx train --check-finite`).

The check costs nothing until the loss is non-finite: the train step then skips the optimizer
step (the parameters stay those of the last good step, so a checkpoint can still be saved)
and re-runs this step's forward through an `fx.Interpreter` that tests every node's output.
Every rank re-runs the same micro-batches of its own program, so the collectives inside
match; each finds the first unit (in model order) holding a non-finite value on that rank,
and an all-reduce (min) makes every rank name the same one: with data parallelism the
overflow may sit in another rank's slice of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx
from torch.utils import _pytree as pytree

from galvatron_fx.meta import LAYER
from galvatron_fx.runtime import collectives as C

__all__ = ["NonFiniteLossError", "first_nonfinite", "raise_nonfinite"]


class NonFiniteLossError(FloatingPointError):
    """The loss of `step` is inf or NaN; `unit` is the layer where it first appeared."""

    def __init__(self, message: str, step: int, unit: str | None, node: str | None) -> None:
        super().__init__(message)
        self.step, self.unit, self.node = step, unit, node


class _Watch(fx.Interpreter):
    """Runs the graph and stops at the first node whose output holds inf or NaN."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.found: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        # a ZeRO-3 prefetch, issued in the unit before, gathers the next unit's weights:
        # they count where they are used (`zero3_use`)
        skip = n.op in ("placeholder", "output") or _prefetch(n)
        if self.found is None and not skip and _nonfinite(out):
            self.found = n
        return out


def _prefetch(n: fx.Node) -> bool:
    """A ZeRO-3 gather issued ahead, or a flat shard (its node sits where the gather is
    issued): the gathered weights are checked where `zero3_use` hands them to their unit."""
    if n.target is C.zero3_issue:
        return True
    return n.op == "get_attr" and any(u.target is C.zero3_issue for u in n.users)


def _nonfinite(value: Any) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())
        for t in pytree.tree_leaves(value)
    )


def first_nonfinite(
    gm: fx.GraphModule, args: Sequence[Any], kwargs: dict[str, Any]
) -> fx.Node | None:
    """The first node whose output is non-finite when `gm` runs on (args, kwargs), or None.
    Runs the whole graph even after a find: the other ranks run theirs, and the collectives
    inside must pair up."""
    watch = _Watch(gm)
    with torch.no_grad():
        watch.run(*pytree.tree_leaves((tuple(args), kwargs)))
    return watch.found


def first_nonfinite_in(runner: Any, kept: Sequence[tuple[Any, ...]]) -> fx.Node | None:
    """`first_nonfinite` for a pipeline stage: re-run `runner` (a `StageRunner`) on each
    micro-batch's inputs it kept, its stage module run through the watch."""
    found = None
    runner.start_step(runner.batch, len(kept) or 1)
    for values in kept:
        runner.watch = _Watch(runner.stage)
        try:
            with torch.no_grad():
                runner(*values)
        finally:
            hit, runner.watch = runner.watch.found, None
        found = found or hit
    return found


def raise_nonfinite(
    step: int, loss: torch.Tensor, found: fx.Node | None, units: Sequence[str]
) -> None:
    """Agree with every rank on the first unit holding a non-finite value and raise."""
    index = units.index(LAYER.get(found).name) if found is not None else len(units)
    if dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor([index], dtype=torch.int64, device=loss.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        index = int(agreed.item())
    if index == len(units):
        where, unit, node = (
            "no layer's forward output is non-finite (the loss op itself?)",
            None,
            None,
        )
    else:
        unit = units[index]
        node = found.name if found is not None and LAYER.get(found).name == unit else None
        op = ""
        if node and found is not None:
            kind = "parameter" if found.op == "get_attr" else "node"
            op = f", in {kind} {node!r} ({found.target})"
        where = f"it first appeared in layer {unit!r}{op}"
    raise NonFiniteLossError(
        f"step {step}: the loss is {loss.item()}; {where}. The optimizer step was skipped: "
        "the parameters are those of the step before. Lower the learning rate, check the "
        "data of this step, or use fp32 for that layer",
        step,
        unit,
        node,
    )
