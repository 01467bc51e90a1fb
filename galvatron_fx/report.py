"""The plan report: a search result as one self-contained HTML page, or as PNG charts.

Reads: a search result as JSON (`SearchResult.to_json()`, or the file `galvatron-fx plan
--json` wrote). Writes: `render_html` returns the page as a string; `save_pngs` and
`write_report` write files, each through a temporary file and a rename. Guarantees: the
page has inline CSS and inline SVG only (no script, no external reference: it works
offline) and every text in it is escaped; the timeline is `simulate_schedule`'s, the
pipeline schedule the runtime runs (torch's GPipe / 1F1B / interleaved 1F1B orders), with
each stage's box widths taken from the search's per-micro-batch stage time.

Pure apart from the writers; matplotlib is imported only by `save_pngs`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from galvatron_fx.search.timeline import (
    BACKWARD_SHARE,
    Box,
    schedule_order,
    simulate_schedule,
)

__all__ = [
    "BACKWARD_SHARE", "Box", "render_html", "save_pngs", "schedule_order", "simulate_schedule",
    "write_report",
]  # fmt: skip

GiB = 2**30
_FWD = ("#9ecae9", "#a9dba0", "#cdb5e8", "#fdd0a2")
_BWD = ("#2f6fa8", "#2e8b3e", "#6a44a8", "#d2691e")
"""Forward (light) and backward (dark) colour per model chunk."""


# ---- what the charts read from a result -------------------------------------------------


def _pipeline(result: Mapping[str, Any]) -> tuple[int, int, int, str]:
    """(degree, chunks, micro-batches, schedule)."""
    pipe = result["plan"].get("pipeline", {})
    degree, chunks = int(pipe.get("degree", 1)), int(pipe.get("virtual_stages", 1))
    return degree, chunks, int(pipe.get("micro_batches", 1)), str(pipe.get("schedule", "1f1b"))


def _budget_bytes(result: Mapping[str, Any]) -> float | None:
    gb = result.get("setup", {}).get("memory_budget_gb")
    return None if gb is None else float(gb) * GiB  # the search's "GB" are GiB


def _unit_stages(result: Mapping[str, Any]) -> dict[str, int]:
    """Unit -> its (virtual) stage, from the plan's stage starts."""
    starts = list(result["plan"].get("pipeline", {}).get("stage_starts", []))
    stage, out = 0, {}
    for row in result["plan"]["strategies"]:
        if stage < len(starts) and row["unit"] == starts[stage]:
            stage += 1
        out[row["unit"]] = stage
    return out


def _memory_rows(result: Mapping[str, Any]) -> list[tuple[float, float]]:
    """Per pipeline rank: (model-state bytes, the rest of its peak: activations and the
    largest transient)."""
    degree = _pipeline(result)[0]
    peaks = [float(x) for x in result["predicted"]["peak_memory_bytes"]]
    states = [0.0] * len(peaks)
    stages = _unit_stages(result)
    for row in result.get("units", []):
        rank = int(row.get("stage", stages.get(row["unit"], 0))) % degree
        if rank < len(states):
            states[rank] += float(row.get("state_bytes") or 0.0)
    return [(min(s, peak), max(peak - s, 0.0)) for s, peak in zip(states, peaks, strict=True)]


