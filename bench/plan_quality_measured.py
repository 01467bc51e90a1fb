"""Plan quality, measured: the searched plan against every baseline plan, both run for real.

The reference GPT (`cost_model.SPEC`, batch 8) on local gloo ranks under three artificial
memory caps per rank. For each cap the search (cluster `local`, fp32, as the ranks run) gives
its plan and each baseline family's best member (`search/baselines.py`) as a runnable Plan.
Every distinct plan is compiled in the same ranks and their steps run in turns (as in
`runtime.py`), so a noisy machine slows all of them alike. The figure is the auto plan's
measured throughput over each baseline's (>= 1.0: the search's plan is at least as fast). A
baseline whose plan is the auto plan itself is the same program and reads "= auto"; one that
does not fit under the cap reads "-". The peak memory each plan measured (PyTorch profiler,
`runtime/memory_probe.py`, the largest rank) is shown against the cap.

    python bench/plan_quality_measured.py
    python bench/plan_quality_measured.py --smoke    # a tiny GPT, two caps, for the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # creating an optimizer imports it: import once, before forking
from pytorch_side import Config, ensure_profile, seeded
from runtime import interleaved

import galvatron_fx as gfx
from galvatron_fx.cost_models.hardware import ClusterSpec, load_cluster
from galvatron_fx.cost_models.layer_times import load_layer_times
from galvatron_fx.plan import Plan, PlanError
from galvatron_fx.planning.price import measured_efficiency
from galvatron_fx.planning.search_step import search_analysis
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.memory_probe import measure_step_memory
from galvatron_fx.runtime.profiler import DEFAULT_PROFILE
from galvatron_fx.search.baselines import BASELINES

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=1024,seq=128"
CAPS_GB = (0.12, 0.06, 0.035)
"""Loose (plain DP fits), medium (DP does not), tight (only sharded or staged plans fit)."""
SMOKE_SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
SMOKE_CAPS_GB = (0.05, 0.004)
NAMES = [b.name for b in BASELINES]
TARGET = 1.0
"""Auto's measured throughput over the best baseline's: at least as fast."""


def efficiency(spec_text: str, cluster: ClusterSpec, profile_path: Path, world: int, batch: int) -> float | None:  # fmt: skip
    """The compute efficiency the model's profiled layers show (`measured_efficiency`),
    from the layer table `cost_model.py` wrote next to the profile; None without one."""
    layers = load_layer_times(profile_path.with_name(profile_path.stem + ".layers.json"))
    if layers is None:
        return None
    model, args, kwargs = seeded(spec_text, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = gfx.analyze(model, args, kwargs)
        return measured_efficiency(analysis, cluster, layers, world)


def searched(spec_text: str, cluster: ClusterSpec, cap_gb: float, world: int, batch: int, eff: float) -> dict[str, Any]:  # fmt: skip
    """The auto plan and the baselines' under `cap_gb`: plans as JSON (None: does not fit),
    predicted samples/s, and which names share one plan."""
    model, args, kwargs = seeded(spec_text, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = gfx.analyze(model, args, kwargs)
        try:
            result = search_analysis(
                analysis, cluster=cluster, memory_budget_gb=cap_gb, global_batch=batch,
                world_size=world, precision="fp32", dtype="fp32", efficiency=eff,
            )  # fmt: skip
        except PlanError as err:
            return {"cap_gb": cap_gb, "error": str(err).splitlines()[0]}
    plans: dict[str, Plan | None] = {"auto": result.plan, **result.baseline_plans}
    keys = {n: json.dumps(p.to_json(), sort_keys=True) for n, p in plans.items() if p}
    same = {n: next(m for m in keys if keys[m] == k) for n, k in keys.items()}
    return {
        "cap_gb": cap_gb,
        "plans": {n: p.to_json() if p else None for n, p in plans.items()},
        "same_as": same,
        "predicted": {"auto": result.samples_per_s, **result.baselines},
        "shape": {n: _shape(p) for n, p in plans.items() if p},
    }


def _shape(plan: Plan) -> str:
    kinds = sorted({s.short() for _, s in plan.strategies})
    p = plan.pipeline
    pipe = f"pp{p.degree} m{p.micro_batches}" if p.degree > 1 else f"m{p.micro_batches}"
    return f"{pipe}: " + ", ".join(kinds)


def _measure(rank: int, world: int, spec_text: str, batch: int, plans: dict[str, Any], cfg: Config) -> dict[str, Any]:  # fmt: skip
    """Every plan compiled in this rank, steps in turns: per plan the seconds of each timed
    step and this rank's peak bytes over one more step."""
    steps, compiled = [], {}
    for name, plan_json in plans.items():
        model, args, kwargs = seeded(spec_text, batch)
        plan = Plan.from_json(plan_json, source=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = gfx.compile(model, args, kwargs, plan=plan)
        compiled[name] = cm
        steps.append(lambda cm=cm, a=args, k=kwargs: float(cm.train_step(*a, **k).item()))
    timed = interleaved(steps, cfg)
    out = {}
    for (name, cm), (first, _, seconds) in zip(compiled.items(), timed, strict=True):
        _, args, kwargs = seeded(spec_text, batch)
        peak = measure_step_memory(cm, *args, **kwargs).peak_bytes
        out[name] = {"first_loss": first, "seconds": seconds, "peak_bytes": peak}
    return out


def measure(spec_text: str, world: int, batch: int, row: dict[str, Any], cfg: Config) -> None:
    """Adds `measured` to a cap's row: per distinct plan its samples/s (median over steps of
    the slowest rank) and its largest rank's peak bytes."""
    distinct = {n: row["plans"][n] for n in dict.fromkeys(row["same_as"].values())}
    per_rank = fork_ranks(_measure, world, spec_text, batch, distinct, cfg, timeout_s=900)
    row["measured"] = {}
    for name in distinct:
        slowest = [max(ts) for ts in zip(*(r[name]["seconds"] for r in per_rank), strict=True)]
        row["measured"][name] = {
            "samples_per_s": batch / statistics.median(slowest),
            "peak_bytes": max(r[name]["peak_bytes"] for r in per_rank),
            "first_loss": per_rank[0][name]["first_loss"],
        }


def ratios(row: dict[str, Any]) -> dict[str, float | None]:
    """Auto's measured throughput over each baseline's (None: the baseline does not fit)."""
    got = row["measured"]
    auto = got["auto"]["samples_per_s"]
    return {
        n: auto / got[row["same_as"][n]]["samples_per_s"] if n in row["same_as"] else None
        for n in NAMES
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    spec, caps = (SMOKE_SPEC, SMOKE_CAPS_GB) if opts.smoke else (SPEC, CAPS_GB)
    if opts.smoke:
        opts.world, opts.batch = 2, 4
    ensure_profile(opts.profile, opts.world, opts.smoke)
    cluster = load_cluster("local", local_profile=opts.profile)
    cfg = Config(warmup=1, steps=2) if opts.smoke else Config(warmup=2, steps=opts.steps)
    eff = efficiency(spec, cluster, opts.profile, opts.world, opts.batch)
    rows = []
    for cap in caps:
        row = searched(spec, cluster, cap, opts.world, opts.batch, eff or 1.0)
        if "plans" in row:
            measure(spec, opts.world, opts.batch, row, cfg)
            row["ratios"] = ratios(row)
        rows.append(row)
        print(_line(row), flush=True)
    return {
        "model": spec,
        "world": opts.world,
        "batch": opts.batch,
        "steps": cfg.steps,
        "efficiency": eff,
        "rows": rows,
    }


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"cap {row['cap_gb']} GB: nothing fits ({row['error']})"
    cells = "  ".join(f"{n} {_cell(row, n)}" for n in NAMES)
    return f"cap {row['cap_gb']} GB: auto {row['shape']['auto']}  vs {cells}"


def _cell(row: dict[str, Any], name: str) -> str:
    r = row["ratios"][name]
    if r is None:
        return "-"
    return "= auto" if row["same_as"][name] == "auto" else f"{r:.2f}x"


def best_ratio(row: dict[str, Any]) -> float | None:
    """Auto against the fastest baseline that fits, measured (None: none fits)."""
    fits = [r for r in row["ratios"].values() if r is not None]
    return min(fits) if fits else None


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"{data['model']}, batch {data['batch']}, {data['world']} gloo ranks, {data['steps']} "
        "timed steps of every plan in turns. Cells: the auto plan's measured samples/s over the "
        "baseline's (>= 1.00x: auto at least as fast; `= auto`: the same plan; `-`: does not "
        "fit). Predicted: the same ratio from the cost model. The search priced compute at "
        + (
            f"{data['efficiency']:.2f} of the roofline (the model's profiled layers)"
            if data.get("efficiency")
            else "the roofline (no layer profile)"
        )
        + "; auto predicted: its predicted samples/s.",
        "",
        "| cap MiB | auto plan | auto samples/s | auto predicted | auto peak MiB | "
        + " | ".join(NAMES)
        + " | vs best (measured) | vs best (predicted) | target |",
        "|---|---|---|---|---|" + "---|" * len(NAMES) + "---|---|---|",
    ]
    for row in data["rows"]:
        cap = f"{row['cap_gb'] * 1024:.0f}"
        if "error" in row:
            lines.append(
                f"| {cap} | nothing fits | | | " + " | ".join("-" * len(NAMES)) + " | | | |"
            )
            continue
        auto = row["measured"]["auto"]
        best = best_ratio(row)
        predicted = [v for n, v in row["predicted"].items() if n != "auto" and v]
        p_best = row["predicted"]["auto"] / max(predicted) if predicted else None
        met = "n/a" if best is None else ("met" if best >= TARGET else "**missed**")
        lines.append(
            f"| {cap} | {row['shape']['auto']} | {auto['samples_per_s']:.1f} | "
            f"{row['predicted']['auto']:.1f} | "
            f"{auto['peak_bytes'] / 2**20:.1f}{' (over the cap)' if auto['peak_bytes'] > row['cap_gb'] * 2**30 else ''} | "
            + " | ".join(_cell(row, n) for n in NAMES)
            + f" | {'n/a' if best is None else f'{best:.2f}x'} | "
            f"{'n/a' if p_best is None else f'{p_best:.2f}x'} | {met} |"
        )
    return "\n".join(lines)


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(figure, value, target, met) per cap where a baseline fits: the suite's table."""
    out = []
    for row in data["rows"]:
        best = best_ratio(row) if "ratios" in row else None
        if best is not None:
            cap = f"{row['cap_gb'] * 1024:.0f} MiB"
            out.append((f"plan quality, cap {cap}: auto / best baseline", f"{best:.2f}x", f">= {TARGET}", best >= TARGET))  # fmt: skip
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main() -> None:
    opts = parser().parse_args()
    torch.set_num_threads(1)
    data = run(opts)
    print(markdown(data))
    if opts.json:
        opts.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
