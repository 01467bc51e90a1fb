"""The layer table of an annotated graph: one row per layer or segment, as text, JSON or DOT.

Reads `gfx_layer` and `gfx_cost` only, so it works on any graph the front end annotated.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import fx

from galvatron_fx.unit_graph.units import LayerSummary, layer_digraph, layer_table

__all__ = ["summary", "to_dot", "to_json"]


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
