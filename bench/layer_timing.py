"""Layer timing against timed steps: do the unit times `layer_timer` measures add up to a step?

The profiler (`galvatron-fx profile --model`) times each unit of a program by cutting its
steps into pieces (`galvatron_fx/runtime/layer_timer.py`); `price_plan` then sums those
pieces. Here the reference GPT is run on one process under each recomputation mode, and the
units' forward, backward (recomputation included) and optimizer-step times, summed, are set
against the same phases timed around an ordinary step of an uninstrumented copy of the same
program. The timer's recomputation (the checkpointed region's forward, which backward runs
again) is also set against what recomputing really adds to the backward: the timed backward
with the mode on, less the timed backward without it.

Rounds go round-robin over the modes, reference steps on both sides of each unit timing (the
machine's speed drifts over a run); figures are medians. Nothing here is asserted: the
errors are reported with their targets (`tests/test_layer_profile.py` checks only what is
deterministic: where the timer charges time, not how much).

    python bench/layer_timing.py             # the cost model's GPT, 3 rounds
    python bench/layer_timing.py --smoke     # tiny sizes, one round
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_side import seeded

import galvatron_fx as gfx
from galvatron_fx.plan import LayerStrategy, Recompute
from galvatron_fx.planning.price import stepped_elems
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.layer_timer import time_units

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=1024,seq=128"
"""The GPT the cost-model section profiles."""
SMOKE_SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
MODES = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)
PHASES = ("fwd_s", "bwd_s", "step_s")
TARGETS = {"agreement": 0.10, "recompute": 0.20}
"""Forward and backward of every mode: the units' sum within 10% of the timed phase (the
cost model's own target on a whole step: unit times that miss by more cannot support it).
Recomputation: the timer's estimate within 20% of what it adds to the timed backward (a
difference of two timings, so noisier; it is a part of the step, so a larger error on it
moves the step's prediction less)."""


def _timed_step(compiled: Any, args: tuple, kwargs: dict) -> dict[str, float]:
    """One ordinary training step, each phase timed from outside the program."""
    compiled.sync.zero_grad()
    start = time.perf_counter()
    loss = compiled.forward_loss(*args, **kwargs)
    forward_end = time.perf_counter()
    loss.backward()
    backward_end = time.perf_counter()
    compiled.sync.finish()
    compiled.sync.step()
    return {
        "fwd_s": forward_end - start,
        "bwd_s": backward_end - forward_end,
        "step_s": time.perf_counter() - backward_end,
    }


def _unit_sums(
    analysis: gfx.Analysis, plan: gfx.Plan, args: tuple, kwargs: dict, steps: int
) -> dict[str, float]:
    """The timer's figures on a fresh program (it instruments the program in place), summed
    over the units: backward with the recomputation, as the step runs it."""
    compiled = gfx.parallelize(analysis.copy(), plan=plan)
    elems = stepped_elems(compiled.params, plan)
    times = time_units(compiled, args, kwargs, elems, warmup=1, repeats=steps).values()
    return {
        "fwd_s": sum(t.fwd_s for t in times),
        "bwd_s": sum(t.bwd_s + t.recompute_s for t in times),
        "step_s": sum(t.step_s for t in times),
        "recompute_s": sum(t.recompute_s for t in times),
    }


