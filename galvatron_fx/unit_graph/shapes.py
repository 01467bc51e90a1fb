"""What tensor parallelism splits in each unit: attention heads (and key/value heads before
grouped-query attention repeats them), the layers' weight widths, the vocabulary, and the
attention's sequence lengths (what Ulysses splits)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from galvatron_fx.meta import LAYER
from galvatron_fx.plan import LayerShape
from galvatron_fx.unit_graph.units import unit_nodes

__all__ = ["head_cut", "layer_shapes", "vocab_size"]


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


_LINEAR = torch.ops.aten.linear.default


_EMBEDDING = torch.ops.aten.embedding.default


_WEIGHT_ARG = {torch.ops.aten.linear.default: 1, torch.ops.aten.addmm.default: 2}
"""Where the weight sits among a matmul-like op's arguments (addmm: GPT-2's Conv1D)."""


def head_cut(key: fx.Node, head_dim: int) -> fx.Node | None:
    """The view that cut a projection's width into the heads `key` (an attention operand)
    comes from, `(.., width) -> (.., heads, d)` with `d` a multiple of the head size
    (`(B, S, 3, heads, hd)` of a fused qkv, GPT-NeoX's `(B, S, heads, 3 hd)` too), found by
    following the key back through rotary, repeats and transposes, first inputs first."""
    todo: list[Any] = [key]
    seen: set[fx.Node] = set()
    while todo and len(seen) < 64:
        node = todo.pop(0)
        if not isinstance(node, fx.Node) or node.op != "call_function" or node in seen:
            continue
        seen.add(node)
        if node.target in _VIEWS and _cuts_heads(node, head_dim):
            return node
        todo.extend(node.all_input_nodes)
    return None


def _cuts_heads(view: fx.Node, head_dim: int) -> bool:
    """`view` splits its input's last dim into (.., heads, d), d a multiple of the head
    size (a single head included: multi-query attention's (B, S, hd) -> (B, S, 1, hd))."""
    src = [int(s) for s in view.args[0].meta["val"].shape]  # type: ignore[union-attr]
    out = [int(s) for s in view.meta["val"].shape]
    if len(out) <= len(src) or out[-1] % head_dim:
        return False
    return any(math.prod(out[k:]) == src[-1] for k in range(len(out) - 1))


def _kv_heads(sdpa: fx.Node) -> list[int]:
    """Key/value heads before grouped-query attention repeats them (empty when the view
    that cut them is not found)."""
    key: Any = sdpa.args[1]
    cut = head_cut(key, int(key.meta["val"].shape[-1]))
    return [int(cut.meta["val"].shape[-2])] if cut is not None else []


_VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
}


def vocab_size(gm: fx.GraphModule) -> int | None:
    """The output width of the graph's last parameterised linear (the head's logits): the
    vocabulary that vocab-parallel segments split. None without such a linear."""
    size = None
    for node in gm.graph.nodes:
        idx = _WEIGHT_ARG.get(node.target)
        w = node.args[idx] if idx is not None and len(node.args) > idx else None
        if isinstance(w, fx.Node) and w.op == "get_attr":
            size = int(w.meta["val"].shape[0 if node.target is _LINEAR else 1])
    return size


def layer_shapes(gm: fx.GraphModule) -> dict[str, LayerShape]:
    """Per unit, the head counts and the weight widths tensor parallelism would split (the
    layers' linear weights; segments only their vocabulary, under vocab-parallel options),
    and the attention's sequence lengths (what Ulysses splits)."""
    out = {}
    vocab = vocab_size(gm)
    for name, nodes in unit_nodes(gm).items():
        heads: list[int] = []
        kv_heads: list[int] = []
        rows: list[tuple[str, int]] = []
        dims: list[tuple[str, int]] = []
        seqs: list[int] = []
        for node in nodes:
            if node.target is _SDPA:
                heads.append(int(node.args[0].meta["val"].shape[1]))  # type: ignore[union-attr]
                kv_heads.append(int(node.args[1].meta["val"].shape[1]))  # type: ignore[union-attr]
                kv_heads += _kv_heads(node)
                seqs += [int(a.meta["val"].shape[2]) for a in node.args[:2]]  # type: ignore[union-attr]
            idx = _WEIGHT_ARG.get(node.target)  # type: ignore[call-overload]
            weight = node.args[idx] if idx is not None and len(node.args) > idx else None
            in_layer = LAYER.get(node).kind == "layer"
            if node.target is _EMBEDDING:
                weight, in_layer = node.args[0], False
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                shape = [int(s) for s in weight.meta["val"].shape]
                named = [(f"{weight.target}[{d}]", size) for d, size in enumerate(shape)]
                dims += named if in_layer else []
                rows += [(n, size) for n, size in named if not in_layer and size == vocab]
        out[name] = LayerShape(
            tuple(dict.fromkeys(heads)),
            tuple(dims),
            tuple(dict.fromkeys(seqs)),
            tuple(dict.fromkeys(kv_heads)),
            tuple(dict.fromkeys(rows)),
        )
    return out
