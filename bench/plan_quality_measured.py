"""Plan quality, measured: the searched plan against every baseline plan, both run for real.

The reference GPT (`cost_model.SPEC`, batch 8) on local gloo ranks under three artificial
memory caps per rank. For each cap the search (cluster `local`, fp32, as the ranks run) gives
its plan and each baseline family's best member (`search/baselines.py`) as a runnable Plan.
Every distinct plan is compiled in the same ranks and their steps run in turns (as in
`runtime.py`), so a noisy machine slows all of them alike. The figure is the auto plan's
measured throughput over the fastest baseline whose plan differs from it (>= 1.0: the search's
plan is at least as fast). A baseline whose plan is the auto plan itself is the same program,
not a comparison: it reads "= auto" and is left out of the figure; a cap where no different
baseline fits reads "n/a". One that does not fit under the cap reads "-". The peak memory
each plan measured (PyTorch profiler, `runtime/memory_probe.py`, the largest rank) is shown
against the cap. A cap is "missed" when the auto plan measures over it, when any plan fails
to build or run, when a plan's first-step loss differs from the auto plan's (they train the
same model on the same batch), or when the search finds no plan (`judge`).

    python bench/plan_quality_measured.py
    python bench/plan_quality_measured.py --smoke    # a tiny GPT, two caps, for the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # creating an optimizer imports it: import once, before forking
import torch.distributed as dist
from pytorch_side import Config, ensure_profile, seeded
from runtime import built_or_why, interleaved, last_line

import galvatron_fx as gfx
from galvatron_fx.cost_models.hardware import ClusterSpec, load_cluster
from galvatron_fx.cost_models.layer_times import load_layer_times
from galvatron_fx.plan import Plan
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
"""Auto's measured throughput over the best different baseline's: at least as fast."""
LOSS_TOL = 1e-4
"""Every plan's first-step loss against the auto plan's (the runtime benchmark's tolerance)."""


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
        except Exception as err:  # PlanError: nothing fits; anything else: the search broke
            return {"cap_gb": cap_gb, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
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


Built = tuple[Callable[[], float], Any]
"""A compiled plan's step function (its first-step loss) and the compiled model."""


def _compiled(spec_text: str, batch: int, name: str, plan_json: Any) -> Built:
    model, args, kwargs = seeded(spec_text, batch)
    plan = Plan.from_json(plan_json, source=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = gfx.compile(model, args, kwargs, plan=plan)
    return lambda: float(cm.train_step(*args, **kwargs).item()), cm


def _measure(rank: int, world: int, spec_text: str, batch: int, plans: dict[str, Any], cfg: Config) -> dict[str, Any]:  # fmt: skip
    """Every plan compiled in this rank, steps in turns: per plan the seconds of each timed
    step and this rank's peak bytes over one more step, or `error`: why it failed to build
    (on any rank: a plan that failed anywhere runs nowhere)."""
    built: dict[str, Built | str] = {}
    for n, p in plans.items():
        built[n] = built_or_why(partial(_compiled, spec_text, batch, n, p))
    ok = torch.tensor([int(not isinstance(b, str)) for b in built.values()])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    out: dict[str, Any] = {
        n: {"error": b if isinstance(b, str) else "failed on another rank"}
        for (n, b), fine in zip(built.items(), ok, strict=True)
        if not fine
    }
    good = {n: b for n, b in built.items() if n not in out and not isinstance(b, str)}
    timed = interleaved([step for step, _ in good.values()], cfg)
    for (name, (_, cm)), (first, _, seconds) in zip(good.items(), timed, strict=True):
        _, args, kwargs = seeded(spec_text, batch)
        peak = measure_step_memory(cm, *args, **kwargs).peak_bytes
        out[name] = {"first_loss": first, "seconds": seconds, "peak_bytes": peak}
    return out


def measure(spec_text: str, world: int, batch: int, row: dict[str, Any], cfg: Config) -> None:
    """Adds `measured` to a cap's row: per distinct plan its samples/s (median over steps of
    the slowest rank) and its largest rank's peak bytes, or its `error`; a job that died
    (a plan failed while running) leaves `measure_error` instead."""
    distinct = {n: row["plans"][n] for n in dict.fromkeys(row["same_as"].values())}
    try:
        per_rank = fork_ranks(_measure, world, spec_text, batch, distinct, cfg, timeout_s=900)
    except Exception as err:
        row["measure_error"] = last_line(err)
        return
    row["measured"] = {}
    for name in distinct:
        errors = [r[name]["error"] for r in per_rank if "error" in r[name]]
        if errors:  # the rank that failed says why; its peers only saw it go
            own = [e for e in errors if "another rank" not in e]
            row["measured"][name] = {"error": (own or errors)[0]}
            continue
        slowest = [max(ts) for ts in zip(*(r[name]["seconds"] for r in per_rank), strict=True)]
        row["measured"][name] = {
            "samples_per_s": batch / statistics.median(slowest),
            "peak_bytes": max(r[name]["peak_bytes"] for r in per_rank),
            "first_loss": per_rank[0][name]["first_loss"],
        }


def ratios(row: dict[str, Any]) -> dict[str, float | None]:
    """Auto's measured throughput over each baseline's whose plan differs from auto's
    (None: the baseline does not fit, is the auto plan, or it or auto failed to run)."""
    got = row["measured"]
    auto = got["auto"].get("samples_per_s")
    out: dict[str, float | None] = {}
    for n in NAMES:
        same = row["same_as"].get(n)
        theirs = got[same].get("samples_per_s") if same not in (None, "auto") else None
        out[n] = auto / theirs if auto and theirs else None
    return out


def equal_to_auto(row: dict[str, Any]) -> list[str]:
    """The baselines whose plan is the auto plan: where the search found nothing they did not."""
    return [n for n in NAMES if row.get("same_as", {}).get(n) == "auto"]


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
            if "measured" in row:
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
    verdict, why = judge(row)
    if "ratios" not in row:
        return f"cap {row['cap_gb']} GB: {verdict}: {why}"
    cells = "  ".join(f"{n} {_cell(row, n)}" for n in NAMES)
    return f"cap {row['cap_gb']} GB: auto {row['shape']['auto']}  vs {cells}  -> {verdict} {why}"


def _cell(row: dict[str, Any], name: str) -> str:
    same = row["same_as"].get(name)
    if same is None:
        return "-"
    if same == "auto":
        return "= auto"
    if "error" in row["measured"][same]:
        return "failed"
    r = row["ratios"][name]
    return "-" if r is None else f"{r:.2f}x"


def best_ratio(row: dict[str, Any]) -> float | None:
    """Auto against the fastest baseline that fits and whose plan differs from auto's,
    measured (None: there is none)."""
    fits = [r for r in row.get("ratios", {}).values() if r is not None]
    return min(fits) if fits else None


def judge(row: dict[str, Any]) -> tuple[str, str]:
    """("met", "missed" or "n/a", why) for one cap's row. Missed: the search found no plan, a
    plan failed to build or run, the auto plan measured over the cap, a plan's first-step
    loss differs from auto's by more than `LOSS_TOL`, or auto is slower than the fastest
    different baseline. n/a: none of those, and no baseline with a plan other than auto's
    fits (a baseline equal to auto is not a comparison). Met: auto at least as fast as
    every different baseline that fits."""
    if "error" in row:
        return "missed", f"the search found no plan: {row['error']}"
    if "measure_error" in row:
        return "missed", f"a plan failed to run: {row['measure_error']}"
    got = row["measured"]
    failed = [f"{n}: {m['error']}" for n, m in got.items() if "error" in m]
    if failed:
        return "missed", f"failed to build: {failed[0]}"
    cap = row["cap_gb"] * 2**30
    if got["auto"]["peak_bytes"] > cap:
        return "missed", f"auto's peak {got['auto']['peak_bytes'] / 2**20:.1f} MiB is over the cap"
    loss = got["auto"]["first_loss"]
    off = {n: abs(m["first_loss"] - loss) for n, m in got.items()}
    worst = max(off, key=off.__getitem__)
    if not off[worst] <= LOSS_TOL:
        return "missed", f"{worst}'s first-step loss differs from auto's by {off[worst]:.1e}"
    best = best_ratio(row)
    if best is None:
        return "n/a", "no baseline with another plan fits"
    if best < TARGET:
        return "missed", ""
    return "met", ""


def found(row: dict[str, Any]) -> str:
    """What the search found against the baselines: `= a, b` (the baselines whose plan it
    is), or `new` (a plan no baseline has)."""
    if "same_as" not in row:
        return ""
    same = equal_to_auto(row)
    return f"= {', '.join(same)}" if same else "new"


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"{data['model']}, batch {data['batch']}, {data['world']} gloo ranks, {data['steps']} "
        "timed steps of every plan in turns. Cells: the auto plan's measured samples/s over the "
        "baseline's (>= 1.00x: auto at least as fast; `= auto`: the same plan, not a "
        "comparison; `-`: does not fit; `failed`: did not build or run). `search found`: "
        "`new` where no baseline has the auto plan, else the baselines that do. `vs best "
        "other`: auto over the fastest baseline with a different plan (n/a: none fits); "
        "predicted: the same ratio from the cost model. The search priced compute at "
        + (
            f"{data['efficiency']:.2f} of the roofline (the model's profiled layers)"
            if data.get("efficiency")
            else "the roofline (no layer profile)"
        )
        + "; auto predicted: its predicted samples/s.",
        "",
        "| cap MiB | auto plan | search found | auto samples/s | auto predicted | auto peak MiB | "
        + " | ".join(NAMES)
        + " | vs best other (measured) | vs best other (predicted) | target |",
        "|---|---|---|---|---|---|" + "---|" * len(NAMES) + "---|---|---|",
    ]
    for row in data["rows"]:
        cap = f"{row['cap_gb'] * 1024:.0f}"
        verdict, why = judge(row)
        shown = _shown(verdict) + (f" ({why})" if why else "")
        if "ratios" not in row:
            plan = row.get("shape", {}).get("auto", "no plan")
            lines.append(
                f"| {cap} | {plan} | {found(row)} | | | | "
                + " | ".join("-" * len(NAMES))
                + f" | | | {shown} |"
            )
            continue
        auto = row["measured"]["auto"]
        best = best_ratio(row)
        others = [
            v for n, v in row["predicted"].items() if n not in ("auto", *equal_to_auto(row)) and v
        ]
        p_best = row["predicted"]["auto"] / max(others) if others else None
        over = " (over the cap)" if auto["peak_bytes"] > row["cap_gb"] * 2**30 else ""
        lines.append(
            f"| {cap} | {row['shape']['auto']} | {found(row)} | {auto['samples_per_s']:.1f} | "
            f"{row['predicted']['auto']:.1f} | {auto['peak_bytes'] / 2**20:.1f}{over} | "
            + " | ".join(_cell(row, n) for n in NAMES)
            + f" | {'n/a' if best is None else f'{best:.2f}x'} | "
            f"{'n/a' if p_best is None else f'{p_best:.2f}x'} | {shown} |"
        )
    return "\n".join(lines)


def _shown(verdict: str) -> str:
    return "**missed**" if verdict == "missed" else verdict


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) per cap, every cap: the suite's targets table. The
    value names what the search found (`new`, or the baselines equal to the auto plan)."""
    out = []
    for row in data["rows"]:
        verdict, why = judge(row)
        best = best_ratio(row)
        value = "n/a" if best is None else f"{best:.2f}x"
        same = equal_to_auto(row)
        what = f"auto = {', '.join(same)}" if same else "auto: a plan no baseline has"
        notes = [x for x in (what if "same_as" in row else "", why) if x]
        if notes:
            value += f" ({'; '.join(notes)})"
        cap = f"{row['cap_gb'] * 1024:.0f} MiB"
        out.append((f"plan quality, cap {cap}: auto / best other baseline", value, f">= {TARGET}", verdict))  # fmt: skip
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
