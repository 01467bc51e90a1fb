"""Data parallelism and ZeRO-1/2 for the per-rank module: bucketed, overlapped gradient sync
and an optimizer that steps only this rank's shard of the states.

Each parameter has its own groups (layers differ in dp degree and mode). Parameters are packed,
in reverse order of first use (roughly the order backward produces their gradients), into
buckets of at most `bucket_mb` per (groups, mode). A post-accumulate-grad hook launches a
bucket's collective (`async_op=True`) as soon as its last gradient lands, so communication
overlaps the rest of backward; `finish()` waits for all of them.

- plain DP: all-reduce the bucket; every rank steps every parameter;
- ZeRO-1: all-reduce, then each rank steps only its 1/dp slice of the bucket (optimizer
  states exist for that slice only) and the updated slices are all-gathered;
- ZeRO-2: reduce-scatter instead of all-reduce: each rank receives only its slice's gradient.
- ZeRO-3 parameters are already sharded in the graph (`passes/zero3.py`): one flat shard per
  layer, whose gradient backward reduce-scatters asynchronously, one in flight at a time
  (`collectives.PENDING`); `finish` waits for the last and the shards are stepped like any
  local parameter.

Parameters replicated on the TP group but computed on its sequence slices
(`grad_sum_tp`) first have their gradient all-reduced over the TP group. A weight tied across
pipeline stages (embedding and head) is held by each of their ranks: its buckets (only such
weights, laid out alike on every holder) are all-reduced over the `stage_group` once the dp
sync is done, as Megatron's embedding group, so every copy steps with the whole gradient.
PyTorch's DDP/FSDP cannot be used here: they assume one dp group for the whole module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galvatron_fx.plan import DPMode
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.collectives import GROUPS, GroupRef

__all__ = ["Bucket", "GradSync", "SyncedParam", "Zero3TPSum"]


@dataclass
class SyncedParam:
    name: str
    param: nn.Parameter
    dp_group: GroupRef
    mode: DPMode
    tp_group: GroupRef | None = None
    """Set when the gradient is a partial sum over the TP group (sequence parallelism)."""
    stage_group: GroupRef | None = None
    """Set for a weight several pipeline ranks hold (tied across stages): the ranks, one
    per holding pipeline rank at this rank's place in the stage, whose gradients sum."""
    backwards: int = 1
    """Backward passes per micro-batch that accumulate into it: this rank's stages holding it."""


@dataclass
class Zero3TPSum:
    """Ranges of a ZeRO-3 flat shard whose gradients are partial sums over `tp_group`."""

    shard: nn.Parameter
    tp_group: GroupRef
    ranges: list[tuple[int, int]]


@dataclass
class Bucket:
    params: list[SyncedParam]
    dp_group: GroupRef
    mode: DPMode
    tp_group: GroupRef | None
    stage_group: GroupRef | None = None
    numel: int = 0
    padded: int = 0
    shard: nn.Parameter | None = None
    """ZeRO-1/2: this rank's slice of the flattened bucket, the optimizer's parameter."""
    ready: dict[int, int] = field(default_factory=dict)
    """How many gradients each parameter (by position) has accumulated this step."""
    launched: bool = False
    work: Any = None
    flat: torch.Tensor | None = None

    @property
    def sharded(self) -> bool:
        return self.mode in (DPMode.ZERO1, DPMode.ZERO2) and self.dp_group.size > 1

    def shard_range(self) -> tuple[int, int]:
        # collectives order pieces by rank within the group
        size = self.padded // self.dp_group.size
        start = sorted(self.dp_group.ranks).index(dist.get_rank()) * size
        return start, start + size


