"""Collectives as graph ops: exact autograd pairs around PyTorch's raw functional collectives.

Every function here is what a `call_function` node of a rewritten graph calls. Each takes a
`GroupRef` (the ranks of the group, in the order the data is concatenated) and is an
`autograd.Function` whose backward is the collective that makes gradients exact:

| op | forward | backward | used for |
|---|---|---|---|
| `tp_copy` | identity | all-reduce | Megatron f: a replicated input into split compute |
| `tp_reduce` | all-reduce | identity | Megatron g: partial sums of a row-parallel linear |
| `reduce_scatter` | reduce-scatter | all-gather | SP: row-parallel output onto the sequence split |
| `gather_partial` | all-gather | reduce-scatter | SP: sequence split into column-parallel linears |
| `gather_whole` | all-gather | keep own slice | a split value into replicated compute |
| `split_local` | keep own slice | all-gather | a replicated value into split compute |
| `split_zero` | keep own slice | zero-pad (partial sum) | data-parallel axis: a replicated value into batch-split compute |
| `reduce_both` | all-reduce | all-reduce | data-parallel axis: partial sums into replicated compute |
| `all_to_all` | all-to-all | the reverse all-to-all | Ulysses: a split moved from one dim to another |
| `switch_layout` | gathers + slices | the reverse, partial sums summed | values crossing between layers on other meshes |

The raw ops (`torch.ops._c10d_functional.*` + `wait_tensor`) take the process group's name;
`GROUPS` maps rank tuples to groups, created once per distinct rank set. Groups of one rank
make every op the identity, so world size 1 runs the same graph.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef

from galvatron_fx.runtime.mesh import Gather, Reduce, SliceStep

__all__ = [
    "GROUPS",
    "PENDING",
    "RANKS_ARG",
    "GroupRef",
    "GroupRegistry",
    "all_gather_flat",
    "all_to_all",
    "flat_shard",
    "gather_partial",
    "gather_whole",
    "global_count",
    "groups_of",
    "land_reduce_scatters",
    "memory_order",
    "reduce_both",
    "reduce_scatter",
    "reduce_scatter_flat",
    "register",
    "release_zero3_buffers",
    "split_local",
    "split_zero",
    "step_group",
    "switch_layout",
    "tp_copy",
    "tp_reduce",
    "whole_inputs",
    "zero3_issue",
    "zero3_saved_tensors",
    "zero3_use",
    "zero3_views",
]

_c10d = torch.ops._c10d_functional

# torch 2.13 renamed the c10d flat-tensor collectives (the old names warn); torch 2.6 lacks
# the new ones
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class GroupRef:
    """A process group named by its ranks (concatenation order); printable in graphs."""

    ranks: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int | None = None) -> int:
        return self.ranks.index(dist.get_rank() if rank is None else rank)

    def __repr__(self) -> str:
        return f"G{list(self.ranks)}"


class GroupRegistry:
    """One `torch.distributed` process group per distinct rank set, created on every rank in
    the same (sorted) order, as `new_group` requires."""

    def __init__(self) -> None:
        self._names: dict[tuple[int, ...], str] = {}
        self.groups: dict[tuple[int, ...], Any] = {}

    def create(self, rank_sets: Iterable[Sequence[int]]) -> None:
        for ranks in sorted({tuple(sorted(r)) for r in rank_sets if len(r) > 1}):
            if ranks in self.groups:  # every rank records every group, member or not
                continue
            pg = dist.new_group(list(ranks))
            self.groups[ranks] = pg
            if dist.get_rank() in ranks:
                self._names[ranks] = pg.group_name

    def name(self, ref: GroupRef) -> str:
        key = tuple(sorted(ref.ranks))
        if key not in self._names:
            raise RuntimeError(f"no process group for ranks {list(key)}: create() it first")
        return self._names[key]

    def clear(self) -> None:
        self._names.clear()
        self.groups.clear()


GROUPS = GroupRegistry()


def _gather(x: torch.Tensor, dim: int, ref: GroupRef) -> torch.Tensor:
    """All-gather along `dim`, pieces in `ref.ranks` order (the group itself is sorted)."""
    chunks = _c10d.all_gather_into_tensor(
        x.movedim(dim, 0).contiguous(), ref.size, GROUPS.name(ref)
    )
    out = _c10d.wait_tensor(chunks).chunk(ref.size)
    order = sorted(ref.ranks)
    pieces = [out[order.index(r)].movedim(0, dim) for r in ref.ranks]
    # cat along `dim` copies once, as cat-then-movedim did, and leaves the result contiguous:
    # the graph may `view` it (Swin's (B, H, W, C) windows under sequence parallelism)
    return torch.cat(pieces, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, ref: GroupRef) -> torch.Tensor:
    order = sorted(ref.ranks)
    pieces = x.movedim(dim, 0).chunk(ref.size)
    stacked = torch.cat([pieces[ref.ranks.index(r)] for r in order]).contiguous()
    out = _c10d.reduce_scatter_tensor(stacked, "sum", ref.size, GROUPS.name(ref))
    return _c10d.wait_tensor(out).movedim(0, dim)


def _all_reduce(x: torch.Tensor, ref: GroupRef) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", GROUPS.name(ref)))


def _slice(x: torch.Tensor, dim: int, ref: GroupRef) -> torch.Tensor:
    return x.chunk(ref.size, dim)[ref.index()].contiguous()


def _pad(x: torch.Tensor, dim: int, ref: GroupRef) -> torch.Tensor:
    """The adjoint of `_slice` when gradients are partial sums: own piece, zeros elsewhere."""
    shape = list(x.shape)
    step = shape[dim]
    shape[dim] *= ref.size
    out = x.new_zeros(shape)
    out.narrow(dim, ref.index() * step, step).copy_(x)
    return out


def _all_to_all(
    x: torch.Tensor, src: int, dst: int, order: tuple[int, ...], ref: GroupRef
) -> torch.Tensor:
    """`x` is this rank's piece of dim `src`; return its piece of dim `dst` instead, whole on
    `src`, stored in the dim `order` given (outermost first). Piece i of `dst` goes to
    `ref.ranks[i]`; the exchange runs in sorted rank order (the group's own), so pieces are
    reordered on the way in and out."""
    ranked = sorted(ref.ranks)
    pieces = x.chunk(ref.size, dst)
    send = torch.stack([pieces[ref.ranks.index(r)] for r in ranked]).contiguous()
    ones = [1] * ref.size
    got = _c10d.wait_tensor(_c10d.all_to_all_single(send, ones, ones, GROUPS.name(ref)))
    inv = [order.index(d) for d in range(x.dim())]
    received = [got[ranked.index(r)].permute(order) for r in ref.ranks]
    return torch.cat(received, order.index(src)).permute(inv)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, src: int, dst: int, order: tuple[int, ...], ref: GroupRef
    ) -> torch.Tensor:
        ctx.src, ctx.dst, ctx.ref = src, dst, ref
        ctx.grad_order = memory_order(x)
        return _all_to_all(x, src, dst, order, ref)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        back = _all_to_all(g, ctx.dst, ctx.src, ctx.grad_order, ctx.ref)
        return back, None, None, None, None


def memory_order(x: torch.Tensor) -> tuple[int, ...]:
    """x's dims from the outermost in memory (size-1 dims, whose strides mean nothing, last)."""
    strides = [int(x.stride(d)) if x.shape[d] > 1 else 0 for d in range(x.dim())]
    return tuple(sorted(range(x.dim()), key=lambda d: -strides[d]))


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ref: GroupRef) -> torch.Tensor:
        ctx.ref = ref
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(g, ctx.ref), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ref: GroupRef, both: bool) -> torch.Tensor:
        ctx.ref, ctx.both = ref, both
        return _all_reduce(x, ref)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (_all_reduce(g, ctx.ref) if ctx.both else g), None, None


