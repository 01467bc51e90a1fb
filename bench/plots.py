"""The suite's PNG plots, one function per section (matplotlib, the `bench` extra).

Each takes the section's JSON (as `bench/results/latest.json` holds it) and a path, and
returns whether it wrote the file: without matplotlib the report still has every table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


def runtime(data: dict[str, Any], path: Path) -> bool:
    """Median ratio per case with its min-max range; the line at 1.0 is parity."""
    plt = _pyplot()
    cases = [(k, c) for k, c in data["cases"].items() if c["median"] is not None]
    if plt is None or not cases:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    xs = range(len(cases))
    med = [c["median"] for _, c in cases]
    low = [c["median"] - c["min"] for _, c in cases]
    high = [c["max"] - c["median"] for _, c in cases]
    ax.bar(xs, med, yerr=[low, high], capsize=5, color="#4c72b0")
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xticks(list(xs), [f"{k}\nvs {c['baseline']}" for k, c in cases])
    ax.set_ylabel("step time: ours / PyTorch")
    ax.set_title(f"Runtime overhead ({data['repeats']} runs: median, min-max)")
    return _save(fig, path)


def cost_model(data: dict[str, Any], path: Path) -> bool:
    """Predicted against measured step time (one colour per group: in-sample, held-out
    plans, shape, model) and peak memory, with y = x; plans that failed are left out."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [r for r in data["rows"] if "error" not in r]  # the report names the failed ones
    if not rows:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.4))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    colours = plt.get_cmap("tab10")
    for k, g in enumerate(groups):
        mine = [r for r in rows if r["group"] == g]
        a.scatter(
            [1e3 * r["measured_s"] for r in mine],
            [1e3 * r["predicted_s"] for r in mine],
            s=22, color=colours(k), zorder=3, label=g,
        )  # fmt: skip
    t_pred = [1e3 * r["predicted_s"] for r in rows]
    t_meas = [1e3 * r["measured_s"] for r in rows]
    _diagonal(a, t_meas + t_pred)
    a.set(xlabel="measured step time (ms)", ylabel="predicted (ms)")
    held, fit = data["held_out"]["median_error"], data["in_sample"]["median_error"]
    a.set_title(f"time: held-out median |err| {_pct(held)}, in-sample {_pct(fit)}", fontsize=10)
    m_pred = [p / 2**20 for r in rows for p in r["predicted_peak_bytes"]]
    m_meas = [m / 2**20 for r in rows for m in r["measured_peak_bytes"]]
    _scatter(b, m_meas, m_pred, None)
    b.set(xlabel="measured peak memory per rank (MiB)", ylabel="predicted (MiB)")
    b.set_title(
        f"memory: median |err| {_pct(data['memory_median_error'], 1)}, "
        f"worst {_pct(data['memory_worst_error'], 1)}"
    )
    return _save(fig, path)


def _pct(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}%}"


def _diagonal(ax: Any, values: list[float]) -> None:
    lo, hi = min(values) * 0.9, max(values) * 1.1
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)


def _scatter(ax: Any, x: list[float], y: list[float], labels: list[str] | None) -> None:
    ax.scatter(x, y, s=22, color="#dd8452", zorder=3)
    for label, xi, yi in zip(labels or [], x, y, strict=False):
        ax.annotate(
            label, (xi, yi), fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points"
        )
    _diagonal(ax, x + y)


def search(data: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    layers, devices = data["layers"], data["devices"]
    a.plot([r["layers"] for r in layers], [r["search_time_s"] for r in layers], "o-")
    a.set(xlabel="layers (hidden 4096, 64 devices)", ylabel="search time (s)", xscale="log")
    b.plot([r["devices"] for r in devices], [r["search_time_s"] for r in devices], "o-")
    b.set(xlabel="devices (GPT-13B shape)", ylabel="search time (s)", xscale="log")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plan_quality(data: dict[str, Any], path: Path) -> bool:
    """Per cap, auto's measured throughput over each baseline's (missing: does not fit)."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if "ratios" in r]
    if plt is None or not rows:
        return False
    names = list(rows[0]["ratios"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + k * width for i, r in enumerate(rows) if r["ratios"][name] is not None]
        ys = [r["ratios"][name] for r in rows if r["ratios"][name] is not None]
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(rows))],
        [f"cap {r['cap_gb'] * 1024:.0f} MiB" for r in rows],
    )
    ax.set_ylabel("auto samples/s / baseline's (measured)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Plan quality on local ranks (>= 1: auto at least as fast)")
    return _save(fig, path)


def compile_time(data: dict[str, Any], path: Path) -> bool:
    """One stacked bar per case, a segment per compile step."""
    plt = _pyplot()
    if plt is None:
        return False
    cases = list(data["cases"].items())
    steps = list(dict.fromkeys(k for _, t in cases for k in t))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    left = [0.0] * len(cases)
    cmap = plt.get_cmap("tab20")
    for k, step in enumerate(steps):
        widths = [t.get(step, 0.0) for _, t in cases]
        ax.barh(range(len(cases)), widths, left=left, label=step, color=cmap(k % 20))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(cases)), [c for c, _ in cases], fontsize=8)
    ax.set_xlabel("compile() wall time (s)")
    ax.legend(fontsize=6, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return _save(fig, path)