def _measure(rank: int, world: int, spec: str, batch: int, rounds: int, steps: int) -> dict:
    """Per mode: every reference step's phases and each round's unit sums."""
    torch.set_num_threads(1)  # as the suite's ranks run: one core each, nothing shared
    model, args, kwargs = seeded(spec, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = gfx.analyze(model, args, kwargs)
    plans = {m.value: analysis.plan(LayerStrategy(recompute=m), world_size=1) for m in MODES}
    reference = {m: gfx.parallelize(analysis.copy(), plan=p) for m, p in plans.items()}
    for compiled in reference.values():  # warm up, outside the figures
        _timed_step(compiled, args, kwargs)
    out: dict[str, dict[str, list]] = {m: {"timed": [], "units": []} for m in plans}
    for _ in range(rounds):  # round-robin, so a slow spell of the machine hits every mode
        for m, plan in plans.items():
            out[m]["timed"] += [_timed_step(reference[m], args, kwargs) for _ in range(steps)]
            out[m]["units"].append(_unit_sums(analysis, plan, args, kwargs, steps))
            out[m]["timed"] += [_timed_step(reference[m], args, kwargs) for _ in range(steps)]
    return out


def _median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Measure every mode in one forked process on one thread: the figures the suite keeps."""
    spec, batch = (SMOKE_SPEC, 4) if opts.smoke else (SPEC, opts.batch)
    rounds, steps = (1, 2) if opts.smoke else (opts.rounds, opts.steps)
    (raw,) = fork_ranks(_measure, 1, spec, batch, rounds, steps, timeout_s=3600)
    rows = []
    for mode, r in raw.items():
        units = {k: _median(r["units"], k) for k in (*PHASES, "recompute_s")}
        timed = {k: _median(r["timed"], k) for k in PHASES}
        rows.append({"recompute": mode, "units": units, "timed": timed})
    none = next(r for r in rows if r["recompute"] == Recompute.NONE.value)
    recompute = {
        r["recompute"]: {
            "estimate_s": r["units"]["recompute_s"],
            "measured_s": r["timed"]["bwd_s"] - none["timed"]["bwd_s"],
        }
        for r in rows
        if r["recompute"] != Recompute.NONE.value
    }
    return {
        "model": spec,
        "batch": batch,
        "rounds": rounds,
        "steps": steps,
        "rows": rows,
        "recompute": recompute,
    }


def _error(got: float, want: float) -> float | None:
    """Relative error; None where the reference is not a positive time (a difference of
    timings that noise made zero or negative)."""
    return (got - want) / want if want > 0 else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _agreement(data: dict[str, Any]) -> list[tuple[str, float | None]]:
    """(mode and phase, error) for the targeted phases: forward and backward of every mode."""
    return [
        (f"{r['recompute']} {phase.removesuffix('_s')}", _error(r["units"][phase], r["timed"][phase]))
        for r in data["rows"]
        for phase in ("fwd_s", "bwd_s")
    ]  # fmt: skip


def _verdict(error: float | None, target: float) -> str:
    """`met` within the target; an error that could not be formed is `missed`, not met."""
    return "met" if error is not None and abs(error) <= target else "missed"


def _worst(errors: list[tuple[str, float | None]]) -> tuple[str, float | None]:
    """The largest |error|; one that could not be formed counts as the worst."""
    return max(errors, key=lambda e: float("inf") if e[1] is None else abs(e[1]))


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict): the worst forward/backward agreement over the modes,
    and the worst recomputation estimate over the modes that recompute."""
    agreement_name, agreement = _worst(_agreement(data))
    recompute_name, recompute = _worst(
        [(m, _error(r["estimate_s"], r["measured_s"])) for m, r in data["recompute"].items()]
    )
    return [
        (
            "layer timing: unit times summed against a timed step, worst error (fwd, bwd)",
            f"{_pct(agreement)} ({agreement_name})",
            f"<= {TARGETS['agreement']:.0%}",
            _verdict(agreement, TARGETS["agreement"]),
        ),
        (
            "layer timing: the timer's recomputation against the backward it adds, worst mode",
            f"{_pct(recompute)} ({recompute_name})",
            f"<= {TARGETS['recompute']:.0%}",
            _verdict(recompute, TARGETS["recompute"]),
        ),
    ]


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"{data['model']}, batch {data['batch']}, one process: the units' times summed (the "
        "profiler's timer) against the same phases timed around ordinary steps of an "
        f"uninstrumented copy, medians over {data['rounds']} round(s) of {data['steps']} "
        "steps each side. Backward includes the recomputation.",
        "",
        "| recompute | phase | units ms | timed ms | error |",
        "|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        for phase, label in (("fwd_s", "forward"), ("bwd_s", "backward"), ("step_s", "optimizer")):
            u, t = r["units"][phase], r["timed"][phase]
            lines.append(
                f"| {r['recompute']} | {label} | {u * 1e3:.2f} | {t * 1e3:.2f} | "
                f"{_pct(_error(u, t))} |"
            )
    lines += [
        "",
        "Recomputation: the timer's estimate (the checkpointed regions' forward) against the "
        "timed backward with the mode, less the timed backward without it.",
        "",
        "| recompute | estimate ms | added to backward ms | error |",
        "|---|---|---|---|",
    ]
    for mode, r in data["recompute"].items():
        lines.append(
            f"| {mode} | {r['estimate_s'] * 1e3:.2f} | {r['measured_s'] * 1e3:.2f} | "
            f"{_pct(_error(r['estimate_s'], r['measured_s']))} |"
        )
    lines += ["", "| figure | value | target | |", "|---|---|---|---|"]
    for figure, value, target, verdict in targets(data):
        shown = "**missed**" if verdict == "missed" else verdict
        lines.append(f"| {figure.removeprefix('layer timing: ')} | {value} | {target} | {shown} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the modes")
    p.add_argument("--steps", type=int, default=5, help="steps per side of each unit timing")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main() -> None:
    opts = parser().parse_args()
    warnings.simplefilter("ignore")
    data = run(opts)
    print(markdown(data))
    if opts.json:
        opts.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
