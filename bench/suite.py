"""The whole benchmark suite in one run: `make bench` (about 20 minutes on 2 cores).

Profiles this machine once (the `local` cluster the cost-model and plan-quality sections
price with), then runs every section and writes `bench/results/latest.md` (tables, targets,
where each figure came from), `latest.json` (every number) and one PNG per section. Every
figure is a ratio or an error measured in this run, never a time compared across runs.

| section      | what                                                         | script           |
|--------------|--------------------------------------------------------------|------------------|
| runtime      | compiled DP/ZeRO-3/TP/SP/PP against DDP/FSDP2/DTensor/pipelining | runtime.py   |
| cost_model   | predicted against measured step time and peak memory, 12 plans | cost_model.py  |
| search       | search time against layers and devices; the anchors           | search.py       |
| plan_quality | the predicted table, and auto against baselines run for real  | plan_quality*.py |
| compile      | compile() wall time by pass; the front end against export     | compile_time.py |

    python bench/suite.py                          # everything, into bench/results/
    python bench/suite.py --sections runtime,search
    python bench/suite.py --smoke --out /tmp/b     # tiny sizes: the test suite runs this
    python bench/suite.py --profile ~/.cache/galvatron_fx/local.json   # reuse a profile

On a GPU machine, `bench/gpu.sh` runs the sections that apply there (see its header).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import compile_time
import cost_model
import plan_quality
import plan_quality_measured
import plots
import runtime
import search
import torch
from pytorch_side import SMOKE, Config

from galvatron_fx.runtime.profiler import ProfileConfig, profile

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("runtime", "cost_model", "search", "plan_quality", "compile")
TITLES = {
    "runtime": "Runtime overhead against PyTorch's own parallelism",
    "cost_model": "Cost-model error",
    "search": "Search speed",
    "plan_quality": "Plan quality",
    "compile": "End to end: compile() by pass",
}


GPU_CONFIG = dict(layers=8, hidden=1024, heads=16, vocab=32000, seq=1024, batch=16, steps=20)
"""The runtime section's GPT on GPUs: big enough that a step is not all launch overhead."""


def _runtime(opts: argparse.Namespace) -> dict[str, Any]:
    if opts.device == "cuda":
        cfg = Config(**GPU_CONFIG, world=opts.world, device="cuda")  # type: ignore[arg-type]
    else:
        cfg = SMOKE if opts.smoke else Config(world=2, steps=16)
    return runtime.summary(cfg, runtime.run(cfg, list(runtime.CASES), 1 if opts.smoke else 5))


CPU_ONLY = {
    "cost_model": "the profiler and the memory probe measure CPU ranks (gloo) only",
    "measured plan quality": "it runs plans on CPU ranks, priced by the CPU profile",
}
"""What the GPU mode leaves out, and why (the report says so)."""


def _cost_model(opts: argparse.Namespace) -> dict[str, Any]:
    args = cost_model.parser().parse_args(["--profile", str(opts.profile)])
    args.smoke = opts.smoke
    return cost_model.run(args)


def _search(opts: argparse.Namespace) -> dict[str, Any]:
    return search.run(opts.smoke)


def _plan_quality(opts: argparse.Namespace) -> dict[str, Any]:
    if opts.smoke:
        tiny = {"tiny": search.TINY}
        rows = plan_quality.run(tiny, {"8 x A100": ("a100-80gb-sxm", 8, 16)}, (0.02,))
    else:
        rows = plan_quality.run(plan_quality.MODELS, plan_quality.CLUSTERS, plan_quality.BUDGETS_GB)
    if opts.device == "cuda":
        return {"predicted": rows}
    args = plan_quality_measured.parser().parse_args(["--profile", str(opts.profile)])
    args.smoke = opts.smoke
    return {"predicted": rows, "measured": plan_quality_measured.run(args)}


def _compile(opts: argparse.Namespace) -> dict[str, Any]:
    args = compile_time.parser().parse_args([])
    args.profile = opts.profile
    args.smoke = opts.smoke
    return compile_time.run(args)


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "runtime": _runtime,
    "cost_model": _cost_model,
    "search": _search,
    "plan_quality": _plan_quality,
    "compile": _compile,
}


def _markdown(section: str, data: dict[str, Any]) -> str:
    if section == "runtime":
        return runtime.markdown(data)
    if section == "cost_model":
        return cost_model.markdown(data)
    if section == "search":
        return search.markdown(data)
    if section == "plan_quality":
        if "measured" not in data:
            return "Measured: not run (" + CPU_ONLY["measured plan quality"] + ").\n\n" + plan_quality.table(data["predicted"])  # fmt: skip
        measured = plan_quality_measured.markdown(data["measured"])
        return (
            "**Measured on local ranks**, under three memory caps:\n\n"
            + measured
            + "\n\n**Predicted** by the cost model for large clusters (samples/s of the plan; "
            "each baseline as plan / baseline; `-`: does not fit):\n\n"
            + plan_quality.table(data["predicted"])
        )
    return compile_time.markdown(data)


