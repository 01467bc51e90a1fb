"""Canonical forms capture leaves the graph in: one way to write what models write several
ways, so that the sharding rules see each computation once.

Linears written as matmuls: `x @ w.T (+ b)`, a matmul with a 2-D parameter's transpose and a
1-D bias parameter added, is `aten.linear(x, w, b)` (`linears`), the op tensor parallelism
splits as Megatron does and prices once; the arithmetic is the same (`aten.linear` is
defined as it), and a row-parallel split then adds the bias once, after the reduction.

Batched matmuls over merged (batch, heads) dims: BLOOM-style attention views `(B, nh, S,
d)` as `(B * nh, S, d)` for `bmm` / `baddbmm` (ALiBi as baddbmm's input) and views the
result back to `(B, nh, ...)`. Under tensor parallelism the heads are split, and merged
into the batch dim they would be split in strides, which no placement says; the 4-D form
(`matmul` of the unmerged operands, baddbmm as `beta * input + alpha * matmul`) keeps them a
dim of their own. `merged_matmuls` rewrites each such op to the 4-D form followed by a
reshape to its old shape, then drops reshapes that undo each other, so the later
`view(B, nh, ...)` reads the 4-D result directly. Same arithmetic: CPU and CUDA matmul run a
4-D matmul as the same batched kernel.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import fx

__all__ = ["linears", "merged_matmuls"]

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_BMMS = {aten.bmm.default, aten.baddbmm.default}


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def linears(gm: fx.GraphModule) -> int:
    """Rewrite `matmul(x, T(w))`, `w` a 2-D parameter and `T` its transpose, into
    `linear(x, w)`: the same arithmetic (`aten.linear` is defined as it), but the op tensor
    parallelism splits as Megatron does. Returns the number of matmuls rewritten."""
    count = 0
    for node in gm.graph.nodes:
        if node.target is not aten.matmul.default or len(node.args) != 2:
            continue
        x, wt = node.args
        if not (isinstance(wt, fx.Node) and wt.target in _TRANSPOSES):
            continue
        w = wt.args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and _is_2d_transpose(wt)):
            continue
        node.target, node.args = aten.linear.default, (x, w)
        if not wt.users:
            gm.graph.erase_node(wt)
        _fold_bias(gm, node)
        count += 1
    return count


def _fold_bias(gm: fx.GraphModule, linear: fx.Node) -> None:
    """`linear(x, w) + b`, `b` a 1-D parameter as wide as the output, becomes
    `linear(x, w, b)`: a row-parallel split then adds the bias once, after the reduction."""
    if len(linear.users) != 1:
        return
    user = next(iter(linear.users))
    if user.target is not aten.add.Tensor or user.kwargs:
        return
    bias = next((a for a in user.args if a is not linear), None)
    if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return
    width = _shape(linear)[-1:]
    if _shape(bias) != width or _shape(user) != _shape(linear):  # a 1-D bias, no broadcast
        return
    linear.args = (*linear.args, bias)
    user.replace_all_uses_with(linear)
    gm.graph.erase_node(user)


def _is_2d_transpose(node: fx.Node) -> bool:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return False
    args: Any = node.args  # the op's own signature: permute(x, dims), transpose(x, a, b)
    if node.target is aten.permute.default:
        return [d % 2 for d in args[1]] == [1, 0]
    if node.target is aten.transpose.int:
        return {d % 2 for d in args[1:3]} == {0, 1}
    return True


def merged_matmuls(gm: fx.GraphModule) -> int:
    """Rewrite bmm / baddbmm over merged (batch, heads) operands to 4-D; the count."""
    backs = [
        b for node in list(gm.graph.nodes) if node.target in _BMMS and (b := _rewrite(gm, node))
    ]
    for back in backs:
        _drop_undone_reshapes(back)
    # the merging views (and transposes made for a rewrite that then did not apply)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" or not _pure(n))
    return len(backs)


def _pure(node: fx.Node) -> bool:
    """The ops this rewrite leaves unused (views, transposes, expands): safe to drop."""
    return node.target in (*_VIEWS, aten.transpose.int, aten.expand.default)


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The 4-D form of `node` and the reshape to its old shape (returned), or None."""
    add = node.target is aten.baddbmm.default
    a, b = node.args[1:3] if add else node.args[:2]
    if add and _shape(node.args[0])[:1] != _shape(node)[:1]:
        return None  # an input broadcast over the merged dim: left as it is
    a4 = _unmerged(gm, a, node, None)
    if a4 is None:
        return None
    lead = (_shape(a4)[0], _shape(a4)[1])
    b4 = _unmerged(gm, b, node, lead)
    if b4 is None:
        return None
    with gm.graph.inserting_before(node):
        out = _call(gm, aten.matmul.default, (a4, b4), node)
        if add:
            alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
            bias = _unmerged(gm, node.args[0], node, lead) or _call(
                gm, aten.reshape.default, (node.args[0], [*lead, *_shape(node.args[0])[1:]]), node
            )
            if alpha != 1:
                out = _call(gm, aten.mul.Tensor, (out, alpha), node)
            if beta != 1:
                bias = _call(gm, aten.mul.Tensor, (bias, beta), node)
            out = _call(gm, aten.add.Tensor, (bias, out), node)
        back = _call(gm, aten.reshape.default, (out, list(_shape(node))), node)
    node.replace_all_uses_with(back)
    gm.graph.erase_node(node)
    return back


