"""Whole tensors from a rank's pieces, and pieces from whole tensors: parameters, gradients
and optimizer states under the original model's names, whatever the plan.

A parameter's values live in the object the optimizer steps (its *holder*): the parameter
itself (replicated or a TP piece), a ZeRO-1/2 bucket's flat 1/dp slice, or a ZeRO-3 unit's
flat 1/dp shard. Every optimizer state tensor has its holder's shape, so one routine turns
any per-holder value (data, gradient, `exp_avg`, ...) into the whole tensor (gathering over
the dp group, then the TP group) and back (`piece` slices a whole tensor for this rank).
Gathers are collectives: every rank of a stage calls with the same specs in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import fx, nn

from galvatron_fx.plan import Plan
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.collectives import GROUPS, GroupRef
from galvatron_fx.runtime.data_parallel import Bucket, GradSync
from galvatron_fx.runtime.program import get_attr

__all__ = [
    "Holder",
    "StateHolder",
    "holder_of",
    "load_whole",
    "piece",
    "split_blocks",
    "take_shard",
]
__all__ += ["whole_value"]


class StateHolder(Protocol):
    """What reading and writing whole state needs of a compiled model (`WholeState`)."""

    plan: Plan

    def state_parts(self) -> tuple[fx.GraphModule, GradSync, dict[str, Any], int]:
        """(module, gradient sync, the parameter specs this rank holds, rank)."""
        ...


@dataclass(frozen=True)
class Holder:
    """Where a parameter's values live on this rank."""

    param: nn.Parameter
    """What the optimizer steps."""
    offset: int | None = None
    """Flat holders: where the parameter's TP piece starts in the unflattened buffer."""
    group: GroupRef | None = None
    """Flat holders: the dp group whose slices make the buffer."""
    numel: int = 0
    """Flat holders: the unflattened buffer's length (padding excluded)."""


def holder_of(module: fx.GraphModule, sync: GradSync, spec: Any) -> Holder:
    if spec.zero3_flat:
        flat = get_attr(module, spec.zero3_flat)
        group = GroupRef(tuple(sorted(spec.dp_group.ranks)))
        return Holder(flat, spec.zero3_offset, group, flat.numel() * group.size)
    param = get_attr(module, spec.name)
    bucket, offset = _bucket_of(sync, param)
    if bucket is not None and bucket.shard is not None:
        group = GroupRef(tuple(sorted(bucket.dp_group.ranks)))
        return Holder(bucket.shard, offset, group, bucket.padded)
    return Holder(param)


def _bucket_of(sync: GradSync, param: nn.Parameter) -> tuple[Bucket | None, int]:
    for b in sync.buckets:
        offset = 0
        for p in b.params:
            if p.param is param:
                return b, offset
            offset += p.param.numel()
    return None, 0


def _local_shape(module: fx.GraphModule, spec: Any) -> tuple[int, ...]:
    if spec.zero3_shape is not None:
        return tuple(spec.zero3_shape)
    return tuple(get_attr(module, spec.name).shape)


Cache = dict[tuple[int, str], torch.Tensor]


def whole_value(
    module: fx.GraphModule,
    sync: GradSync,
    spec: Any,
    value_of: Callable[[nn.Parameter], torch.Tensor | None],
    key: str = "",
    cache: Cache | None = None,
) -> torch.Tensor | None:
    """The whole tensor of `value_of(holder)` for the parameter `spec` describes (a 0-d
    value, such as Adam's step count, is returned as is). `cache` keeps gathered flat
    buffers across the parameters of one bucket or unit (`key` names the value)."""
    h = holder_of(module, sync, spec)
    t = value_of(h.param)
    if t is None or t.dim() == 0:
        return t
    if h.group is not None and h.offset is not None:
        ck = (id(h.param), key)
        full = cache.get(ck) if cache is not None else None
        if full is None:
            full = _all_gather(t.detach().reshape(-1), h.group)
            if cache is not None:
                cache[ck] = full
        shape = _local_shape(module, spec)
        t = full[h.offset : h.offset + math.prod(shape)].view(shape)
    if spec.tp_dim is not None and spec.tp_group.size > 1:
        pieces = _all_gather_list(t, spec.tp_group)
        local = tuple(b // spec.tp_group.size for b in spec.blocks)
        cut = [split_blocks(p, spec.tp_dim, local) for p in pieces]
        t = torch.cat([torch.cat(b, spec.tp_dim) for b in zip(*cut, strict=True)], spec.tp_dim)
    return t


def piece(whole: torch.Tensor, spec: Any, rank: int) -> torch.Tensor:
    """This rank's TP piece of a whole tensor (the inverse of the TP gather)."""
    if spec.tp_dim is None or spec.tp_group.size == 1:
        return whole
    return take_shard(
        whole, spec.tp_dim, spec.blocks, spec.tp_group.size, spec.tp_group.index(rank)
    )


def split_blocks(t: torch.Tensor, dim: int, blocks: tuple[int, ...]) -> list[torch.Tensor]:
    """`t` cut along `dim` into blocks of these sizes (one block: `blocks` empty)."""
    return list(t.split(list(blocks), dim)) if blocks else [t]


def take_shard(
    t: torch.Tensor, dim: int, blocks: tuple[int, ...], n: int, index: int
) -> torch.Tensor:
    """Piece `index` of `n` of a tensor-parallel tensor: of each block, for weights whose
    output is cut into blocks (fused qkv)."""
    parts = split_blocks(t, dim, blocks)
    return torch.cat([p.chunk(n, dim)[index] for p in parts], dim).clone()


def load_whole(
    module: fx.GraphModule,
    sync: GradSync,
    specs: Mapping[str, Any],
    whole: Callable[[str], torch.Tensor],
    rank: int,
) -> dict[int, torch.Tensor]:
    """Per holder (by id), its value on this rank built from whole tensors (`whole(name)`),
    for every parameter in `specs` (all the parameters of the holders it names)."""
    out: dict[int, torch.Tensor] = {}
    for name, spec in specs.items():
        if spec.alias_of is not None:
            continue
        h = holder_of(module, sync, spec)
        local = piece(whole(name), spec, rank)
        if h.group is None or h.offset is None:
            out[id(h.param)] = local
            continue
        if id(h.param) not in out:
            out[id(h.param)] = torch.zeros(h.numel, dtype=local.dtype)
        flat = out[id(h.param)]
        flat[h.offset : h.offset + local.numel()] = local.reshape(-1)
    for spec in specs.values():  # flat buffers: keep this rank's slice
        if spec.alias_of is not None:
            continue
        h = holder_of(module, sync, spec)
        if h.group is not None and out[id(h.param)].numel() == h.numel:
            size = h.param.numel()
            start = h.group.ranks.index(rank) * size
            out[id(h.param)] = out[id(h.param)][start : start + size]
    return out


def _all_gather_list(t: torch.Tensor, ref: GroupRef) -> list[torch.Tensor]:
    if ref.size == 1:
        return [t]
    out = [torch.empty_like(t) for _ in ref.ranks]
    dist.all_gather(out, t.contiguous(), group=GROUPS.groups[tuple(sorted(ref.ranks))])
    order = sorted(ref.ranks)
    return [out[order.index(r)] for r in ref.ranks]


def _all_gather(t: torch.Tensor, ref: GroupRef) -> torch.Tensor:
    """Flat pieces in sorted rank order (as the flat holders are laid out)."""
    if ref.size == 1:
        return t
    full = t.new_empty(t.numel() * ref.size)
    C.all_gather_flat(full, t.contiguous(), group=GROUPS.groups[ref.ranks])
    return full
