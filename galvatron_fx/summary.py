"""The layer table of an annotated graph: one row per layer or segment, as text, JSON or DOT.

Reads `gfx_layer` and `gfx_cost` only, so it works on any graph the front end annotated.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx

from galvatron_fx.cost_models.compute import UnitFlops
from galvatron_fx.meta import COST, LAYER
from galvatron_fx.passes.group_layers import layer_digraph, unit_nodes
from galvatron_fx.plan import LayerShape

__all__ = [
    "LayerSummary",
    "head_cut",
    "layer_shapes",
    "layer_table",
    "model_fingerprint",
    "summary",
    "to_dot",
    "to_json",
    "unit_flops",
    "vocab_size",
]


@dataclass(frozen=True)
class LayerSummary:
    """One layer or segment, costs summed over its nodes."""

    name: str
    group: str
    kind: str
    fingerprint: str
    params: int
    fwd_flops: int
    bwd_flops: int
    saved_activation_bytes: int
    nodes: int


def unit_flops(gm: fx.GraphModule) -> dict[str, UnitFlops]:
    """Per unit, the forward / backward FLOPs and those of its attention cores, for the
    compute cost model."""
    from galvatron_fx.passes.recompute import attention_cores

    out = {}
    for name, nodes in unit_nodes(gm).items():
        cores = [n for core in attention_cores(nodes) for n in core]
        out[name] = UnitFlops(
            fwd_flops=sum(COST.get(n).fwd_flops for n in nodes),
            bwd_flops=sum(COST.get(n).bwd_flops for n in nodes),
            attention_fwd_flops=sum(COST.get(n).fwd_flops for n in cores if COST.has(n)),
        )
    return out


def layer_table(gm: fx.GraphModule) -> list[LayerSummary]:
    """Rows in execution order."""
    rows = []
    for name, nodes in unit_nodes(gm).items():
        tag = LAYER.get(nodes[0])
        costs = [COST.get(n) for n in nodes]
        rows.append(
            LayerSummary(
                name=name,
                group=tag.group,
                kind=tag.kind,
                fingerprint=tag.fingerprint,
                params=sum(c.params for c in costs),
                fwd_flops=sum(c.fwd_flops for c in costs),
                bwd_flops=sum(c.bwd_flops for c in costs),
                saved_activation_bytes=sum(c.saved_bytes for c in costs),
                nodes=sum(1 for n in nodes if n.op == "call_function"),
            )
        )
    return rows


_TOTALED = ("params", "fwd_flops", "bwd_flops", "saved_activation_bytes", "nodes")


def _totals(rows: list[LayerSummary]) -> dict[str, int]:
    return {f: sum(getattr(r, f) for r in rows) for f in _TOTALED}


def to_json(gm: fx.GraphModule, *, model: str = "", batch: int = 0, seq: int = 0) -> dict[str, Any]:
    """`{"model", "batch", "seq", "layers": [...], "total": {...}}` (the `inspect --json` form)."""
    rows = layer_table(gm)
    keep = ("name", "group", *_TOTALED)
    layers = [{k: v for k, v in asdict(r).items() if k in keep} for r in rows]
    return {"model": model, "batch": batch, "seq": seq, "layers": layers, "total": _totals(rows)}


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}E{unit}"


def _bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    return f"{n:.1f} PiB"


def summary(gm: fx.GraphModule) -> str:
    """The layer table as aligned text, with a totals row."""
    rows = layer_table(gm)
    header = ("layer", "group", "params", "fwd FLOPs", "saved act.", "nodes")
    body = [
        (
            r.name,
            r.group,
            _human(r.params),
            _human(r.fwd_flops),
            _bytes(r.saved_activation_bytes),
            str(r.nodes),
        )
        for r in rows
    ]
    t = _totals(rows)
    total = (
        "total",
        f"{len(rows)} units",
        _human(t["params"]),
        _human(t["fwd_flops"]),
        _bytes(t["saved_activation_bytes"]),
        str(t["nodes"]),
    )
    widths = [max(len(row[i]) for row in (header, *body, total)) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])


def to_dot(gm: fx.GraphModule) -> str:
    """Graphviz source of the layer graph: units as boxes, activations that cross as edges."""
    g = layer_digraph(gm)
    rows = {r.name: r for r in layer_table(gm)}
    lines = ["digraph layers {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    for name in g.nodes:
        r = rows[name]
        label = f"{name}\\n{_human(r.params)} params, {_human(r.fwd_flops)} FLOPs"
        style = "" if r.kind == "layer" else ", style=rounded"
        lines.append(f'  "{name}" [label="{label}"{style}];')
    for src, dst, data in g.edges(data=True):
        label = f"{len(data['tensors'])} tensor(s), {_bytes(data['bytes'])}"
        lines.append(f'  "{src}" -> "{dst}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def model_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the ordered unit names and fingerprints: a plan is valid for exactly the
    models with this value (same layers, ops and shapes)."""
    units = [(name, LAYER.get(nodes[0]).fingerprint) for name, nodes in unit_nodes(gm).items()]
    return hashlib.sha1(repr(units).encode()).hexdigest()[:16]


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