def _baseline_rows(result: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """("this plan", its samples/s) first, then every baseline (None: does not fit)."""
    baselines = result.get("baselines", {}).items()
    rest = [(str(name), None if sps is None else float(sps)) for name, sps in baselines]
    return [("this plan", float(result["predicted"]["samples_per_s"])), *rest]


def _timeline(result: Mapping[str, Any]) -> list[Box]:
    degree, _, m, schedule = _pipeline(result)
    times = result["predicted"]["stage_time_per_micro_batch_s"]
    return simulate_schedule([float(t) for t in times], m, schedule, degree)


def _ticks(top: float, count: int = 6) -> list[float]:
    """Round tick values from 0 to the first at or past `top` (steps of 1, 2 or 5 x 10^k)."""
    if top <= 0:
        return [0.0]
    raw = top / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(f for f in (1, 2, 5, 10) if f * step >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


# ---- HTML ---------------------------------------------------------------------------------

_CSS = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #1d2733; max-width: 1180px; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; } .card .k { font-size: 11px; color: #5b6b7c; }
.card { border: 1px solid #d5dde6; border-radius: 6px; padding: 6px 10px; min-width: 120px; }
.card .v { font-size: 15px; font-weight: 600; } table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #e3e8ee; padding: 3px 7px; text-align: left; }
th { background: #f2f5f8; } td:nth-child(2) { white-space: nowrap; } td.n { text-align: right; } tr.first td { border-top: 2px solid #8a9bb0; }
td.memory { color: #b42318; font-weight: 600; } .note { color: #5b6b7c; font-size: 11px; }
p.explain { font-size: 12px; color: #3b4a5a; } svg { display: block; max-width: 100%; height: auto; }
"""


def render_html(result: Mapping[str, Any], *, title: str = "galvatron-fx plan report") -> str:
    """The whole report as one HTML page (inline CSS and SVG, nothing to fetch)."""
    if "predicted" not in result or "plan" not in result:
        raise ValueError("not a search result: write it with galvatron-fx plan --json")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        _summary_html(result),
    ]
    for heading, section in (
        ("Strategy per layer", _table_html),
        ("Peak memory per pipeline stage", _memory_svg),
        ("Pipeline timeline (one step)", _timeline_html),
        ("Baselines (same cost model)", _baselines_svg),
    ):
        parts += [f"<h2>{escape(heading)}</h2>", section(result)]
    return "\n".join([*parts, "</body></html>\n"])


def _summary_html(result: Mapping[str, Any]) -> str:
    plan, pred, setup = result["plan"], result["predicted"], result.get("setup", {})
    degree, chunks, m, schedule = _pipeline(result)
    budget = setup.get("memory_budget_gb")
    cells = [
        ("model fingerprint", plan.get("model_fingerprint", "?")),
        ("cluster", setup.get("cluster", "?")),
        ("world size", plan.get("world_size", setup.get("world_size", "?"))),
        ("memory budget", "?" if budget is None else f"{float(budget):g} GiB / device"),
        ("global batch", setup.get("global_batch", "?")),
        ("precision", setup.get("precision", "?")),
        ("pipeline", f"{degree} stage(s) x {chunks} chunk(s), {m} micro-batch(es), {schedule}"),
        ("predicted step time", f"{float(pred['step_time_s']) * 1e3:.2f} ms"),
        ("samples/s", f"{float(pred['samples_per_s']):.2f}"),
        ("TFLOP/s per device", f"{float(pred.get('tflops_per_device', 0.0)):.1f}"),
    ]
    body = "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(str(v))}'
        "</div></div>"
        for k, v in cells
    )
    return f'<div class="cards">{body}</div>'


_COLUMNS = (
    "unit", "stage", "tp", "sp", "dp", "dp mode", "recompute", "vocab-parallel",
    "time / micro-batch (ms)", "state (MiB)", "activations (MiB)", "runner-up", "binding",
)  # fmt: skip


def _table_html(result: Mapping[str, Any]) -> str:
    degree, chunks = _pipeline(result)[:2]
    explained = {row["unit"]: row for row in result.get("units", [])}
    stages = _unit_stages(result)
    rows, previous = [], -1
    for s in result["plan"]["strategies"]:
        x = explained.get(s["unit"], {})
        k = int(x.get("stage", stages[s["unit"]]))
        stage = f"{k} (rank {k % degree})" if chunks > 1 else str(k)
        cells = [
            escape(str(s["unit"])), escape(stage), str(s.get("tp", 1)), _sp_kind(s),
            str(s.get("dp", 1)), escape(str(s.get("dp_mode", ""))),
            escape(str(s.get("recompute", ""))), _yes(s.get("vocab_parallel")),
        ]  # fmt: skip
        tds = "".join(f"<td>{c}</td>" for c in cells) + _explained_cells(x)
        css = ' class="first"' if k != previous and previous >= 0 else ""
        rows.append(f"<tr{css}>{tds}</tr>")
        previous = k
    head = "".join(f"<th>{escape(c)}</th>" for c in _COLUMNS)
    return (
        f'<table class="units"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _sp_kind(s: dict[str, Any]) -> str:
    """The sequence split of a unit: Megatron-SP inside its TP group, or Ulysses."""
    return "Ulysses" if s.get("ulysses") else "Megatron" if s.get("sp") else ""


def _yes(flag: Any) -> str:
    return "yes" if flag else "-"


def _explained_cells(x: Mapping[str, Any]) -> str:
    """Time, memory, runner-up and binding constraint (blank for a plan without them)."""

    def num(value: Any, scale: float, fmt: str) -> str:
        return "" if value is None else format(float(value) / scale, fmt)

    runner = str(x.get("runner_up") or "-")
    if x.get("runner_up_delta_s") is not None:
        runner += f" ({float(x['runner_up_delta_s']) * 1e3:+.3g} ms/step)"
    binding = str(x.get("binding", ""))
    note = escape(str(x.get("note", "")))
    why = f'<div class="note">{note}</div>' if binding == "memory" else ""
    return (
        f'<td class="n">{num(x.get("time_per_micro_batch_s"), 1e-3, ".3f")}</td>'
        f'<td class="n">{num(x.get("state_bytes"), 2**20, ".1f")}</td>'
        f'<td class="n">{num(x.get("activation_bytes"), 2**20, ".1f")}</td>'
        f"<td>{escape(runner)}</td>"
        f'<td class="{escape(binding)}" title="{note}">{escape(binding)}{why}</td>'
    )


def _text(
    x: float, y: float, text: str, size: int = 12, anchor: str = "start", **attrs: str
) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{escape(text)}</text>"
    )


def _rect(x: float, y: float, w: float, h: float, fill: str, inner: str = "", **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    head = f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(w, 0.0):.2f}" height="{h}" fill="{fill}"'
    return f"{head}{extra}>{inner}</rect>" if inner else f"{head}{extra}/>"


def _svg(cls: str, height: float, body: Sequence[str]) -> str:
    return (
        f'<svg class="{cls}" viewBox="0 0 1000 {height:.0f}" width="1000" height="{height:.0f}">'
        + "".join(body)
        + "</svg>"
    )


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> str:
    out = []
    for colour, text in items:
        out += [_rect(x, y - 10, 12, 12, colour), _text(x + 17, y, text)]
        x += 30 + 7 * len(text)
    return "".join(out)


def _memory_svg(result: Mapping[str, Any]) -> str:
    rows, budget = _memory_rows(result), _budget_bytes(result)
    largest = max([s + r for s, r in rows] + [budget or 0.0]) or 1.0
    left, row_h, scale = 90, 30, 640 / (largest * 1.12)  # scale: px per byte
    height = 70 + row_h * len(rows)
    label_x = left + largest * scale + 10  # one column right of the bars and the budget
    out = [
        _memory_bar(k, state, rest, budget, (left, 30 + k * row_h, label_x), scale)
        for k, (state, rest) in enumerate(rows)
    ]
    if budget is not None:
        bx, bottom = left + budget * scale, 30 + row_h * len(rows)
        out.append(
            f'<line class="budget" x1="{bx:.1f}" x2="{bx:.1f}" y1="18" y2="{bottom}" '
            'stroke="#d62728" stroke-width="2" stroke-dasharray="6 3"/>'
        )
        out.append(_text(bx, 12, f"budget {budget / GiB:g} GiB", anchor="middle", fill="#d62728"))
    items = [("#4e79a7", "model states"), ("#f28e2b", "activations + largest transient")]
    return _svg("memory", height, [*out, _legend(items, left, height - 12)])


def _memory_bar(
    k: int, state: float, rest: float, budget: float | None, at: tuple[float, ...], scale: float
) -> str:
    """One stage's bar (`at`: its left, top, and its label's left): states and the rest
    stacked, outlined in red over the budget."""
    left, y, label_x = at
    total = state + rest
    over = budget is not None and total > budget
    label = f"{total / GiB:.2f} GiB" + (f" ({total / budget:.0%} of budget)" if budget else "")
    parts = [
        f'<g class="mem-bar{" over" if over else ""}" data-stage="{k}">',
        _text(left - 8, y + 15, f"stage {k}", anchor="end"),
        _rect(left, y, state * scale, 20, "#4e79a7", f"<title>model states {state / GiB:.2f} GiB</title>"),
        _rect(left + state * scale, y, rest * scale, 20, "#f28e2b",
              f"<title>activations and transients {rest / GiB:.2f} GiB</title>"),
    ]  # fmt: skip
    if over:
        parts.append(
            _rect(left, y - 2, total * scale, 24, "none", stroke="#d62728", stroke_width="3")
        )
        parts.append(
            _text(label_x, y + 15, label + " OVER BUDGET", fill="#d62728", font_weight="bold")
        )
    else:
        parts.append(_text(label_x, y + 15, label))
    return "".join(parts) + "</g>"


def _timeline_html(result: Mapping[str, Any]) -> str:
    degree, chunks, m, schedule = _pipeline(result)
    try:
        boxes = _timeline(result)
    except ValueError as err:
        return f'<p class="explain">No timeline: {escape(str(err))}</p>'
    makespan = max(b.end_s for b in boxes)
    step = float(result["predicted"]["step_time_s"])
    text = (
        f"One box per micro-batch, forward (F, light) and backward (B, dark), on each "
        f"pipeline rank, in the order the {schedule} schedule runs them. A box's width is the "
        f"search's time per micro-batch of its stage (its layers, layout switches, stage-"
        f"boundary transfers and the once-a-step gradient sync and optimizer spread over the "
        f"{m} micro-batches), {1 - BACKWARD_SHARE:.0%} forward and {BACKWARD_SHARE:.0%} "
        f"backward. A forward waits for the previous stage's, a backward for the next stage's."
    )
    if chunks > 1:
        text += f" Each rank holds {chunks} model chunks (colours); box numbers: micro-batch."
    if schedule == "interleaved-zb":
        text += " Zero-bubble is drawn, as the search prices it, as interleaved 1F1B."
    if schedule == "1f1b" and m < degree:
        text += " With fewer micro-batches than stages the runtime runs GPipe."
    if abs(makespan - step) > 1e-6 * step:
        text += (
            f" The search's step time (equation (1) of search/dp.py: the stage times over the"
            f" chunks, (m x chunks - 1) times the second slowest, and m - 1/chunks times the"
            f" slowest's excess over it; the dotted line) is {step * 1e3:.3f} ms;"
            f" this simulation's makespan is {makespan * 1e3:.3f} ms."
        )
    else:
        text += f" Makespan {makespan * 1e3:.3f} ms = the search's step time."
    return f'<p class="explain">{escape(text)}</p>' + _timeline_svg(boxes, degree, step)


def _timeline_svg(boxes: Sequence[Box], degree: int, step_s: float) -> str:
    """The boxes on one row per pipeline rank, a time axis, and the search's step time."""
    end_s = max(step_s, *(b.end_s for b in boxes))
    ticks_ms = _ticks(end_s * 1e3)
    left, top, row_h = 70, 10, 30
    scale = 900 / max(ticks_ms[-1] / 1e3, end_s)  # px per second
    axis_y = top + degree * row_h + 4
    out = [_text(left - 8, top + r * row_h + 17, f"stage {r}", anchor="end") for r in range(degree)]
    out += [_box_svg(b, degree, left + b.start_s * scale, top, row_h, scale) for b in boxes]
    sx = left + step_s * scale
    out.append(
        f'<line class="step" x1="{sx:.1f}" x2="{sx:.1f}" y1="{top - 4}" y2="{axis_y}" '
        'stroke="#000" stroke-dasharray="2 2"/>'
        f'<line x1="{left}" x2="{left + 900}" y1="{axis_y}" y2="{axis_y}" stroke="#333"/>'
    )
    for t in ticks_ms:
        tx = left + t / 1e3 * scale
        out.append(
            f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{axis_y}" y2="{axis_y + 4}" stroke="#333"/>'
        )
        out.append(_text(tx, axis_y + 16, f"{t:g}", 11, "middle"))
    out.append(_text(left + 900, axis_y + 30, "ms", 11, "end"))
    chunks = sorted({b.stage // degree for b in boxes})
    items = [(_FWD[0], "forward"), (_BWD[0], "backward"), ("#000", "search's step time (dotted)")]
    if len(chunks) > 1:
        items = [(_BWD[c % len(_BWD)], f"chunk {c}") for c in chunks] + items
    return _svg("timeline", axis_y + 60, [*out, _legend(items, left, axis_y + 46)])


def _box_svg(b: Box, degree: int, x0: float, top: float, row_h: float, scale: float) -> str:
    """One box on its rank's row, numbered with its micro-batch when there is room."""
    y = top + (b.stage % degree) * row_h
    colour = (_FWD if b.kind == "F" else _BWD)[(b.stage // degree) % len(_FWD)]
    w = (b.end_s - b.start_s) * scale
    tip = f"stage {b.stage} {b.kind}{b.micro_batch}: {b.start_s * 1e3:.3f}-{b.end_s * 1e3:.3f} ms"
    kind = "fwd" if b.kind == "F" else "bwd"
    attrs = {"class": f"box {kind}", "data_stage": str(b.stage), "data_mb": str(b.micro_batch)}
    box = _rect(x0, y, w, 24, colour, f"<title>{escape(tip)}</title>", stroke="#fff", **attrs)
    if w < 7 * len(str(b.micro_batch)) + 4:
        return box
    ink = "#10202f" if b.kind == "F" else "#fff"
    return box + _text(x0 + w / 2, y + 16, str(b.micro_batch), 10, "middle", fill=ink)


def _baselines_svg(result: Mapping[str, Any]) -> str:
    rows = _baseline_rows(result)
    plan_sps = rows[0][1] or 0.0
    left, row_h, scale = 170, 26, 560 / (max(s or 0.0 for _, s in rows) * 1.05 or 1.0)
    out = []
    for i, (name, sps) in enumerate(rows):
        y = 6 + i * row_h
        out.append(f'<g class="baseline" data-name="{escape(name)}">')
        out.append(_text(left - 8, y + 14, name, anchor="end"))
        if sps is None:
            out.append(_text(left + 4, y + 14, "does not fit", fill="#888") + "</g>")
            continue
        label = f"{sps:.1f} samples/s" + (f", plan / this = {plan_sps / sps:.2f}x" if i else "")
        out.append(_rect(left, y, sps * scale, 18, "#e15759" if i == 0 else "#76b7b2"))
        out.append(_text(left + sps * scale + 6, y + 14, label) + "</g>")
    return _svg("baselines", 10 + row_h * len(rows), out)


# ---- PNG ----------------------------------------------------------------------------------


def save_pngs(result: Mapping[str, Any], out: Path) -> list[Path]:
    """memory.png, timeline.png and baselines.png under `out`, drawn by matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "--png needs matplotlib: pip install matplotlib (or the bench extra: "
            "pip install 'galvatron-fx[bench]')"
        ) from err
    written = []
    for name, draw in (
        ("memory", _draw_memory),
        ("timeline", _draw_timeline),
        ("baselines", _draw_baselines),
    ):
        fig = Figure(figsize=(10, 3.2), dpi=110, layout="constrained")
        draw(fig.add_subplot(), result)
        written.append(_atomic(out / f"{name}.png", functools.partial(fig.savefig, format="png")))
    return written


def _draw_memory(ax: Any, result: Mapping[str, Any]) -> None:
    rows, budget = _memory_rows(result), _budget_bytes(result)
    ys = range(len(rows))
    states, rests = [s / GiB for s, _ in rows], [r / GiB for _, r in rows]
    ax.barh(ys, states, color="#4e79a7", label="model states")
    ax.barh(ys, rests, left=states, color="#f28e2b", label="activations + transient")
    for k, (s, r) in enumerate(zip(states, rests, strict=True)):
        over = budget is not None and (s + r) * GiB > budget
        text = f" {s + r:.2f} GiB" + (" OVER BUDGET" if over else "")
        ax.text(s + r, k, text, va="center", color="#d62728" if over else "black")
    if budget is not None:
        ax.axvline(budget / GiB, color="#d62728", ls="--", label=f"budget {budget / GiB:g} GiB")
    ax.set_yticks(list(ys), [f"stage {k}" for k in ys])
    ax.invert_yaxis()
    ax.margins(x=0.18)
    ax.set(xlabel="GiB per device (search's upper bound)", title="Peak memory per stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def _draw_timeline(ax: Any, result: Mapping[str, Any]) -> None:
    degree = _pipeline(result)[0]
    boxes = _timeline(result)
    end_ms = max(b.end_s for b in boxes) * 1e3
    for b in boxes:
        colour = (_FWD if b.kind == "F" else _BWD)[(b.stage // degree) % len(_FWD)]
        width_ms = (b.end_s - b.start_s) * 1e3
        ax.barh(b.stage % degree, width_ms, left=b.start_s * 1e3, color=colour, ec="white", lw=0.5)
        if width_ms > 0.012 * end_ms * len(str(b.micro_batch)):  # room for its number
            ink = "black" if b.kind == "F" else "white"
            ax.text((b.start_s * 1e3 + width_ms / 2), b.stage % degree, str(b.micro_batch),
                    ha="center", va="center", fontsize=7, color=ink)  # fmt: skip
    step = float(result["predicted"]["step_time_s"]) * 1e3
    ax.axvline(step, color="black", ls=":", label=f"search's step time {step:.2f} ms")
    ax.set_yticks(range(degree), [f"stage {r}" for r in range(degree)])
    ax.invert_yaxis()
    _, chunks, _, schedule = _pipeline(result)
    colours = "; green, purple, orange: later model chunks" if chunks > 1 else ""
    xlabel = f"ms into the step; light: forward, dark: backward; numbers: micro-batch{colours}"
    ax.set(xlabel=xlabel, title=f"Pipeline timeline ({schedule})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def _draw_baselines(ax: Any, result: Mapping[str, Any]) -> None:
    rows = _baseline_rows(result)
    plan_sps = rows[0][1] or 0.0
    for i, (_, sps) in enumerate(rows):
        if sps is None:
            ax.text(0, i, " does not fit", va="center", color="#888")
            continue
        ax.barh(i, sps, color="#e15759" if i == 0 else "#76b7b2")
        ax.text(
            sps, i, f" {sps:.1f}" + (f"  (plan {plan_sps / sps:.2f}x)" if i else ""), va="center"
        )
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.margins(x=0.25)
    ax.set(xlabel="predicted samples/s", title="Plan against baselines (same cost model)")


def write_report(
    result: Mapping[str, Any], *, html: Path | None = None, png: Path | None = None
) -> list[Path]:
    """The HTML page to `html` and the PNG charts under `png` (each optional)."""
    page = None if html is None else render_html(result)  # before writing anything
    written = []
    if html is not None and page is not None:
        written.append(_atomic(html, lambda tmp: tmp.write_text(page, encoding="utf-8")))
    if png is not None:
        written += save_pngs(result, png)
    return written


def _atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Write through `path.tmp` and a rename: a failure leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path