class GradSync:
    """Gradient synchronisation and the optimizer over one rank's parameters."""

    def __init__(
        self,
        params: list[SyncedParam],
        make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        bucket_mb: float = 25.0,
        zero3_tp_sums: list[Zero3TPSum] | None = None,
        accumulations: int = 1,
    ) -> None:
        self.accumulations = accumulations
        """Backward passes per step (a pipeline's micro-batches): a bucket launches once
        all its gradients have accumulated that many times."""
        self.buckets = _pack(params, int(bucket_mb * 2**20), _FIRST_BUCKET_BYTES)
        self.zero3_tp_sums = zero3_tp_sums or []
        synced = {id(p.param) for b in self.buckets for p in b.params}
        local = [p.param for p in params if id(p.param) not in synced and p.param.requires_grad]
        local += [p.param for b in self.buckets if not b.sharded for p in b.params]
        for b in self.buckets:
            if b.sharded:
                b.shard = _make_shard(b)
        shards = [b.shard for b in self.buckets if b.shard is not None]
        self.optimizer = make_optimizer([*local, *shards])
        for i, b in enumerate(self.buckets):
            for j, p in enumerate(b.params):
                p.param.register_post_accumulate_grad_hook(self._hook(i, j))

    def _hook(self, i: int, j: int) -> Callable[[torch.Tensor], None]:
        def on_grad(_: torch.Tensor) -> None:
            b = self.buckets[i]
            b.ready[j] = b.ready.get(j, 0) + 1
            done = len(b.ready) == len(b.params) and all(
                b.ready[k] >= self.accumulations * p.backwards for k, p in enumerate(b.params)
            )
            if done and not b.launched:
                self._launch(b)

        return on_grad

    def _launch(self, b: Bucket) -> None:
        b.launched = True
        flat = torch.empty(b.padded, dtype=b.params[0].param.dtype)
        grads = [p.param.grad for p in b.params]
        assert all(g is not None for g in grads), "a bucket launched before all its gradients"
        torch.cat([g.reshape(-1) for g in grads if g is not None], out=flat[: b.numel])
        flat[b.numel :].zero_()
        if b.tp_group is not None:
            dist.all_reduce(flat, group=_pg(b.tp_group))
        pg = _pg(b.dp_group) if b.dp_group.size > 1 else None
        if pg is None:
            b.work, b.flat = None, flat
        elif b.mode is DPMode.ZERO2:
            out = flat.new_empty(b.padded // b.dp_group.size)
            b.work, b.flat = C.reduce_scatter_flat(out, flat, group=pg, async_op=True), out
        else:
            b.work, b.flat = dist.all_reduce(flat, group=pg, async_op=True), flat

    def finish(self) -> None:
        """Wait for every bucket and put the synced gradients where the optimizer reads them."""
        self._finish_zero3()
        for b in self.buckets:
            if not b.launched:  # a parameter unused this step (or some micro-batches)
                for p in b.params:
                    if p.param.grad is None:
                        p.param.grad = torch.zeros_like(p.param)
                self._launch(b)
            if b.work is not None:
                b.work.wait()
            if b.stage_group is not None:
                assert b.flat is not None
                dist.all_reduce(b.flat, group=_pg(b.stage_group))
            self._place(b)
            b.ready.clear()
            b.work, b.launched = None, False

    def _finish_zero3(self) -> None:
        """ZeRO-3: the last buffer backward held is let go and the reduce-scatter still in
        flight lands on its shard (the others landed as each next one launched)."""
        C.release_zero3_buffers()
        for entry in self.zero3_tp_sums:
            grad = entry.shard.grad
            if grad is None or not entry.ranges or entry.tp_group.size == 1:
                continue
            flat = torch.cat([grad[a:b] for a, b in entry.ranges])
            dist.all_reduce(flat, group=_pg(entry.tp_group))
            at = 0
            for a, b in entry.ranges:
                grad[a:b] = flat[at : at + b - a]
                at += b - a

    def _place(self, b: Bucket) -> None:
        assert b.flat is not None
        if b.mode is DPMode.ZERO2 and b.shard is not None:
            b.shard.grad = b.flat
        elif b.shard is not None:
            start, stop = b.shard_range()
            b.shard.grad = b.flat[start:stop].clone()
        else:
            offset = 0
            for p in b.params:
                n = p.param.numel()
                p.param.grad = b.flat[offset : offset + n].view_as(
                    p.param
                )  # a fresh buffer per step
                offset += n
        if b.shard is not None:
            for p in b.params:
                p.param.grad = None  # ZeRO-2 keeps no full gradient; ZeRO-1 drops it here
        b.flat = None

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        """Multiply every gradient the optimizer will read (after `finish`) by `factor`."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def step(self) -> None:
        self.optimizer.step()
        self.refresh_params()

    def refresh_params(self) -> None:
        """ZeRO-1/2: copy the (stepped or loaded) shards back into the whole parameters."""
        for b in self.buckets:
            if b.shard is not None:
                _gather_shard(b)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for b in self.buckets:
            for p in b.params:
                p.param.grad = None


def _pg(ref: GroupRef) -> Any:
    return GROUPS.groups[tuple(sorted(ref.ranks))]


_FIRST_BUCKET_BYTES = 2**20
"""DDP's choice: a small first bucket (the last layers' gradients) starts communication early
in backward instead of waiting for a full bucket."""


def _pack(params: list[SyncedParam], cap_bytes: int, first_bytes: int) -> list[Bucket]:
    buckets: list[Bucket] = []
    open_: dict[tuple[Any, ...], Bucket] = {}
    for p in reversed(params):
        alone = p.dp_group.size == 1 and p.tp_group is None and p.stage_group is None
        if not p.param.requires_grad or alone:
            continue
        key = (p.dp_group, p.mode, p.tp_group, p.stage_group, p.param.dtype)
        b = open_.get(key)
        nbytes = p.param.numel() * p.param.element_size()
        cap = first_bytes if b is not None and b is _first(buckets, key) else cap_bytes
        if b is None or (b.numel * p.param.element_size() + nbytes > cap and b.params):
            b = open_[key] = Bucket([], p.dp_group, p.mode, p.tp_group, p.stage_group)
            buckets.append(b)
        b.params.append(p)
        b.numel += p.param.numel()
    for b in buckets:
        n = b.dp_group.size
        b.padded = -(-b.numel // n) * n
    return buckets


def _first(buckets: list[Bucket], key: tuple[Any, ...]) -> Bucket | None:
    """The first bucket made for this key's groups and mode."""
    return next(
        (b for b in buckets if (b.dp_group, b.mode, b.tp_group, b.stage_group) == key[:4]), None
    )


def _make_shard(b: Bucket) -> nn.Parameter:
    flat = torch.zeros(b.padded, dtype=b.params[0].param.dtype)
    torch.cat([p.param.detach().reshape(-1) for p in b.params], out=flat[: b.numel])
    start, stop = b.shard_range()
    return nn.Parameter(flat[start:stop].clone())


@torch.no_grad()
def _gather_shard(b: Bucket) -> None:
    assert b.shard is not None
    full = b.shard.new_empty(b.padded)
    C.all_gather_flat(full, b.shard.detach().contiguous(), group=_pg(b.dp_group))
    offset = 0
    for p in b.params:
        n = p.param.numel()
        p.param.copy_(full[offset : offset + n].view_as(p.param))
        offset += n