class _Pair(torch.autograd.Function):
    """A forward collective along `dim` and its adjoint in backward, chosen by name."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, ref: GroupRef, fwd: str, bwd: str) -> Any:
        ctx.dim, ctx.ref, ctx.bwd = dim, ref, bwd
        return _DIM_OPS[fwd](x, dim, ref)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return _DIM_OPS[ctx.bwd](g, ctx.dim, ctx.ref), None, None, None, None


_DIM_OPS = {"gather": _gather, "scatter": _reduce_scatter, "slice": _slice, "pad": _pad}


class _Switch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, fwd: tuple[Any, ...], bwd: tuple[Any, ...], scale: float
    ) -> Any:
        ctx.bwd, ctx.scale = bwd, scale
        return _run_steps(x, fwd)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, None, None, None]:
        g = _run_steps(g, ctx.bwd)
        return (g * ctx.scale if ctx.scale != 1.0 else g), None, None, None


Ranks = tuple[int, ...]
Step = tuple[Any, ...]
"""A layout-switch step as graph arguments: ("gather", dim, ranks), ("reduce", ranks) (a
sum, in backward only) or ("slice", dim, start, stop). Graph arguments stay plain tuples
so generated code prints and runs as is."""


def as_step(step: Gather | SliceStep | Reduce) -> Step:
    if isinstance(step, Gather):
        return ("gather", step.dim, step.group)
    if isinstance(step, Reduce):
        return ("reduce", step.group)
    return ("slice", step.dim, step.start, step.stop)


def step_group(step: Step) -> Ranks | None:
    """The ranks a layout-switch step communicates with (None: a local slice)."""
    return (
        tuple(step[2]) if step[0] == "gather" else tuple(step[1]) if step[0] == "reduce" else None
    )


def _run_steps(x: torch.Tensor, steps: Sequence[Step]) -> torch.Tensor:
    for step in steps:
        if step[0] == "gather":
            x = _gather(x, step[1], GroupRef(step[2])) if len(step[2]) > 1 else x
        elif step[0] == "reduce":
            x = _all_reduce(x, GroupRef(step[1])) if len(step[1]) > 1 else x
        else:
            x = x.narrow(step[1], step[2], step[3] - step[2]).contiguous()
    return x


def tp_copy(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Megatron f: identity forward, all-reduce of the gradient."""
    return _Copy.apply(x, GroupRef(ranks)) if len(ranks) > 1 else x


