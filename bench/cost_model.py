"""Cost model against measurement, on plans, shapes and a model the layer profile did not see.

Profiles this machine (`galvatron-fx profile`, cached), then the layer times of the reference
GPT (`SPEC`, batch 8, seq 128) under a subset of strategies only (`PROFILED`). Every plan
below is then predicted by `price_plan` for rank 0 on the `local` cluster, with that layer
table and, for every unit it has no entry for, the roofline at the efficiency the profiled
units show (`measured_efficiency`), and measured on local gloo ranks (median step of the
slowest rank, the fastest of `--rounds` rounds taken round-robin over the plans). The plans:

- the reference GPT under plans whose every unit the profile timed (`in-sample`: the profile
  reconstructing what it measured) and under plans none of whose units it timed (`held-out
  plans`);
- the same GPT family at another hidden size, sequence length and batch (`held-out shape`);
- a llama-style HF model (`held-out model`) the profile never saw.

A row's group is read off the layer table's keys (how many of the plan's units it has an
entry for), not declared. The target figure is the median |error| over the held-out rows;
beside it the in-sample error and the roofline-only error (no layer table at all, at the same
efficiency: what the search itself prices with). Spearman's rank correlation is taken within
each held-out group (plans of one model and shape). Peak memory per rank: the PyTorch
profiler's allocation events over one more step (`runtime/memory_probe.py`) against
`plan_peak`, every rank of every plan; the worst rank's error is shown. A plan that fails to
price or to run is a row with its error, and every target reads "missed" (`verdicts`).

    python bench/cost_model.py               # 22 plans on 4 ranks
    python bench/cost_model.py --smoke       # 4 plans on 2 ranks, for the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pytorch_side import ensure_profile, seeded
from runtime import last_line

import galvatron_fx as gfx
from galvatron_fx.cli import parse_strategy
from galvatron_fx.cost_models.hardware import ClusterSpec, load_cluster
from galvatron_fx.cost_models.layer_times import LayerTimes
from galvatron_fx.planning.layer_profile import profile_layers
from galvatron_fx.planning.price import measured_efficiency, plan_peak, price_plan
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.memory_probe import measure_step_memory
from galvatron_fx.runtime.profiler import DEFAULT_PROFILE

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=1024,seq=128"
LLAMA = (
    "hf:llama:hidden_size=256,intermediate_size=688,num_hidden_layers=4,num_attention_heads=8,"
    "num_key_value_heads=4,vocab_size=1024"
)


@dataclass(frozen=True)
class Shape:
    """One model at one batch and sequence length, and the plans run on it."""

    spec: str
    batch: int
    seq: int
    plans: tuple[str, ...]
    label: str
    """`profiled`: the model and shape the layer profile measured; otherwise the group name."""


PROFILED = ("dp=4", "dp=4,zero=3", "tp=2,dp=2", "tp=4")
"""The strategies the layer profile measures on `SPEC` (ZeRO-1/2 share plain DP's entry)."""
SHAPES = (
    Shape(
        SPEC, 8, 128,
        ("dp=4", "dp=4,zero=1", "dp=4,zero=2", "dp=4,zero=3", "tp=2,dp=2", "tp=4",
         "dp=4,ckpt=full", "tp=2,dp=2,sp=1", "tp=2,dp=2,zero=3,ckpt=selective",
         "tp=4,sp=1,ckpt=full", "tp=2,dp=2,strided=1", "tp=4,sp=1,vocab=1"),
        "profiled",
    ),
    Shape(
        "gpt:layers=4,hidden=384,heads=12,vocab=1024,seq=64", 16, 64,
        ("dp=4", "dp=4,zero=3,ckpt=full", "tp=2,dp=2,sp=1", "tp=4", "tp=4,sp=1,ckpt=selective"),
        "held-out shape",
    ),
    Shape(
        LLAMA, 8, 128,
        ("dp=4", "dp=4,zero=3", "tp=2,dp=2,sp=1", "tp=4", "tp=2,dp=2,ckpt=full"),
        "held-out model",
    ),
)  # fmt: skip
SMOKE_PROFILED = ("dp=2",)
SMOKE_SHAPES = (
    Shape(SPEC, 8, 32, ("dp=2", "tp=2,sp=1"), "profiled"),
    Shape("gpt:layers=2,hidden=128,heads=4,vocab=256,seq=16", 4, 16, ("dp=2",), "held-out shape"),
    Shape(
        "hf:llama:hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,"
        "num_key_value_heads=2,vocab_size=128", 4, 32, ("dp=2",), "held-out model",
    ),
)  # fmt: skip
HELD_OUT = ("held-out plans", "held-out shape", "held-out model")
TARGETS = {"held_out_median_error": 0.10, "held_out_spearman": 0.9, "memory_worst_error": 0.05}


def _analysis(spec: str, batch: int, seq: int) -> tuple[gfx.Analysis, tuple, dict]:
    model, args, kwargs = seeded(spec, batch, seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gfx.analyze(model, args, kwargs), args, kwargs


def _measure(
    rank: int, world: int, analysis: gfx.Analysis, args: tuple, kwargs: dict, text: str, steps: int
) -> tuple[float, int]:
    """(median step time of the slowest rank, this rank's peak bytes over one more step).
    The analysis comes from the parent through the fork: every rank lowers its own copy."""
    plan = analysis.plan(parse_strategy(text), world_size=world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = gfx.parallelize(analysis.copy(), plan=plan)
    times = []
    for i in range(steps + 2):
        dist.barrier()
        start = time.perf_counter()
        compiled.train_step(*args, **kwargs)
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= 2:
            times.append(float(elapsed))
    return statistics.median(times), measure_step_memory(compiled, *args, **kwargs).peak_bytes


def _predict(
    analysis: gfx.Analysis,
    cluster: ClusterSpec,
    layers: LayerTimes | None,
    eff: float,
    text: str,
    world: int,
) -> dict[str, Any]:
    """Rank 0's step time with the layer table and without it (both at `eff` where a unit
    has no entry) and every rank's peak bytes; `error` where pricing fails."""
    plan = analysis.plan(parse_strategy(text), world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            roofline = price_plan(analysis, plan, cluster, dtype="fp32", efficiency=eff)
            per_rank = [
                price_plan(
                    analysis,
                    plan,
                    cluster,
                    rank=r,
                    dtype="fp32",
                    efficiency=eff,
                    layer_times=layers,
                )
                for r in range(world)
            ]
    except Exception as err:
        return {"error": f"pricing failed: {type(err).__name__}: {err}".splitlines()[0]}
    return {
        "predicted_s": sum(c.time_s for c in per_rank[0]),
        "roofline_s": sum(c.time_s for c in roofline),
        "predicted_peak_bytes": [plan_peak(c, plan, cluster).peak_bytes for c in per_rank],
    }


def coverage(analysis: gfx.Analysis, layers: LayerTimes, text: str, world: int) -> tuple[int, int]:
    """(units the layer table has an entry for under the plan `text`, units): read off the
    table's keys, not off the prices."""
    plan = analysis.plan(parse_strategy(text), world_size=world)
    timed = [layers.lookup(u.fingerprint, plan.strategy(u.name)) for u in analysis.layers]
    return sum(t is not None for t in timed), len(timed)


def group(shape_label: str, units_measured: int, units: int) -> str:
    """A row's group, from how many of its units the layer table has: the profiled shape
    splits into `in-sample` (every unit), `held-out plans` (none) and `partly profiled`."""
    if shape_label != "profiled":
        return shape_label if units_measured == 0 else f"{shape_label}, partly profiled"
    if units_measured == units:
        return "in-sample"
    return "held-out plans" if units_measured == 0 else "partly profiled"


def _spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (None below 3 points: no ranking to speak of)."""
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _run(a: gfx.Analysis, args: tuple, kwargs: dict, text: str, world: int, steps: int) -> Any:
    """Every rank's (median step, peak bytes), or why the job failed."""
    try:
        return fork_ranks(_measure, world, a, args, kwargs, text, steps)
    except Exception as err:
        return f"run failed: {last_line(err)}"


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Profile the layers of the profiled strategies, predict every plan of every shape,
    measure every plan `opts.rounds` times round-robin: the figures the suite keeps. A plan
    that fails to price or to run is a row with its `error`."""
    shapes: tuple[Shape, ...] = SHAPES
    profiled: tuple[str, ...] = PROFILED
    if opts.smoke:
        opts.world, opts.steps, opts.rounds = 2, 1, 1
        shapes, profiled = SMOKE_SHAPES, SMOKE_PROFILED
    ensure_profile(opts.profile, opts.world, opts.smoke)
    cluster = load_cluster("local", local_profile=opts.profile)
    ref = shapes[0]
    analyses = {s: _analysis(s.spec, s.batch, s.seq) for s in shapes}
    analysis, args, kwargs = analyses[ref]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategies = [parse_strategy(t) for t in profiled]
        layers = profile_layers(analysis, args, kwargs, strategies, concurrency=opts.world)
    # plan_quality_measured reads the efficiency off this table
    layers.save(opts.profile.with_name(opts.profile.stem + ".layers.json"))
    eff = measured_efficiency(analysis, cluster, layers, opts.world) or 1.0
    seconds = {"layer profile": time.perf_counter() - start}
    plans = [(s, text) for s in shapes for text in s.plans]
    start = time.perf_counter()
    predictions = {
        (s, t): _predict(analyses[s][0], cluster, layers, eff, t, opts.world) for s, t in plans
    }
    seconds["predict"] = time.perf_counter() - start
    start = time.perf_counter()
    runs: dict[tuple[Shape, str], list[Any]] = {p: [] for p in plans}
    for _ in range(opts.rounds):  # round-robin, so a slow spell of the machine hits every plan
        for s, text in plans:
            if not any(isinstance(r, str) for r in runs[s, text]):
                runs[s, text].append(_run(*analyses[s], text, opts.world, opts.steps))
    seconds["measure"] = time.perf_counter() - start
    rows = []
    for s, text in plans:
        timed, units = coverage(analyses[s][0], layers, text, opts.world)
        row = {
            "group": group(s.label, timed, units),
            "model": s.spec,
            "batch": s.batch,
            "seq": s.seq,
            "plan": text,
            "units_measured": timed,
            "units": units,
            **predictions[s, text],
        }
        failed = [r for r in runs[s, text] if isinstance(r, str)]
        if failed:
            row["error"] = failed[0] if "error" not in row else f"{row['error']}; {failed[0]}"
        else:  # interference only slows a run down: the fastest round is the least disturbed
            row["measured_s"] = min(r[0][0] for r in runs[s, text])
            row["measured_peak_bytes"] = [m for _, m in runs[s, text][0]]
        rows.append(row)
    return {
        "world": opts.world,
        "profiled": {
            "model": ref.spec,
            "batch": ref.batch,
            "seq": ref.seq,
            "strategies": list(profiled),
        },
        "efficiency": eff,
        "seconds": seconds,
        "rows": rows,
        **errors(rows),
    }


def _time_error(row: dict[str, Any], key: str = "predicted_s") -> float:
    return (row[key] - row["measured_s"]) / row["measured_s"]


def _memory_error(row: dict[str, Any]) -> tuple[int, float]:
    """(the rank with the largest |error|, its signed error)."""
    per_rank = [
        (p - m) / m
        for p, m in zip(row["predicted_peak_bytes"], row["measured_peak_bytes"], strict=True)
    ]
    worst = max(range(len(per_rank)), key=lambda r: abs(per_rank[r]))
    return worst, per_rank[worst]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _stats(rows: list[dict[str, Any]], ranked: bool = True) -> dict[str, Any]:
    """Median and worst |time error| with and without the layer table, and Spearman
    (`ranked=False`: None, for rows of several models whose pooled ranking says little),
    over the rows that ran; `failed` counts the others."""
    ran = [r for r in rows if "error" not in r]
    errs = [abs(_time_error(r)) for r in ran]
    roof = [abs(_time_error(r, "roofline_s")) for r in ran]
    pred, meas = [r["predicted_s"] for r in ran], [r["measured_s"] for r in ran]
    return {
        "plans": len(ran),
        "failed": len(rows) - len(ran),
        "median_error": _median(errs),
        "worst_error": max(errs, default=None),
        "roofline_median_error": _median(roof),
        "spearman": _spearman(pred, meas) if ranked else None,
    }


def errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The section's figures: per group `_stats`; over all held-out rows the target's median
    |error|; the lowest Spearman of the held-out groups (None where one has under 3 plans);
    the worst memory error over every rank of every row; `failed`: each row that failed to
    price or run, with why."""
    groups = {g: [r for r in rows if r["group"] == g] for g in dict.fromkeys(r["group"] for r in rows)}  # fmt: skip
    held = [r for r in rows if r["group"] in HELD_OUT]
    spearmans = [_stats(groups[g])["spearman"] for g in HELD_OUT if g in groups]
    memory_errors = [abs(_memory_error(r)[1]) for r in rows if "error" not in r]
    return {
        "failed": [f"{r['plan']} on {r['model']}: {r['error']}" for r in rows if "error" in r],
        "groups": {g: _stats(rs) for g, rs in groups.items()},
        "held_out": _stats(held, ranked=False),
        "in_sample": _stats(groups.get("in-sample", [])),
        "all_roofline_median_error": _stats(rows, ranked=False)["roofline_median_error"],
        "held_out_spearman": None if None in spearmans or not spearmans else min(spearmans),
        "memory_median_error": _median(memory_errors),
        "memory_worst_error": max(memory_errors, default=None),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def verdicts(data: dict[str, Any]) -> dict[str, str]:
    """`met` / `missed` / `n/a` per target: held-out median time error (n/a without held-out
    rows), the lowest held-out Spearman (n/a where a held-out group has under 3 plans or
    none exist), worst memory error. A plan that failed to price or run misses all three:
    the figures leave it out, so they were not earned."""
    if data["failed"]:
        return dict.fromkeys(TARGETS, "missed")
    med = data["held_out"]["median_error"]
    rho = data["held_out_spearman"]
    mem = data["memory_worst_error"]
    return {
        "held_out_median_error": "n/a"
        if med is None
        else _ok(med <= TARGETS["held_out_median_error"]),
        "held_out_spearman": "n/a" if rho is None else _ok(rho >= TARGETS["held_out_spearman"]),
        "memory_worst_error": "n/a" if mem is None else _ok(mem <= TARGETS["memory_worst_error"]),
    }


def _ok(ok: bool) -> str:
    return "met" if ok else "missed"


def report(data: dict[str, Any]) -> None:
    print(markdown(data))


def _row_cells(r: dict[str, Any]) -> str:
    """A row's figures: prediction, measurement and errors, or why it has none."""
    if "error" in r:
        ms = f"{r['predicted_s'] * 1e3:.1f}" if "predicted_s" in r else "-"
        measured = f"{r['measured_s'] * 1e3:.1f}" if "measured_s" in r else "-"
        return f"{ms} | {measured} | **failed**: {r['error']} | | | | |"
    worst, memory_error = _memory_error(r)
    return (
        f"{r['predicted_s'] * 1e3:.1f} | {r['measured_s'] * 1e3:.1f} | {_time_error(r):+.0%} | "
        f"{_time_error(r, 'roofline_s'):+.0%} | {r['predicted_peak_bytes'][worst] / 2**20:.2f} | "
        f"{r['measured_peak_bytes'][worst] / 2**20:.2f} | {memory_error:+.1%} |"
    )


def markdown(data: dict[str, Any]) -> str:
    prof = data["profiled"]
    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    lines = [
        f"Layer profile: {prof['model']}, batch {prof['batch']}, seq {prof['seq']}, strategies "
        + ", ".join(f"`{s}`" for s in prof["strategies"])
        + " only. Every plan predicted by `price_plan` with that table; a unit it has no "
        f"entry for is priced by the roofline at {data['efficiency']:.2f} of peak (the "
        "profiled units' `measured_efficiency`), so a held-out row's prediction is the "
        f"roofline's. Measured on {data['world']} gloo ranks: the median step of the slowest "
        "rank, the fastest of the rounds. Roofline: no layer table at all (what the search "
        "prices with). Memory: every rank's predicted peak against the profiler's, the worst "
        "rank shown. `units timed`: the plan's units the layer table has an entry for. Models: "
        + "; ".join(f"m{k} = `{m}`" for k, m in enumerate(models))
        + ".",
        "",
        "| group | model | batch | seq | plan | units timed | predicted ms | measured ms | error | roofline error | predicted MiB | measured MiB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in data["rows"]:
        lines.append(
            f"| {r['group']} | m{models.index(r['model'])} | {r['batch']} | {r['seq']} | "
            f"{r['plan']} | {r['units_measured']}/{r['units']} | {_row_cells(r)}"
        )
    lines += [
        "",
        "| rows | plans | failed | time: median \\|error\\| | worst | Spearman | roofline only: median \\|error\\| |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, st in [*data["groups"].items(), ("**all held-out**", data["held_out"])]:
        rho = _num(st["spearman"]) if name in data["groups"] else "per group"
        lines.append(
            f"| {name} | {st['plans']} | {st['failed']} | {_pct(st['median_error'])} | "
            f"{_pct(st['worst_error'])} | {rho} | {_pct(st['roofline_median_error'])} |"
        )
    lines += ["", "| figure | value | target | |", "|---|---|---|---|"]
    lines += [f"| {figure} | {value} | {target} | {_shown(v)} |" for figure, value, target, v in targets(data)]  # fmt: skip
    lines += [
        f"| time: in-sample median \\|error\\| (the profile reconstructing what it timed) | {_pct(data['in_sample']['median_error'])} | | |",
        f"| time: roofline only, every plan, median \\|error\\| | {_pct(data['all_roofline_median_error'])} | | |",
        f"| memory: median \\|error\\| | {_pct(data['memory_median_error'])} | | |",
    ]  # fmt: skip
    return "\n".join(lines)


def _shown(verdict: str) -> str:
    return "**missed**" if verdict == "missed" else verdict


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) for the three targets: the suite's targets table.
    Failed plans are named in every value (they miss every target)."""
    v = verdicts(data)
    held, groups = data["held_out"], data["groups"]
    rho = " / ".join(
        f"{g.removeprefix('held-out ')} {_num(groups[g]['spearman'])}"
        for g in HELD_OUT
        if g in groups
    )
    failed = f"; {len(data['failed'])} failed: {data['failed'][0]}" if data["failed"] else ""
    return [
        (
            "cost model: held-out median time error (plans, shapes, model not profiled)",
            f"{_pct(held['median_error'])} over {held['plans']} plans (in-sample "
            f"{_pct(data['in_sample']['median_error'])}; roofline only, every plan, "
            f"{_pct(data['all_roofline_median_error'])}){failed}",
            "<= 10%",
            v["held_out_median_error"],
        ),
        (
            "cost model: held-out Spearman, lowest group",
            f"{_num(data['held_out_spearman'])} ({rho}){failed}",
            ">= 0.9",
            v["held_out_spearman"],
        ),
        (
            "cost model: worst memory error",
            f"{_pct(data['memory_worst_error'])}{failed}",
            "<= 5%",
            v["memory_worst_error"],
        ),
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="measurements per plan (fastest)")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main() -> None:
    opts = parser().parse_args()
    data = run(opts)
    report(data)
    if opts.json:
        opts.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
