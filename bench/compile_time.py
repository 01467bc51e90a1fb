"""End to end: `galvatron_fx.compile()` wall time, broken down by pass.

The reference GPT compiled on local gloo ranks, its plan searched by rank 0 under a memory
cap on the profiled `local` cluster (the path a user takes with `compile(cluster=...,
memory_budget_gb=...)`): every step `compile` times (`compiled.compile_timings_s`: the
capture and analysis of the whole batch, the search, the micro-batch capture when the plan has
micro-batches, each parallel pass, the stage split, and `runtime`: process groups, gradient
buckets and the optimizer), the slowest rank's figures. Also one plan given by hand with
stages, so the stage split shows, and the front end on a Llama-2-7B shape on the meta device
against `torch.export` alone (`capture.py`).

    python bench/compile_time.py
    python bench/compile_time.py --smoke
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import capture
import torch
import torch._dynamo  # creating an optimizer imports it: import once, before forking
from pytorch_side import seeded

import galvatron_fx as gfx
from galvatron_fx.cost_models.hardware import load_cluster
from galvatron_fx.plan import LayerStrategy, PipelineConfig
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.profiler import DEFAULT_PROFILE

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=1024,seq=128"
SMOKE_SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
PRESET = "a100-80gb-sxm"
"""The cluster searched for when no local profile is given (the GPU mode)."""


def _compile(rank: int, world: int, spec_text: str, batch: int, how: dict[str, Any]) -> dict[str, float]:  # fmt: skip
    model, args, kwargs = seeded(spec_text, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "cap_gb" in how:
            profiled = how["profile"] is not None
            cluster = load_cluster("local", local_profile=how["profile"]) if profiled else PRESET
            cm = gfx.compile(model, args, kwargs, cluster=cluster, memory_budget_gb=how["cap_gb"])
        else:
            analysis = gfx.analyze(model, args, kwargs)
            half = len(model.blocks) // 2  # type: ignore[arg-type]
            pipeline = PipelineConfig(world, (f"blocks.{half}",), micro_batches=4)
            plan = analysis.plan(LayerStrategy(), world_size=world, pipeline=pipeline)
            cm = gfx.compile(model, args, kwargs, plan=plan)
    return dict(cm.compile_timings_s)


def _slowest(per_rank: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r.get(k, 0.0) for r in per_rank) for k in per_rank[0]}


def run(opts: argparse.Namespace) -> dict[str, Any]:
    spec, world = (SMOKE_SPEC, 2) if opts.smoke else (SPEC, opts.world)
    profiled = opts.profile is not None and Path(opts.profile).exists()
    searched = {"profile": str(opts.profile) if profiled else None, "cap_gb": opts.cap_gb}
    out: dict[str, Any] = {"model": spec, "world": world, "batch": opts.batch, "cases": {}}
    out["cases"][f"searched plan, cap {opts.cap_gb * 1024:.0f} MiB"] = _slowest(
        fork_ranks(_compile, world, spec, opts.batch, searched)
    )
    out["cases"]["given plan, 2 stages x 4 micro-batches"] = _slowest(
        fork_ranks(_compile, 2, spec, opts.batch, {})
    )
    front = capture.SMOKE if opts.smoke else capture.LLAMA2_7B
    out["front_end"] = capture.run(front, 1, 16 if opts.smoke else 2048, 1 if opts.smoke else 3)
    return out


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"{data['model']}, batch {data['batch']}: `compile()` on local gloo ranks, seconds per "
        "step (the slowest rank).",
        "",
        "| case | total s | " + " | ".join(_steps(data)) + " |",
        "|---|---|" + "---|" * len(_steps(data)),
    ]
    for case, t in data["cases"].items():
        cells = [f"{t[k]:.2f}" if k in t else "-" for k in _steps(data)]
        lines.append(f"| {case} | {sum(t.values()):.2f} | " + " | ".join(cells) + " |")
    f = data["front_end"]
    lines += [
        "",
        f"Front end on {f['model'].split(',')[0]}-shaped model ({f['params'] / 1e9:.2f}B "
        f"parameters, meta device, seq {f['seq']}): capture + layers + costs "
        f"{f['front_end_s']:.2f} s against `torch.export` alone {f['export_only_s']:.2f} s "
        f"({f['front_end_s'] / f['export_only_s']:.2f}x); target < {capture.TARGET_S:.0f} s: "
        + ("met" if f["front_end_s"] < capture.TARGET_S else "**missed**")
        + ". Per pass: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in f["per_pass_s"].items()),
    ]
    return "\n".join(lines)


def _steps(data: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(k for t in data["cases"].values() for k in t))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cap-gb", type=float, default=0.06)
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help=f"else {PRESET}")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path)
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