def _plot(section: str, data: dict[str, Any], out: Path) -> str | None:
    path = out / f"{section}.png"
    draw = {
        "runtime": lambda: plots.runtime(data, path),
        "cost_model": lambda: plots.cost_model(data, path),
        "search": lambda: plots.search(data, path),
        "plan_quality": lambda: "measured" in data and plots.plan_quality(data["measured"], path),
        "compile": lambda: plots.compile_time(data, path),
    }
    return path.name if draw[section]() else None


def targets(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, bool]]:
    """(figure, value, target, met) for every target the issue sets that this run measured."""
    out = []
    for case, c in results.get("runtime", {}).get("cases", {}).items():
        if c["median"] is not None:
            value = f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f})"
            out.append((f"runtime {case} / {c['baseline']}", value, "<= 1.0", c["median"] <= 1.0))
    if cm := results.get("cost_model"):
        out += [
            (
                "cost model: median time error",
                f"{cm['time_median_error']:.1%}",
                "<= 10%",
                cm["time_median_error"] <= 0.10,
            ),
            ("cost model: Spearman", f"{cm['spearman']:.2f}", ">= 0.9", cm["spearman"] >= 0.9),
            (
                "cost model: worst memory error",
                f"{cm['memory_worst_error']:.1%}",
                "<= 5%",
                cm["memory_worst_error"] <= 0.05,
            ),
        ]
    for r in results.get("search", {}).get("anchors", []):
        out.append((f"search: {r['case']}", f"{r['search_time_s']:.2f} s", f"<= {r['target_s']:.0f} s", r["search_time_s"] <= r["target_s"]))  # fmt: skip
    for row in results.get("plan_quality", {}).get("measured", {"rows": []})["rows"]:
        best = plan_quality_measured.best_ratio(row) if "ratios" in row else None
        if best is not None:
            cap = f"{row['cap_gb'] * 1024:.0f} MiB"
            out.append((f"plan quality, cap {cap}: auto / best baseline", f"{best:.2f}x", ">= 1.0", best >= 1.0))  # fmt: skip
    return out


def _machine() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpus = ""
    if torch.cuda.is_available():  # called after the ranks: a forked child cannot use CUDA
        count, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        gpus = f"{count} x {name} (CUDA {torch.version.cuda}), "
    return (
        f"{platform.node()}: {gpus}{os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}; galvatron_fx at {commit}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def report(results: dict[str, Any], seconds: dict[str, float], images: dict[str, str | None], device: str = "cpu") -> str:  # fmt: skip
    lines = [
        "# galvatron_fx benchmark report",
        "",
        f"Machine: {_machine()}. Written by `make bench` (`bench/suite.py`) in "
        f"{sum(seconds.values()) / 60:.1f} min: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + ".",
        *[
            f"Not run on GPUs: {k}, because {why}."
            for k, why in CPU_ONLY.items()
            if device == "cuda"
        ],
        "",
        "## Targets",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
    ]
    for name, value, target, met in targets(results):
        lines.append(f"| {name} | {value} | {target} | {'met' if met else '**missed**'} |")
    for k, section in enumerate(s for s in SECTIONS if s in results):
        lines += ["", f"## {k + 1}. {TITLES[section]}", "", _markdown(section, results[section])]
        if images.get(section):
            lines += ["", f"![{section}]({images[section]})"]
    return "\n".join(lines) + "\n"


def _profile(opts: argparse.Namespace) -> float:
    """Profile this machine into `opts.profile` unless the user named an existing one."""
    start = time.perf_counter()
    if opts.profile is None and opts.device == "cpu":
        opts.profile = opts.out / "local-profile.json"
        quick = ProfileConfig(2, 2**20, 2, (128, 256), 8 * 2**20)
        profile(quick if opts.smoke else ProfileConfig(4, 16 * 2**20)).save(opts.profile)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one run each")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--profile", type=Path, help="an existing `galvatron-fx profile` JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bench/gpu.sh")
    p.add_argument("--world", type=int, default=2, help="GPUs (NCCL ranks) with --device cuda")
    opts = p.parse_args()
    sections = [s for s in opts.sections.split(",") if s]
    if opts.device == "cuda":
        sections = [s for s in sections if s not in CPU_ONLY]
    if unknown := set(sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if opts.profile is not None and not opts.profile.exists():
        p.error(f"--profile {opts.profile}: no such file (omit it to profile this machine)")
    opts.out.mkdir(parents=True, exist_ok=True)
    runtime.setup()
    seconds = {"profile": _profile(opts)}
    results: dict[str, Any] = {}
    images: dict[str, str | None] = {}
    for section in sections:
        print(f"== {section}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[section] = RUNNERS[section](opts)
        seconds[section] = time.perf_counter() - start
        print(_markdown(section, results[section]), file=sys.stderr, flush=True)
        images[section] = _plot(section, results[section], opts.out)
    (opts.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (opts.out / "latest.md").write_text(report(results, seconds, images, opts.device))
    print(f"wrote {opts.out / 'latest.md'} in {sum(seconds.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