def tp_reduce(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Megatron g: all-reduce forward, identity backward."""
    return _Reduce.apply(x, GroupRef(ranks), False) if len(ranks) > 1 else x


def reduce_both(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """All-reduce forward and backward: partial sums into compute whose gradients are
    partial sums too (the data-parallel axis)."""
    return _Reduce.apply(x, GroupRef(ranks), True) if len(ranks) > 1 else x


def reduce_scatter(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """Reduce-scatter along `dim`; backward all-gathers."""
    return _Pair.apply(x, dim, GroupRef(ranks), "scatter", "gather") if len(ranks) > 1 else x


def gather_partial(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """All-gather along `dim`; backward reduce-scatters (users' gradients are partial)."""
    return _Pair.apply(x, dim, GroupRef(ranks), "gather", "scatter") if len(ranks) > 1 else x


def gather_whole(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """All-gather along `dim`; backward keeps this rank's slice (gradients are whole)."""
    return _Pair.apply(x, dim, GroupRef(ranks), "gather", "slice") if len(ranks) > 1 else x


def split_local(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """Keep this rank's slice of `dim`; backward all-gathers."""
    return _Pair.apply(x, dim, GroupRef(ranks), "slice", "gather") if len(ranks) > 1 else x


def split_zero(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """Keep this rank's slice; backward zero-pads (gradients are partial sums)."""
    return _Pair.apply(x, dim, GroupRef(ranks), "slice", "pad") if len(ranks) > 1 else x


def all_to_all(
    x: torch.Tensor, src_dim: int, dst_dim: int, order: tuple[int, ...], ranks: Ranks
) -> torch.Tensor:
    """Move a split from `src_dim` to `dst_dim` (Ulysses: sequence to heads and back); the
    result is stored in dim `order`, that of the value it stands for (the graph may `view`
    it: CPU attention returns (B, H, S, D) stored as (B, S, H, D)). Backward moves the
    gradient's split back."""
    if len(ranks) == 1:
        return x
    return _AllToAll.apply(x, src_dim, dst_dim, tuple(order), GroupRef(ranks))


def switch_layout(
    x: torch.Tensor,
    fwd: tuple[Step, ...],
    bwd: tuple[Step, ...],
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Move a value between two layers' meshes: `fwd` steps now, `bwd` then `grad_scale`
    on the gradient (`runtime.mesh.plan_switch_grad`: partial sums over a dp group summed
    or rescaled)."""
    return _Switch.apply(x, fwd, bwd, grad_scale)


_WHOLE: list[torch.Tensor] = []
"""The whole (micro-)batch's inputs of the program running now (`whole_inputs`)."""


@contextlib.contextmanager
def whole_inputs(inputs: Sequence[Any]) -> Iterator[None]:
    """While the program runs on this rank's slices of `inputs`: `global_count` counts a
    sliced target on the whole tensor it came from, with no collective."""
    _WHOLE.extend(x for x in inputs if isinstance(x, torch.Tensor))
    try:
        yield
    finally:
        _WHOLE.clear()


def _whole_of(t: torch.Tensor) -> torch.Tensor | None:
    """The registered whole input whose elements `t` views (same storage, inside it)."""
    if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
        return None
    ptr, start = t.untyped_storage().data_ptr(), t.storage_offset()
    for w in _WHOLE:
        inside = w.storage_offset() <= start and start + t.numel() <= w.storage_offset() + w.numel()
        if w.untyped_storage().data_ptr() == ptr and inside and w.is_contiguous():
            return w
    return None


def global_count(target: torch.Tensor, ignore_index: int, ranks: Ranks) -> torch.Tensor:
    """How many targets are counted (not `ignore_index`) on all ranks of the group: the
    denominator of a mean loss over a batch split unevenly by padding.

    The ranks of a data-parallel group hold the whole batch between them, and every rank
    is handed the whole batch (`train_step` slices it): when the target is a slice of a
    whole input registered by `whole_inputs`, the count is read off that input here, and
    the all-reduce (a collective in the middle of the forward) is not needed."""
    whole = _whole_of(target) if len(ranks) > 1 else None
    if whole is not None:
        count = (whole != ignore_index).sum().to(torch.float32)
    else:
        count = (target != ignore_index).sum().to(torch.float32)
        count = _all_reduce(count, GroupRef(ranks)) if len(ranks) > 1 else count
    if _COUNTS is not None:
        _COUNTS.append(count.detach())
    return count


_COUNTS: list[torch.Tensor] | None = None
"""While `counting()` runs: every count `global_count` returned."""


@contextlib.contextmanager
def counting() -> Iterator[list[torch.Tensor]]:
    """Record the target counts of the forward that runs inside (the micro-batch loss's
    denominator): gradient accumulation weighs each micro-batch by its count."""
    global _COUNTS
    _COUNTS = []
    try:
        yield _COUNTS
    finally:
        _COUNTS = None


# -- ZeRO-3 -----------------------------------------------------------------------------


def flat_shard(t: torch.Tensor, ref: GroupRef, rank: int) -> torch.Tensor:
    """`rank`'s 1/n of `t` flattened and zero-padded to a multiple of the group size (pieces
    in sorted rank order, as all-gather and reduce-scatter lay them out)."""
    n = ref.size
    size = -(-t.numel() // n)
    flat = torch.zeros(size * n, dtype=t.dtype, device=t.device)
    flat[: t.numel()] = t.reshape(-1)
    i = sorted(ref.ranks).index(rank)
    return flat[i * size : (i + 1) * size].clone()


def _gather_flat(shard: torch.Tensor, ref: GroupRef, numel: int) -> torch.Tensor:
    full = _c10d.all_gather_into_tensor(shard.contiguous(), ref.size, GROUPS.name(ref))
    return _c10d.wait_tensor(full)[:numel]


_GATHERED: dict[int, tuple[StorageWeakRef, tuple[Any, ...]]] = {}
"""data_ptr of a gathered ZeRO-3 buffer -> (a weak reference to its storage, how to gather
it again). The storage, not a tensor: autograd hands out its own tensor objects for the
buffer and its views, while the storage lives exactly as long as any of them."""

_REGATHERED: dict[tuple[int, Ranks], weakref.ref[torch.Tensor]] = {}
"""Backward: (shard id, ranks) -> a buffer gathered again, shared by the saved views of it."""

_ORDER: dict[tuple[int, Ranks], tuple[torch.Tensor, GroupRef, int]] = {}
"""Forward order of the units' buffers (key -> shard, group, numel): backward needs them in
reverse, so gathering one starts gathering the one before it (FSDP's backward prefetch)."""

_INFLIGHT: dict[tuple[int, Ranks], torch.Tensor] = {}
"""Backward prefetches issued and not yet waited for."""

_HELD: dict[tuple[int, Ranks], torch.Tensor] = {}
"""The buffer backward is working on, kept until it moves to another one: without it each
saved view would gather its whole buffer again as soon as the previous view was freed."""

PENDING: list[tuple[torch.Tensor, torch.nn.Parameter]] = []
"""The ZeRO-3 reduce-scatter in flight, at most one: (result, the shard it belongs to).
Its input, the unit's whole padded gradient, stays alive until it is waited for
(`land_reduce_scatters`): when the next one launches, at the next forward, or when
`GradSync.finish` lets go of the ZeRO-3 buffers (`release_zero3_buffers`)."""


def zero3_buffers() -> list[object]:
    """The ZeRO-3 caches that hold tensors between calls (gradients in flight, the buffer
    backward works on, prefetches): what a memory probe must count besides the model."""
    return [PENDING, _HELD, _INFLIGHT]


def _overlapped(out: torch.Tensor) -> torch.Tensor:
    """An asynchronous collective's result, left in flight where overlap is safe.

    On gloo, waited at once: with ZeRO-3's gathers and reduce-scatters left in flight while
    the main thread computes (and runs collectives on other groups), forked CPU ranks died
    now and then of heap corruption (glibc "malloc(): unaligned tcache chunk detected",
    caught by faulthandler in `wait_tensor` of a forward prefetch; about one run in five of
    the 4-rank plan tests). On CPU the overlap buys nothing: gloo's thread and the compute
    share the same cores."""
    if _gloo():
        return _c10d.wait_tensor(out)
    return out


def _gloo() -> bool:  # not cached: forked ranks inherit the parent's state
    return dist.is_initialized() and dist.get_backend() == "gloo"


def zero3_issue(shard: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Start all-gathering a ZeRO-3 unit's flat shard (waited for by `zero3_use`)."""
    with torch.no_grad():
        return _overlapped(
            _c10d.all_gather_into_tensor(
                shard.contiguous(), len(ranks), GROUPS.name(GroupRef(ranks))
            )
        )


class _Zero3Use(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, issued: torch.Tensor, shard: torch.Tensor, ref: GroupRef, numel: int
    ) -> Any:
        ctx.ref, ctx.shard, ctx.pad = ref, shard, shard.numel() * ref.size - numel
        full = _c10d.wait_tensor(issued)[:numel]
        storage = full.untyped_storage()
        _GATHERED[storage.data_ptr()] = (StorageWeakRef(storage), (shard, ref, numel))
        _ORDER.setdefault((id(shard), ref.ranks), (shard, ref, numel))
        return full

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, None, None, None]:
        # launched here, it overlaps the backward of the units before this one; the one
        # launched before it is waited for first, as FSDP2 does, so one whole gradient at
        # most is alive beside this unit's (not every unit's until the sync ends)
        land_reduce_scatters()
        flat = torch.nn.functional.pad(g.contiguous(), (0, ctx.pad))
        out = _c10d.reduce_scatter_tensor(flat, "sum", ctx.ref.size, GROUPS.name(ctx.ref))
        PENDING.append((_overlapped(out), ctx.shard))
        return None, None, None, None


def land_reduce_scatters() -> None:
    """Wait for the ZeRO-3 reduce-scatters in flight and add each result to its shard's
    `.grad` (micro-batches accumulate there)."""
    for out, shard in PENDING:
        grad = _c10d.wait_tensor(out)
        shard.grad = grad if shard.grad is None else shard.grad + grad
    PENDING.clear()


def zero3_use(issued: torch.Tensor, shard: torch.Tensor, ranks: Ranks, numel: int) -> Any:
    """The unit's whole flat parameter buffer, once its all-gather has landed; backward
    reduce-scatters its gradient onto the shard (asynchronously, see `PENDING`)."""
    return _Zero3Use.apply(issued, shard, GroupRef(tuple(ranks)), numel)


def zero3_views(full: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
    """The unit's parameters as views of its gathered flat buffer."""
    out, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(full[at : at + n].view(shape))
        at += n
    return out


@dataclass(frozen=True)
class _Regather:
    shard: torch.Tensor
    ref: GroupRef
    numel: int
    view: tuple[tuple[int, ...], tuple[int, ...], int]


def _pack(t: torch.Tensor) -> Any:
    storage = t.untyped_storage()
    entry = _GATHERED.get(storage.data_ptr())
    if entry is None or entry[0].expired() or entry[0] != StorageWeakRef(storage):
        return t  # not a gathered parameter (or an address reused after one was freed)
    shard, ref, numel = entry[1]
    view = (tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))
    return _Regather(shard, ref, numel, view)


def _unpack(h: Any) -> torch.Tensor:
    if not isinstance(h, _Regather):
        return h
    key = (id(h.shard), h.ref.ranks)
    full = _HELD.get(key)
    if full is None and key in _REGATHERED:
        full = _REGATHERED[key]()
    if full is None:  # the first saved view of this buffer that backward needs
        full = _regather(key, h.shard, h.ref, h.numel)
    if key not in _HELD:
        _HELD.clear()
        _HELD[key] = full
    size, stride, offset = h.view
    return full.as_strided(size, stride, offset)  # the gathered buffer starts its storage


def _regather(key: tuple[int, Ranks], shard: torch.Tensor, ref: GroupRef, numel: int) -> Any:
    with torch.no_grad():
        issued = _INFLIGHT.pop(key, None)
        if issued is None:
            full = _gather_flat(shard.detach(), ref, numel)
        else:
            full = _c10d.wait_tensor(issued)[:numel]
        _REGATHERED[key] = weakref.ref(full)
        keys = list(_ORDER)
        i = keys.index(key) if key in _ORDER else 0
        if i > 0 and keys[i - 1] not in _INFLIGHT:  # the next buffer backward will need
            prev_shard, prev_ref, _ = _ORDER[keys[i - 1]]
            _INFLIGHT[keys[i - 1]] = _overlapped(
                _c10d.all_gather_into_tensor(
                    prev_shard.detach().contiguous(), prev_ref.size, GROUPS.name(prev_ref)
                )
            )
    return full


def release_zero3_buffers() -> None:
    """Drop what backward still holds of gathered ZeRO-3 buffers (call after backward) and
    land the reduce-scatter still in flight on its shard."""
    _HELD.clear()
    for issued in _INFLIGHT.values():  # an unused prefetch: collectives must still complete
        _c10d.wait_tensor(issued)
    _INFLIGHT.clear()
    land_reduce_scatters()


@contextlib.contextmanager
def zero3_saved_tensors() -> Iterator[None]:
    """While active, autograd saves ZeRO-3 gathered parameters as a recipe (their shard) and
    gathers them again when backward needs them, so the full parameters live only around
    their use."""
    release_zero3_buffers()  # a pipeline's next forward can start before a backward ends
    _REGATHERED.clear()
    _ORDER.clear()
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        try:
            yield
        finally:
            _GATHERED.clear()


RANKS_ARG: dict[Any, int] = {}
"""Graph op -> the position of its group's ranks among its arguments. Every op that
communicates registers here (`register`), so process groups can be created for them."""


def register(op: Any, ranks_arg: int) -> None:
    RANKS_ARG[op] = ranks_arg


RANKS_ARG.update(dict.fromkeys((tp_copy, tp_reduce, reduce_both, zero3_issue), 1))
RANKS_ARG.update(
    dict.fromkeys(
        (reduce_scatter, gather_partial, gather_whole, split_local, split_zero, global_count),
        2,
    )
)
RANKS_ARG[zero3_use] = 2
RANKS_ARG[all_to_all] = 4


def groups_of(target: Any, args: Sequence[Any]) -> list[Ranks]:
    """The rank sets a collective graph node uses (empty for any other node)."""
    if target is switch_layout:  # its groups sit inside its steps
        return [g for s in (*args[1], *args[2]) if (g := step_group(s)) is not None]
    if target in RANKS_ARG:
        return [tuple(args[RANKS_ARG[target]])]
    return []
