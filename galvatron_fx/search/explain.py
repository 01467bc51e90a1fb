"""Why the search chose what it chose: runner-ups, binding constraints, plan diffs, and the
smallest memory any plan needs when nothing fits.

For every unit, each other candidate is tried in its place with the rest of the plan fixed
(its stage re-priced: switches to its neighbours, the stage's memory): the runner-up is the
best alternative that still fits, and the binding constraint is `memory` when a faster
alternative exists but its stage would not fit, `time` otherwise. Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from galvatron_fx.plan import LayerStrategy
from galvatron_fx.search.dp import Problem, balanced_cut, bucketed, stage_cost, step_time
from galvatron_fx.search.planner import Searched, SearchSpace, configs

__all__ = ["diff_plans", "explain_units", "format_explain", "smallest_memory"]

GiB = 2**30


def explain_units(space: SearchSpace, best: Searched) -> list[dict[str, Any]]:
    problem = space.problem(best.config)
    if problem is None:
        return []
    sol = best.solution
    b = bucketed(problem)
    bounds = [*sol.stage_starts, len(problem.units)]
    stage_of = np.searchsorted(bounds, np.arange(len(problem.units)), side="right") - 1
    rows = []
    for i, unit in enumerate(space.terms.units):
        k = int(stage_of[i])
        rows.append(_unit_row(problem, b, sol, bounds, k, i, unit))
    return rows


def _unit_row(
    problem: Problem, b: Any, sol: Any, bounds: list[int], k: int, i: int, unit: str
) -> dict[str, Any]:
    u = problem.units[i]
    picked = list(sol.choice[bounds[k] : bounds[k + 1]])
    chosen = sol.choice[i]
    limit = b.capacity * b.bucket_bytes
    best_alt: tuple[float, int] | None = None
    faster_blocked: tuple[float, int, float] | None = None
    for s in range(len(u.strategies)):
        if s == chosen:
            continue
        trial = list(picked)
        trial[i - bounds[k]] = s
        t, mem = stage_cost(problem, b, k, bounds[k], trial)
        times = list(sol.stage_time_s)
        times[k] = t
        T = step_time(times, problem.micro_batches, problem.chunks)
        if mem <= limit * (1 + 1e-12):
            if best_alt is None or best_alt[0] > T:
                best_alt = (T, s)
        elif sol.time_s > T and (faster_blocked is None or faster_blocked[0] > T):
            faster_blocked = (T, s, mem - limit)
    row: dict[str, Any] = {
        "unit": unit,
        "stage": k,
        "strategy": u.strategies[chosen].short(),
        "time_per_micro_batch_s": float(u.time_s[chosen]),
        "state_bytes": float(u.state_bytes[chosen]),
        "activation_bytes": float(u.act_bytes[chosen]),
        "runner_up": None,
        "runner_up_delta_s": None,
        "binding": "time",
        "note": "the fastest choice for this unit given its neighbours",
    }
    if best_alt is not None:
        row["runner_up"] = u.strategies[best_alt[1]].short()
        row["runner_up_delta_s"] = best_alt[0] - sol.time_s
    if faster_blocked is not None:
        T, s, over = faster_blocked
        row["binding"] = "memory"
        row["note"] = (
            f"{u.strategies[s].short()} would save {(sol.time_s - T) * 1e3:.3g} ms a step "
            f"but stage {k} would need {over / GiB:.2f} GiB more than the budget"
        )
    return row


def format_explain(data: Mapping[str, Any]) -> str:
    """Text for `galvatron-fx explain`: one line per unit, runs of equal rows folded."""
    lines = [f"{'unit':<30}{'strategy':<28}{'runner-up':<28}{'delta ms':>9}  why"]
    runs: list[tuple[str, str, tuple[str, ...]]] = []
    for row in data.get("units", []):
        delta = row.get("runner_up_delta_s")
        delta_text = f"{delta * 1e3:+.3g}" if delta is not None else "-"
        cells = (
            row["strategy"], row["runner_up"] or "-", delta_text,
            f"{row['binding']}: {row['note']}", str(row.get("stage", 0)),
        )  # fmt: skip
        if runs and runs[-1][2] == cells:
            runs[-1] = (runs[-1][0], row["unit"], cells)
        else:
            runs.append((row["unit"], row["unit"], cells))
    for first, last, (strategy, runner, delta_text, why, _) in runs:
        name = first if first == last else f"{first} .. {last}"
        lines.append(f"{name:<30}{strategy:<28}{runner:<28}{delta_text:>9}  {why}")
    return "\n".join(lines)


def diff_plans(
    a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str] = ("A", "B")
) -> str:
    """Two search results (or plans) side by side, unit by unit, and their predictions."""
    pa, pb = a.get("plan", a), b.get("plan", b)
    sa = {row["unit"]: row for row in pa["strategies"]}
    sb = {row["unit"]: row for row in pb["strategies"]}
    lines = [f"{'unit':<26}{names[0]:<34}{names[1]}"]
    for unit in list(sa) + [u for u in sb if u not in sa]:
        x, y = _short(sa.get(unit)), _short(sb.get(unit))
        mark = "  " if x == y else "* "
        lines.append(f"{mark}{unit:<24}{x:<34}{y}")
    for label, p in ((names[0], pa), (names[1], pb)):
        pipe = p.get("pipeline", {})
        lines.append(
            f"{label}: pipeline {pipe.get('degree', 1)} x {pipe.get('virtual_stages', 1)}, "
            f"{pipe.get('micro_batches', 1)} micro-batches, {pipe.get('schedule', '1f1b')}"
        )
    for key in ("step_time_s", "samples_per_s", "tflops_per_device"):
        if key in a.get("predicted", {}) and key in b.get("predicted", {}):
            va, vb = a["predicted"][key], b["predicted"][key]
            lines.append(f"{key}: {va:.4g} vs {vb:.4g} ({(vb / va - 1) * 100:+.1f}%)")
    return "\n".join(lines)


def _short(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "(absent)"
    fields = {k: v for k, v in row.items() if k != "unit"}
    return LayerStrategy(**fields).short()


def smallest_memory(space: SearchSpace, budget_gb: float) -> str:
    """The error when nothing fits: the least memory any configuration needs (every unit at
    its smallest candidate, stages cut to balance memory), and what fills its fullest stage."""
    best: tuple[float, Any, str] | None = None
    for config in configs(space.world, len(space.terms.units), space.global_batch):
        problem = space.problem(config, prune=False)
        if problem is None:
            continue
        need, what = _least_for(problem, space.terms.units, space.terms.representative)
        if best is None or need < best[0]:
            best = (need, config, what)
    if best is None:
        return "search: no candidate strategy applies (check the batch size and world size)"
    need, config, what = best
    return (
        f"search: no plan fits {budget_gb:g} GB per device; the smallest needs about "
        f"{_size(need)} (pipeline {config.pipeline}, {config.micro_batches} "
        f"micro-batches). {what} Raise the budget, use more devices, or lower the global batch."
    )


def _least_for(
    problem: Problem, names: Sequence[str], representative: Mapping[str, str]
) -> tuple[float, str]:
    """(least bytes per device, what dominates the fullest stage)."""
    least = [np.array([_least(u, a) for u in problem.units]) for a in problem.in_flight]
    need, starts = balanced_cut(least)
    bounds = [*starts, len(problem.units)]
    sizes = [least[k][bounds[k] : bounds[k + 1]].sum() for k in range(problem.stages)]
    k = int(np.argmax(sizes))
    return need * problem.chunks, _dominant(problem, names, representative, bounds, k)


def _dominant(
    problem: Problem,
    names: Sequence[str],
    representative: Mapping[str, str],
    bounds: list[int],
    k: int,
) -> str:
    a = problem.in_flight[k]
    groups: dict[str, list[int]] = {}
    for i in range(bounds[k], bounds[k + 1]):
        groups.setdefault(representative[names[i]], []).append(i)
    members = max(groups.values(), key=lambda g: sum(_least(problem.units[i], a) for i in g))
    u = problem.units[members[0]]
    s = int(np.argmin(u.state_bytes + a * u.act_bytes + u.transient_bytes))
    label = (
        names[members[0]]
        if len(members) == 1
        else f"{len(members)} units like {names[members[0]]!r}"
    )
    return (
        f"Stage {k} is the fullest; most of it is {label}, each at least "
        f"{_size(u.state_bytes[s])} of parameters, gradients and optimizer states and "
        f"{_size(a * u.act_bytes[s])} of activations ({a:g} micro-batches in flight)."
    )


def _size(num_bytes: float) -> str:
    """Bytes in the unit that shows them best: a tiny model's needs are not "0.00 GiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 2**10:.1f} KiB"


def _least(u: Any, a: float) -> float:
    return float((u.state_bytes + a * u.act_bytes + u.transient_bytes).min())
