"""Sharding rules: how a placement flows through one ATen op on one mesh axis.

A rule sees the op's node and the placements (`Replicate()`, `Shard(dim)`, `Partial()`, the
DTensor types) its inputs have on one axis of the layer's device mesh (`dp` or `tp`), and
returns a `Decision`: the output placement, the inputs that must be redistributed first, and,
for linear layers on the tensor-parallel axis, how the weight is split. Rules are pure: the
rewrite happens in `insert_collectives`. One line per op in `RULES`, pointing at a small
function (tinygrad's `schedule/multi.py` style). The table and its ~30 rules for ~110 ops stay
in one file on purpose (past the usual 500 lines): a rule is read next to its neighbours.

Megatron tensor parallelism falls out of the linear rule: a replicated input makes the
linear column-parallel (weight split on its output features), an input split on its last
dimension makes it row-parallel (weight split on its input features) with the partial sums
reduced right after, so a standard attention block or MLP needs exactly one reduction.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

__all__ = ["RULES", "Decision", "OpView", "Placement", "decide", "replicated", "slice_bounds"]
__all__ += ["blocks_kind", "kind_blocks", "view_groups"]

aten = torch.ops.aten
R = Replicate()


@dataclass
class OpView:
    """One node as a rule sees it, on one mesh axis of size `n`."""

    node: fx.Node
    n: int
    place: dict[fx.Node, Any]
    """Placements decided so far on this axis (tuples for multi-output ops)."""
    shard_weights: bool = False
    """May linear rules split parameters (the tp axis of a tensor-parallel layer)?"""
    seq_parallel: bool = False
    params: frozenset[fx.Node] = frozenset()
    """`get_attr` nodes holding parameters."""
    vocab: int | None = None
    """In a vocab-parallel segment: split only weights with this many rows (the vocabulary)."""
    ulysses: bool = False
    """The tp axis of a Ulysses layer: attention on a split sequence reshards to heads."""

    @property
    def args(self) -> Any:
        """The node's arguments, untyped: rules know each op's signature."""
        return self.node.args

    def p(self, arg: Any) -> Any:
        return self.place.get(arg, R) if isinstance(arg, fx.Node) else None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        args, kwargs = self.node.args, self.node.kwargs
        return args[i] if len(args) > i else kwargs.get(name, default)

    def tensors(self) -> list[fx.Node]:
        return [a for a in self.node.all_input_nodes if _is_tensor(a)]


@dataclass
class Decision:
    out: Any
    """The output placement (a tuple for ops returning several tensors)."""
    need: dict[Any, Any] = field(default_factory=dict)
    """Inputs (activations or parameters) that must take another placement first."""
    kind: str = ""
    """"column" / "row" for linear layers, "fallback" when no rule applied."""
    blocks: tuple[int, ...] = ()
    """Column-parallel weights feeding a split into blocks (fused qkv): shard each block."""


Rule = Callable[[OpView], Decision]


def shape(node: Any) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _sharded(p: Any) -> int | None:
    return p.dim if isinstance(p, Shard) else None


# -- generic rules ------------------------------------------------------------------------


def replicate_all(v: OpView) -> Decision:
    """Fallback: every sharded or partial input is gathered, the op runs replicated (each
    output, for ops returning several)."""
    need = {a: R for a in v.tensors() if not isinstance(v.p(a), Replicate)}
    return Decision(replicated(v.node), need, "fallback" if need else "")


def replicated(node: fx.Node) -> Any:
    """`Replicate()`, or a tuple of them for a node returning several tensors."""
    val = node.meta.get("val")
    return tuple(R for _ in val) if isinstance(val, (tuple, list)) else R


def creation(v: OpView) -> Decision:
    return Decision(R)


def same_as_input(v: OpView) -> Decision:
    """Shape- and position-preserving ops (unary elementwise, dtype casts, clones)."""
    src = v.tensors()[0] if v.tensors() else None
    p = v.p(src) if src is not None else R
    if isinstance(p, Partial) and v.node.target not in _LINEAR_UNARY:
        return Decision(R, {src: R})
    return Decision(p)


def elementwise(v: OpView) -> Decision:
    """Broadcasting n-ary ops: every input follows the sharded one; full-size replicated
    inputs are sliced locally (no communication)."""
    out_shape = shape(v.node)
    ins = v.tensors()
    partial = [a for a in ins if isinstance(v.p(a), Partial)]
    linear = v.node.target in (aten.add.Tensor, aten.sub.Tensor) and len(ins) == 2
    same = len({v.p(a).reduce_op for a in partial}) == 1
    if partial and len(partial) == len(ins) and linear and same:  # a sum of partial sums
        return Decision(v.p(partial[0]))
    out_dim = next(
        (_out_dim(a, v, out_shape) for a in ins if _out_dim(a, v, out_shape) is not None), None
    )
    need: dict[fx.Node, Placement] = {}
    for a in ins:
        need_a = _align(a, v, out_shape, out_dim)
        if need_a is not None:
            need[a] = need_a
    return Decision(Shard(out_dim) if out_dim is not None else R, need)


def in_place(v: OpView) -> Decision:
    """`x.op_(y, ...)` writes into `x`, and through it into its base when `x` is a view,
    which later nodes read (T5's decoder inputs: `new_zeros(...)[:, 1:].copy_(labels)`). So
    `x` keeps its placement (a redistributed copy would take the write and lose it) and the
    other inputs are brought to it: a split `x` slices a full-size replicated input locally,
    a replicated `x` gathers a split one."""
    x = v.args[0]
    p = v.p(x)
    if isinstance(p, Partial):  # no captured model writes into a partial sum
        return elementwise(v)
    out_dim = _sharded(p)
    need: dict[fx.Node, Placement] = {}
    for a in v.tensors():
        want = R if out_dim is None else _align(a, v, shape(v.node), out_dim)
        if a is not x and want is not None and want != v.p(a):
            need[a] = want
    return Decision(p, need)


def _out_dim(a: fx.Node, v: OpView, out_shape: tuple[int, ...]) -> int | None:
    d = _sharded(v.p(a))
    if d is None:
        return None
    return d + len(out_shape) - len(shape(a))


def _align(a: fx.Node, v: OpView, out_shape: tuple[int, ...], out_dim: int | None) -> Any:
    """The placement input `a` needs so that it lines up with an output sharded on out_dim."""
    p, sa = v.p(a), shape(a)
    offset = len(out_shape) - len(sa)
    if isinstance(p, Partial):
        return R if out_dim is None else _target(sa, out_dim - offset)
    if out_dim is None:
        return None
    want = _target(sa, out_dim - offset)
    return None if want == p else want


def _target(sa: tuple[int, ...], d: int) -> Placement:
    """Input dimension d of an operand: sharded when present at full size, else broadcast."""
    return Shard(d) if 0 <= d < len(sa) and sa[d] != 1 else R


# -- layout ops ---------------------------------------------------------------------------


def view_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape into groups of source and destination dims with equal products:
    (B, S, H) -> (B, S, nh, hd) gives [0]->[0], [1]->[1], [2]->[2, 3]."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi: list[int] = []
        gj: list[int] = []
        pi = pj = 1
        while i < len(src) or j < len(dst):
            take_src = i < len(src) and (pi < pj or (pi == pj and not gi) or j >= len(dst))
            if take_src:
                pi, i = pi * src[i], i + 1
                gi.append(i - 1)
            else:
                pj, j = pj * dst[j], j + 1
                gj.append(j - 1)
            if pi == pj and gi and gj:
                break
        groups.append((gi, gj))
    return groups


def reshape(v: OpView) -> Decision:
    """A sharded dim survives a reshape when it is the outermost non-1 dim of its group and
    the group's outermost output dim is divisible: both sides then hold the same contiguous
    1/n of the group's elements."""
    src = v.tensors()[0]
    p = v.p(src)
    d = _sharded(p)
    if d is None:
        return Decision(p) if isinstance(p, Replicate) else Decision(R, {src: R})
    s_in, s_out = shape(src), shape(v.node)
    for gi, gj in view_groups(s_in, s_out):
        if d not in gi:
            continue
        lead_in = next((k for k in gi if s_in[k] != 1), None)
        lead_out = next((k for k in gj if s_out[k] != 1), None)
        if lead_in != d or lead_out is None:
            break
        if s_out[lead_out] % v.n == 0:
            return Decision(Shard(lead_out))
        # (B, S, 3H) -> (B, S, 3, nh, hd): the first output dims count equal blocks (q, k,
        # v) and the split lands on the heads inside each: a column-parallel producer's
        # weight is then split block by block (checked by the caller)
        blocks = 1
        for k in gj:
            if blocks > 1 and s_out[k] % v.n == 0:
                return Decision(Shard(k), kind=blocks_kind((s_in[d] // blocks,) * blocks))
            blocks *= s_out[k]
    return Decision(R, {src: R}, "fallback")


def unsqueeze(v: OpView) -> Decision:
    p = v.p(v.args[0])
    d = _sharded(p)
    if d is None:
        return Decision(p)
    new = _norm(v.args[1], len(shape(v.node)))
    return Decision(Shard(d + 1 if new <= d else d))


def squeeze(v: OpView) -> Decision:
    src = v.args[0]
    d = _sharded(v.p(src))
    if d is None:
        return Decision(v.p(src))
    s_in = shape(src)
    dims = v.arg(1, "dim", None)
    dims = range(len(s_in)) if dims is None else [dims] if isinstance(dims, int) else dims
    gone = [_norm(k, len(s_in)) for k in dims if s_in[_norm(k, len(s_in))] == 1]
    return Decision(Shard(d - sum(1 for k in gone if k < d)))


def transpose(v: OpView) -> Decision:
    src = v.args[0]
    d = _sharded(v.p(src))
    if d is None:
        return Decision(v.p(src))
    nd = len(shape(src))
    a, b = _norm(v.args[1], nd), _norm(v.args[2], nd)
    return Decision(Shard(b if d == a else a if d == b else d))


def permute(v: OpView) -> Decision:
    src = v.args[0]
    d = _sharded(v.p(src))
    if d is None:
        return Decision(v.p(src))
    dims = [_norm(k, len(shape(src))) for k in v.args[1]]
    return Decision(Shard(dims.index(d)))


def t(v: OpView) -> Decision:
    src = v.args[0]
    d = _sharded(v.p(src))
    return Decision(v.p(src) if d is None else Shard(1 - d))


def expand(v: OpView) -> Decision:
    src = v.args[0]
    d = _sharded(v.p(src))
    if d is None:
        return Decision(v.p(src))
    return Decision(Shard(d + len(shape(v.node)) - len(shape(src))))


def slice_(v: OpView) -> Decision:
    """Slicing another dim keeps the shard; a full-range slice of the sharded dim too. A
    slice of the sharded dim that cuts it into blocks every rank can split (`qkv[..., H:
    H + kv]` of a fused projection) keeps it when a column-parallel producer splits each
    block (checked by the caller): every rank slices its piece of that block."""
    src = v.args[0]
    p = v.p(src)
    d = _sharded(p)
    s_in = shape(src)
    dim = _norm(v.arg(1, "dim", 0), len(s_in))
    if d is None or dim != d or shape(v.node)[dim] == s_in[dim]:
        return Decision(p) if not isinstance(p, Partial) else Decision(R, {src: R})
    start, stop = slice_bounds(v.node)
    pieces = tuple(b for b in (start, stop - start, s_in[d] - stop) if b)
    if v.arg(4, "step", 1) == 1 and stop > start and all(b % v.n == 0 for b in pieces):
        return Decision(p, kind=blocks_kind(pieces))
    return Decision(R, {src: R}, "fallback")


def blocks_kind(sizes: Sequence[int]) -> str:
    """The decision kind of a rule that keeps a split by cutting it into blocks of these
    global sizes (the producer's weight must be split block by block)."""
    return "blocks=" + ",".join(map(str, sizes))


def kind_blocks(kinds: Sequence[str]) -> tuple[int, ...]:
    """The block sizes a node's kinds ask for (empty: none)."""
    kind = next((k for k in kinds if k.startswith("blocks=")), "")
    return tuple(int(b) for b in kind.removeprefix("blocks=").split(",")) if kind else ()


def slice_bounds(node: fx.Node) -> tuple[int, int]:
    """A `slice.Tensor` node's [start, stop) on its dim, clamped to the input's size."""
    size = shape(node.args[0])[_norm(_arg(node, 1, "dim", 0), len(shape(node.args[0])))]
    start, stop = _arg(node, 2, "start", None), _arg(node, 3, "end", None)
    start = 0 if start is None else start + size if start < 0 else start
    stop = size if stop is None else stop + size if stop < 0 else stop
    return min(max(start, 0), size), min(max(stop, 0), size)


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def select(v: OpView) -> Decision:
    src = v.args[0]
    p = v.p(src)
    d = _sharded(p)
    dim = _norm(v.args[1], len(shape(src)))
    if d is None:
        return Decision(p) if not isinstance(p, Partial) else Decision(R, {src: R})
    if d == dim:
        return Decision(R, {src: R}, "fallback")
    return Decision(Shard(d - 1 if d > dim else d))


def along_dim(dim_arg: int, dim_name: str) -> Rule:
    """Ops that mix values along one dim (softmax, cumsum, diff): fine unless that dim is
    sharded."""

    def rule(v: OpView) -> Decision:
        src = v.args[0]
        p = v.p(src)
        dim = _norm(v.arg(dim_arg, dim_name, -1), len(shape(src)))
        if isinstance(p, Partial) or _sharded(p) == dim:
            return Decision(R, {src: R})
        return Decision(p)

    return rule


def reduce_dims(v: OpView) -> Decision:
    """mean/sum/amax over dims (every dim when none are given): a shard on a kept dim
    survives; over the sharded dim the result is a partial sum (mean: partial average)."""
    src = v.args[0]
    p = v.p(src)
    nd = len(shape(src))
    dims = v.arg(1, "dim", None)
    dims = list(range(nd)) if dims in (None, []) else [dims] if isinstance(dims, int) else dims
    dims = [_norm(k, nd) for k in dims]
    keep = bool(v.arg(2, "keepdim", False))
    d = _sharded(p)
    if isinstance(p, Partial):
        return Decision(R, {src: R})
    if d is None:
        return Decision(p)
    if d in dims:
        if v.node.target in _SUMS:
            return Decision(Partial("avg" if v.node.target in _MEANS else "sum"))
        return Decision(R, {src: R})
    return Decision(Shard(d if keep else d - sum(1 for k in dims if k < d)))


_MEANS = {aten.mean.dim, aten.mean.default}
_SUMS = {*_MEANS, aten.sum.dim_IntList, aten.sum.default}
"""Reductions whose result over a split dim is a partial sum (a mean: a partial average of
equal pieces)."""


def norm(v: OpView) -> Decision:
    """layer_norm / rms_norm normalise the trailing dims; weights stay replicated."""
    src = v.args[0]
    p = v.p(src)
    k = len(v.args[1])
    d = _sharded(p)
    nd = len(shape(src))
    if isinstance(p, Partial) or (d is not None and d >= nd - k):
        return Decision(R, {src: R})
    need = {w: R for w in v.tensors()[1:] if not isinstance(v.p(w), Replicate)}
    return Decision(p, need)


def cat(v: OpView) -> Decision:
    tensors = [a for a in v.args[0] if isinstance(a, fx.Node)]
    nd = len(shape(v.node))
    dim = _norm(v.arg(1, "dim", 0), nd)
    d = next((_sharded(v.p(a)) for a in tensors if _sharded(v.p(a)) is not None), None)
    if d is None or d == dim:
        need = {a: R for a in tensors if not isinstance(v.p(a), Replicate)}
        return Decision(R, need, "fallback" if d == dim else "")
    return Decision(Shard(d), {a: Shard(d) for a in tensors if v.p(a) != Shard(d)})


def split(v: OpView) -> Decision:
    """split / split_with_sizes / chunk. Splitting another dim keeps the shard. Splitting
    the sharded dim into pieces every rank can split works when the producer is a
    column-parallel linear (fused qkv, grouped-query ones unequal): its weight is then
    sharded block by block, recorded as `blocks` on that producer."""
    src = v.args[0]
    p = v.p(src)
    count = len(v.node.meta["val"])
    d = _sharded(p)
    dim = _norm(v.arg(2, "dim", 0), len(shape(src)))
    if isinstance(p, Partial):
        return Decision((R,) * count, {src: R})
    if d is None or d != dim:
        return Decision((p,) * count)
    sizes = [shape_of_val(x)[dim] for x in v.node.meta["val"]]
    if all(size % v.n == 0 for size in sizes):
        return Decision((p,) * count, kind=blocks_kind(sizes))
    return Decision((R,) * count, {src: R}, "fallback")


def unbind(v: OpView) -> Decision:
    """unbind(x, dim): a shard on another dim survives in every piece (one dim lower past
    `dim`); the unbound dim itself cannot stay split (each rank would hold whole pieces)."""
    src = v.args[0]
    p, d = v.p(src), _sharded(v.p(src))
    count = len(v.node.meta["val"])
    dim = _norm(v.arg(1, "dim", 0), len(shape(src)))
    if isinstance(p, Partial) or d == dim:
        return Decision((R,) * count, {src: R}, "fallback" if d == dim else "")
    if d is None:
        return Decision((p,) * count)
    return Decision((Shard(d - 1 if d > dim else d),) * count)


def stack(v: OpView) -> Decision:
    """stack(tensors, dim): the inputs line up on one shard, which moves past the new dim."""
    tensors = [a for a in v.args[0] if isinstance(a, fx.Node)]
    dim = _norm(v.arg(1, "dim", 0), len(shape(v.node)))
    ds = [_sharded(v.p(a)) for a in tensors]
    d = next((x for x in ds if x is not None), None)
    if d is None or any(isinstance(v.p(a), Partial) for a in tensors):
        gather: dict[fx.Node, Placement] = {
            a: R for a in tensors if not isinstance(v.p(a), Replicate)
        }
        return Decision(R, gather, "fallback" if d is not None else "")
    need: dict[fx.Node, Placement] = {a: Shard(d) for a in tensors if v.p(a) != Shard(d)}
    return Decision(Shard(d + 1 if d >= dim else d), need)


def repeat_interleave(v: OpView) -> Decision:
    """repeat_interleave(x, repeats, dim): output i is input i // repeats, so a contiguous
    piece of the input gives the matching contiguous piece of the output, on any dim
    (grouped-query attention's key/value heads repeated for their query heads)."""
    src = v.args[0]
    p = v.p(src)
    if isinstance(p, Partial) or v.arg(2, "dim", None) is None:  # no dim: the flat tensor
        return Decision(R, {src: R}, "fallback" if not isinstance(p, Replicate) else "")
    return Decision(p)


def shape_of_val(val: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in val.shape)


def getitem(v: OpView) -> Decision:
    src, index = v.args
    p = v.p(src)
    return Decision(p[index] if isinstance(p, tuple) else p)


# -- compute ops --------------------------------------------------------------------------


def linear(v: OpView) -> Decision:
    """aten.linear(x, W[out, in], b), GPT-2's addmm(b, x, W[in, out]) and x @ W[in, out]."""
    is_addmm = v.node.target == aten.addmm.default
    x, w = (v.args[1], v.args[2]) if is_addmm else (v.args[0], v.args[1])
    b = (
        v.args[0]
        if is_addmm
        else v.arg(2, "bias")
        if v.node.target == aten.linear.default
        else None
    )
    out_dim, in_dim = (0, 1) if v.node.target == aten.linear.default else (1, 0)
    px, nd = v.p(x), len(shape(x))
    last = _sharded(px) == nd - 1
    splittable = v.vocab is None or shape(w)[out_dim] == v.vocab
    pw = v.p(w)
    if v.shard_weights and w in v.params and splittable:
        # a tied weight may already be split by an earlier use: the same split is reused
        if last and pw in (R, Shard(in_dim)):
            red = Shard(1) if v.seq_parallel and len(shape(v.node)) == 3 else R
            return Decision(red, {w: Shard(in_dim)}, "row")
        if pw in (R, Shard(out_dim)):
            need: dict[Any, Any] = {w: Shard(out_dim)}
            if isinstance(b, fx.Node):
                need[b] = Shard(0)
            if not isinstance(px, Replicate):
                need[x] = R
            return Decision(Shard(len(shape(v.node)) - 1), need, "column")
    if isinstance(pw, Shard):
        raise NotImplementedError(
            f"{v.node.name!r}: weight {w.name!r} is split by another use (a tied weight) in "
            "a way this linear cannot use; give the units that share it the same tp"
        )
    if isinstance(px, Partial) or last:
        return Decision(R, {x: R})
    d = _sharded(px)
    return Decision(R if d is None else Shard(d + len(shape(v.node)) - nd))


def matmul(v: OpView) -> Decision:
    """matmul/bmm/mm. With a parameter as second operand (`x @ w`, `w` stored (in, out)) it
    is a linear layer (`linear`); of activations (eager attention): batch dims pass
    through, a shard on both contracted dims gives a partial sum."""
    if v.args[1] in v.params and len(shape(v.args[1])) == 2:
        return linear(v)  # a weight vector (`x @ w`, w of (k,)) is a product like any other
    return _matmul(v, v.args[0], v.args[1])


def baddbmm(v: OpView) -> Decision:
    """baddbmm(input, b1, b2) = beta * input + alpha * b1 @ b2 (ALiBi added to attention
    scores): the product's placement, `input` brought to it as an elementwise operand; a
    partial product would add `input` once per rank, so it is gathered first."""
    inp, b1, b2 = v.args[:3]
    prod = _matmul(v, b1, b2)
    if isinstance(prod.out, Partial) or isinstance(v.p(inp), Partial):
        return replicate_all(v)
    need = dict(prod.need)
    out_dim = _sharded(prod.out)
    want = _align(inp, v, shape(v.node), out_dim)
    if out_dim is None and not isinstance(v.p(inp), Replicate):
        want = R
    if want is not None:
        need[inp] = want
    return Decision(prod.out, need, prod.kind)


def _matmul(v: OpView, a: Any, b: Any) -> Decision:
    pa, pb = v.p(a), v.p(b)
    na, nb, no = len(shape(a)), len(shape(b)), len(shape(v.node))
    da, db = _sharded(pa), _sharded(pb)
    if isinstance(pa, Partial) or isinstance(pb, Partial):
        return _gather_operands(v, a, b)
    if min(na, nb) == 1:
        return _matvec(v, a, b)
    if da is None and db is None:
        return Decision(R)
    if da == na - 1 and db == nb - 2:
        return Decision(Partial())
    if da == na - 2 and db is None:
        return Decision(Shard(no - 2))
    if db == nb - 1 and da is None:
        return Decision(Shard(no - 1))
    batch = da if da is not None and da < na - 2 else db if db is not None and db < nb - 2 else None
    if batch is not None and na == nb and (da in (None, batch)) and (db in (None, batch)):
        need = {x: _target(shape(x), batch) for x in (a, b) if _sharded(v.p(x)) is None}
        return Decision(Shard(batch + no - na), {x: p for x, p in need.items() if p != R})
    return _gather_operands(v, a, b)


def _matvec(v: OpView, a: Any, b: Any) -> Decision:
    """matmul with a vector operand. torch promotes it to a matrix, (1, k) on the left or
    (k, 1) on the right, and drops that dim from the result: the result's dims are the other
    operand's without the contracted one (`(.., n, k) @ (k,) -> (.., n)`, `(k,) @ (.., k, m)
    -> (.., m)`), so a split on any other dim carries over at its own index there. Split on
    the contracted dim (k) on one side: the other side is sliced to it (free) and the result
    is a partial sum."""
    na, nb = len(shape(a)), len(shape(b))
    da, db = _sharded(v.p(a)), _sharded(v.p(b))
    ka, kb = na - 1, 0 if nb == 1 else nb - 2  # the contracted dims
    if da is None and db is None:
        return Decision(R)
    if (da == ka and db in (None, kb)) or (db == kb and da is None):
        need = {x: Shard(k) for x, d, k in ((a, da, ka), (b, db, kb)) if d is None}
        return Decision(Partial(), need)
    if nb == 1 and db is None and da is not None and da < ka:
        return Decision(Shard(da))  # (.., n, k) @ (k,): a's dims but the last
    if na == 1 and da is None and db is not None and db != kb:
        return Decision(Shard(db if db < kb else db - 1))  # (k,) @ (.., k, m): b's but k
    return _gather_operands(v, a, b)


def _gather_operands(v: OpView, a: Any, b: Any) -> Decision:
    need = {x: R for x in (a, b) if not isinstance(v.p(x), Replicate)}
    return Decision(R, need, "fallback" if need else "")


def sdpa(v: OpView) -> Decision:
    """Attention splits on batch or heads (dim 0 or 1 of q, k, v); the mask broadcasts.
    A replicated operand is sliced to the others' split (key/value heads computed whole on
    every rank, when the tp does not divide them: each rank keeps the heads its queries
    use; with `enable_gqa` that needs the tp to divide the key/value heads too), and in a
    tensor-parallel layer whose projections all run whole (a fused qkv over fewer
    key/value heads than tp) every operand is: attention still runs on 1/tp of the heads.
    Under Ulysses, q, k and v split on the sequence (dim 2) are resharded to heads (an
    all-to-all each) and the output comes back on the sequence (kind `ulysses`: the rewrite
    adds the all-to-all after the node)."""
    q, k, val = v.args[:3]
    mask = v.arg(3, "attn_mask")
    dims = {_sharded(v.p(x)) for x in (q, k, val)}
    d = next(iter(dims)) if len(dims) == 1 else None
    if v.ulysses and d == 2 and not any(isinstance(v.p(x), Partial) for x in (q, k, val)):
        return _ulysses(v, q, k, val, mask)
    split = {_sharded(v.p(x)) for x in (q, k, val) if not isinstance(v.p(x), Replicate)}
    only = next(iter(split)) if len(split) == 1 else None
    if not split and v.shard_weights and v.vocab is None:
        only = 1  # a tensor-parallel layer's attention on whole projections: split its heads
    if d is None and only in (0, 1) and all(shape(x)[only] % v.n == 0 for x in (q, k, val)):
        d = only  # the replicated operands are sliced to it
    if d is None or d >= 2 or any(isinstance(v.p(x), Partial) for x in (q, k, val)):
        gather = {
            x: R
            for x in (q, k, val, mask)
            if isinstance(x, fx.Node) and not isinstance(v.p(x), Replicate)
        }
        return Decision(R, gather, "fallback" if gather else "")
    need: dict[Any, Any] = {x: Shard(d) for x in (q, k, val) if v.p(x) != Shard(d)}
    if isinstance(mask, fx.Node):
        want: Any = _target(shape(mask), d + len(shape(mask)) - 4)
        if v.p(mask) != want:
            need[mask] = want
    return Decision(Shard(d), need)


def _ulysses(v: OpView, q: fx.Node, k: fx.Node, val: fx.Node, mask: Any) -> Decision:
    need: dict[Any, Any] = {x: Shard(1) for x in (q, k, val)}
    if isinstance(mask, fx.Node):  # (B, heads or 1, Sq, Sk): every position, our heads
        want = _target(shape(mask), len(shape(mask)) - 3)
        if v.p(mask) != want:
            need[mask] = want
    return Decision(Shard(2), need, "ulysses")


def embedding(v: OpView) -> Decision:
    """Lookups follow the indices; in a vocab-parallel segment the table is split by rows
    and each rank's lookups are partial (zero outside its rows). A table another unit
    already split by rows (a tied embedding read again, as T5's decoder does) is looked up
    the same way."""
    w, idx = v.args[0], v.args[1]
    p = v.p(idx)
    vocab_split = v.shard_weights and v.vocab is not None and shape(w)[0] == v.vocab
    rows = isinstance(v.p(w), Replicate) or v.p(w) == Shard(0)
    if vocab_split and w in v.params and rows and isinstance(p, Replicate):
        return Decision(Partial(), {w: Shard(0)}, "vocab")
    need = {w: R} if not isinstance(v.p(w), Replicate) else {}
    return Decision(p if isinstance(p, Shard) else R, need)


def cross_entropy(v: OpView) -> Decision:
    """Loss over a batch-split input. Summed: a partial sum. Mean: also a partial sum, of
    local sums over the global count of counted targets (`kind="global_mean"`: the rewrite
    divides by an all-reduced count), since ranks may hold different numbers of ignored
    targets and the mean of local means would then be wrong."""
    logits, target = v.args[0], v.args[1]
    pl, pt = v.p(logits), v.p(target)
    reduction = v.arg(3, "reduction", 1)
    weight = v.arg(2, "weight")
    plain = (
        reduction in (1, 2)
        and not isinstance(weight, fx.Node)
        and not v.arg(5, "label_smoothing", 0.0)
    )
    if plain and pl == Shard(1) and len(shape(logits)) == 2 and isinstance(pt, Replicate):
        return Decision(R, {}, "vocab_ce")  # Megatron's vocab-parallel cross-entropy
    if pl != Shard(0) or reduction not in (1, 2) or isinstance(weight, fx.Node):
        return replicate_all(v)
    need = {} if pt == Shard(0) else {target: Shard(0)}
    return Decision(Partial("sum"), need, "global_mean" if reduction == 1 else "")


def pad(v: OpView) -> Decision:
    """Padding touches the last len(pad)/2 dims; a shard elsewhere survives."""
    src = v.args[0]
    p, d = v.p(src), _sharded(v.p(src))
    if isinstance(p, Partial) or (d is not None and d >= len(shape(src)) - len(v.args[1]) // 2):
        return Decision(R, {src: R}, "fallback")
    return Decision(p)


def roll(v: OpView) -> Decision:
    """Rolling along dims that are not split moves each rank's values within its piece
    (Swin's shifted windows roll the spatial dims of a batch-split activation)."""
    src = v.args[0]
    p, d = v.p(src), _sharded(v.p(src))
    dims = v.arg(2, "dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    rolled = [_norm(k, len(shape(src))) for k in dims]
    if isinstance(p, Partial) or not rolled or d in rolled:  # no dims: the flattened tensor
        return Decision(R, {src: R}, "fallback")
    return Decision(p)


def pool_last(v: OpView) -> Decision:
    """adaptive_avg_pool1d pools the last dim; a shard on any other survives."""
    src = v.args[0]
    p, d = v.p(src), _sharded(v.p(src))
    if isinstance(p, Partial) or d == len(shape(src)) - 1:
        return Decision(R, {src: R}, "fallback")
    return Decision(p)


def conv(v: OpView) -> Decision:
    """Convolutions split on the batch only; weights replicated."""
    src = v.args[0]
    p = v.p(src)
    if p == Shard(0) and all(isinstance(v.p(w), Replicate) for w in v.tensors()[1:]):
        return Decision(p)
    return replicate_all(v)


def no_output(v: OpView) -> Decision:
    return Decision(R)


_LINEAR_UNARY = {
    aten.neg.default,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.type_as.default,
    aten._to_copy.default,
    aten.detach.default,
}

_UNARY = [
    "neg.default",
    "clone.default",
    "alias.default",
    "contiguous.default",
    "to.dtype",
    "to.dtype_layout",
    "to.device",
    "type_as.default",
    "_to_copy.default",
    "detach.default",
    "gelu.default",
    "silu.default",
    "relu.default",
    "tanh.default",
    "rsqrt.default",
    "sqrt.default",
    "exp.default",
    "log.default",
    "abs.default",
    "cos.default",
    "sin.default",
    "sigmoid.default",
    "pow.Tensor_Scalar",
    "square.default",
    "dropout.default",
    "ne.Scalar",
    "eq.Scalar",
    "ge.Scalar",
    "gt.Scalar",
    "le.Scalar",
    "lt.Scalar",
    "mul.Scalar",
    "div.Scalar",
    "add.Scalar",
    "sub.Scalar",
    "zeros_like.default",
    "ones_like.default",
    "full_like.default",
    "erf.default",
    "native_dropout.default",
]
_BINARY = [
    "where.ScalarOther",
    "masked_fill.Scalar",
    "tanh_backward.default",
    "add.Tensor",
    "sub.Tensor",
    "mul.Tensor",
    "div.Tensor",
    "pow.Tensor_Tensor",
    "eq.Tensor",
    "ne.Tensor",
    "le.Tensor",
    "lt.Tensor",
    "ge.Tensor",
    "gt.Tensor",
    "__and__.Tensor",
    "__or__.Tensor",
    "bitwise_and.Tensor",
    "bitwise_or.Tensor",
    "where.self",
    "minimum.default",
    "maximum.default",
    "min.other",
    "max.other",
    "masked_fill.Tensor",
]
_IN_PLACE = [
    "copy_.default",
    "add_.Tensor",
    "mul_.Tensor",
    "fill_.Tensor",
    "fill_.Scalar",
    "masked_fill_.Scalar",
    "masked_fill_.Tensor",
    "zero_.default",
]
_CREATION = [
    "arange.default",
    "arange.start",
    "arange.start_step",
    "zeros.default",
    "ones.default",
    "full.default",
    "empty.memory_format",
    "new_ones.default",
    "new_zeros.default",
    "new_full.default",
    "new_empty.default",
    "scalar_tensor.default",
    "lift_fresh_copy.default",
]


def _op(name: str) -> Any:
    packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


RULES: dict[Any, Rule] = {
    **{_op(n): same_as_input for n in _UNARY},
    **{_op(n): elementwise for n in _BINARY},
    **{_op(n): creation for n in _CREATION},
    **{_op(n): in_place for n in _IN_PLACE},
    aten.linear.default: linear,
    aten.addmm.default: linear,
    aten.matmul.default: matmul,
    aten.bmm.default: matmul,
    aten.mm.default: matmul,
    aten.baddbmm.default: baddbmm,
    aten.scaled_dot_product_attention.default: sdpa,
    aten.embedding.default: embedding,
    aten.layer_norm.default: norm,
    aten.rms_norm.default: norm,
    aten.softmax.int: along_dim(1, "dim"),
    aten._softmax.default: along_dim(1, "dim"),
    aten.log_softmax.int: along_dim(1, "dim"),
    aten._log_softmax.default: along_dim(1, "dim"),
    aten.cumsum.default: along_dim(1, "dim"),
    aten.diff.default: along_dim(2, "dim"),
    aten.mean.dim: reduce_dims,
    aten.mean.default: reduce_dims,
    aten.sum.dim_IntList: reduce_dims,
    aten.sum.default: reduce_dims,
    aten.amax.default: reduce_dims,
    aten.view.default: reshape,
    aten.reshape.default: reshape,
    aten._unsafe_view.default: reshape,
    aten.flatten.using_ints: reshape,
    aten.unsqueeze.default: unsqueeze,
    aten.squeeze.dim: squeeze,
    aten.squeeze.dims: squeeze,
    aten.transpose.int: transpose,
    aten.permute.default: permute,
    aten.t.default: t,
    aten.expand.default: expand,
    aten.slice.Tensor: slice_,
    aten.select.int: select,
    aten.cat.default: cat,
    aten.split.Tensor: split,
    aten.split_with_sizes.default: split,
    aten.chunk.default: split,
    aten.unbind.int: unbind,
    aten.stack.default: stack,
    aten.repeat_interleave.self_int: repeat_interleave,
    aten.cross_entropy_loss.default: cross_entropy,
    aten._assert_tensor_metadata.default: no_output,
    aten.pad.default: pad,
    aten.constant_pad_nd.default: pad,
    aten.roll.default: roll,
    aten.adaptive_avg_pool1d.default: pool_last,
    aten.conv2d.default: conv,
    aten.conv1d.default: conv,
    operator.getitem: getitem,
}
"""ATen op -> rule. Ops not listed run replicated (`replicate_all`), with a warning when
that means gathering a sharded input."""


def decide(v: OpView) -> Decision:
    """The rule's decision, or the gathering fallback for ops without one."""
    rule = RULES.get(v.node.target)
    if rule is None:
        return replicate_all(v)
    return rule(v)