def _unmerged(
    gm: fx.GraphModule, x: Any, at: fx.Node, lead: tuple[int, ...] | None
) -> fx.Node | None:
    """A 4-D node holding `x` (3-D, dim 0 = the product of `lead`) unmerged: the input of
    the view that merged it, or the same through a transpose of the last two dims."""
    if not isinstance(x, fx.Node) or len(_shape(x)) != 3:
        return None
    if x.target in _VIEWS:
        src = x.args[0]
        s = _shape(src)
        merged = len(s) == 4 and s[1] > 1 and s[0] * s[1] == _shape(x)[0]
        same_rest = tuple(s[2:]) == tuple(_shape(x)[1:])
        if merged and same_rest and (lead is None or (s[0], s[1]) == lead):
            return src  # type: ignore[return-value]
        return None
    if x.target is aten.transpose.int and {d % 3 for d in x.args[1:3]} == {1, 2}:  # type: ignore[operator]
        inner = _unmerged(gm, x.args[0], at, lead)
        if inner is not None:
            with gm.graph.inserting_before(at):
                return _call(gm, aten.transpose.int, (inner, 2, 3), at)
    return None


def _drop_undone_reshapes(back: fx.Node) -> None:
    """A view of the rewrite's reshape back to the 4-D result's own shape reads the 4-D
    result (a contiguous matmul output: nothing downstream loses a layout it relied on)."""
    out = back.args[0]
    assert isinstance(out, fx.Node)
    for user in list(back.users):
        if user.target in _VIEWS and tuple(_shape(user)) == tuple(_shape(out)):
            user.replace_all_uses_with(out)


def _call(gm: fx.GraphModule, op: Any, args: tuple[Any, ...], like: fx.Node) -> fx.Node:
    """A new node running `op`, with `like`'s meta (module stack, trace) and its own value."""
    new = gm.graph.call_function(op, args)
    new.meta = {k: v for k, v in like.meta.items() if k != "val"}
    fake = like.meta["val"].fake_mode if hasattr(like.meta.get("val"), "fake_mode") else None
    vals = tuple(a.meta["val"] if isinstance(a, fx.Node) else a for a in args)
    with fake or contextlib.nullcontext():
        new.meta["val"] = op(*vals)
    return new


def _shape(node: Any) -> list[int]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return [int(s) for s in val.shape] if isinstance(val, torch.Tensor) else []
