"""The whole benchmark suite in one run: `make bench` (about 20 minutes on 2 cores).

Profiles this machine once (the `local` cluster the cost-model and plan-quality sections
price with), then runs every section and writes `bench/results/latest.md` (tables, targets,
where each figure came from), `latest.json` (every number) and one PNG per section. Every
figure is a ratio or an error measured in this run, never a time compared across runs. A
target reads "met" only where the figure was earned: a side or plan that failed, a loss that
disagrees or a plan over its memory cap reads "missed", and a comparison that has nothing to
compare with (every baseline that fits is the searched plan itself) reads "n/a".

| section      | what                                                         | script           |
|--------------|--------------------------------------------------------------|------------------|
| runtime      | compiled DP/ZeRO-3/TP/SP/PP against DDP/FSDP2/DTensor/pipelining | runtime.py   |
| cost_model   | predicted against measured step time and peak memory: plans, shapes and a model the layer profile did not see | cost_model.py |
| layer_timing | the profiler's unit times summed against a timed step         | layer_timing.py |
| search       | search time against layers and devices; the anchors           | search.py       |
| plan_quality | the predicted table, and auto against baselines run for real  | plan_quality*.py |
| calibration  | published GPU runs priced as published; the search's plan for each | calibration.py |
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import calibration
import compile_time
import cost_model
import layer_timing
import plan_quality
import plan_quality_measured
import plots
import runtime
import search
import torch
from pytorch_side import SMOKE, Config, ensure_profile

RESULTS = Path(__file__).parent / "results"
GPU_CONFIG = dict(layers=8, hidden=1024, heads=16, vocab=32000, seq=1024, batch=16, steps=20)
"""The runtime section's GPT on GPUs: big enough that a step is not all launch overhead."""
CPU_ONLY = {
    "cost_model": "the profiler and the memory probe measure CPU ranks (gloo) only",
    "measured plan quality": "it runs plans on CPU ranks, priced by the CPU profile",
    "layer_timing": "it checks the profiler's timer on CPU ranks, as the cost model uses it",
}
"""What the GPU mode leaves out, and why (the report says so)."""
Data = dict[str, Any]
TargetRow = tuple[str, str, str, str]
"""(figure, value, target, verdict): verdict is "met", "missed" or "n/a"."""
VERDICTS = {"met": "met", "missed": "**missed**", "n/a": "n/a"}


@dataclass(frozen=True)
class Section:
    title: str
    run: Callable[[argparse.Namespace], Data]
    markdown: Callable[[Data], str]
    plot: Callable[[Data, Path], bool]
    targets: Callable[[Data], list[TargetRow]]


def _runtime(opts: argparse.Namespace) -> Data:
    if opts.device == "cuda":
        cfg = Config(**GPU_CONFIG, world=opts.world, device="cuda")  # type: ignore[arg-type]
    else:
        cfg = SMOKE if opts.smoke else Config(world=2, steps=16)
    return runtime.summary(cfg, runtime.run(cfg, list(runtime.CASES), 1 if opts.smoke else 5))


def _script_opts(module: Any, opts: argparse.Namespace) -> argparse.Namespace:
    """A section script's own options at their defaults, with the suite's profile and size."""
    args = module.parser().parse_args([])
    args.profile, args.smoke = opts.profile, opts.smoke
    return args


def _plan_quality(opts: argparse.Namespace) -> Data:
    if opts.smoke:
        tiny = {"tiny": search.TINY}
        rows = plan_quality.run(tiny, {"8 x A100": ("a100-80gb-sxm", 8, 16)}, (0.02,))
        long = plan_quality.run_long_smoke()
    else:
        rows = plan_quality.run(plan_quality.MODELS, plan_quality.CLUSTERS, plan_quality.BUDGETS_GB)
        long = plan_quality.run_long()
    if opts.device == "cuda":
        return {"predicted": rows, "long": long}
    measured = plan_quality_measured.run(_script_opts(plan_quality_measured, opts))
    return {"predicted": rows, "long": long, "measured": measured}


def _plan_quality_markdown(data: Data) -> str:
    predicted = plan_quality.table(data["predicted"])
    if "long" in data:
        predicted += (
            "\n\n**Ulysses on long sequences** (a 7B GPT, predicted; `ulysses`: the plan "
            "against the same search without Ulysses among the candidates):\n\n"
            + plan_quality.long_table(data["long"])
        )
    if "measured" not in data:
        return f"Measured: not run ({CPU_ONLY['measured plan quality']}).\n\n{predicted}"
    return (
        "**Measured on local ranks**, under memory caps per rank:\n\n"
        + plan_quality_measured.markdown(data["measured"])
        + "\n\n**Predicted** by the cost model for large clusters (samples/s of the plan; "
        "each baseline as plan / baseline; `-`: does not fit; `= plan`: the baseline's plan "
        "is the searched plan, left out of `vs best other`):\n\n" + predicted
    )


SECTIONS: dict[str, Section] = {
    "runtime": Section(
        "Runtime overhead against PyTorch's own parallelism",
        _runtime, runtime.markdown, plots.runtime, runtime.targets,
    ),
    "cost_model": Section(
        "Cost-model error",
        lambda opts: cost_model.run(_script_opts(cost_model, opts)),
        cost_model.markdown, plots.cost_model, cost_model.targets,
    ),
    "layer_timing": Section(
        "Layer timing against timed steps",
        lambda opts: layer_timing.run(_script_opts(layer_timing, opts)),
        layer_timing.markdown, lambda d, path: False, layer_timing.targets,
    ),
    "search": Section(
        "Search speed",
        lambda opts: search.run(opts.smoke), search.markdown, plots.search, search.targets,
    ),
    "plan_quality": Section(
        "Plan quality",
        _plan_quality, _plan_quality_markdown,
        lambda d, path: "measured" in d and plots.plan_quality(d["measured"], path),
        lambda d: plan_quality_measured.targets(d["measured"]) if "measured" in d else [],
    ),
    "calibration": Section(
        "Calibration against published GPU runs",
        lambda opts: {"rows": calibration.run(
            calibration.SMOKE_ROWS if opts.smoke else None, search=not opts.smoke
        )},
        lambda d: calibration.table(d["rows"]), lambda d, path: False,
        lambda d: calibration.targets(d["rows"]),
    ),
    "compile": Section(
        "End to end: compile() by pass",
        lambda opts: compile_time.run(_script_opts(compile_time, opts)),
        compile_time.markdown, plots.compile_time, lambda d: [],
    ),
}  # fmt: skip


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


def report(results: dict[str, Data], seconds: dict[str, float], images: dict[str, str], device: str = "cpu") -> str:  # fmt: skip
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
    for name, data in results.items():
        for figure, value, target, verdict in SECTIONS[name].targets(data):
            lines.append(f"| {figure} | {value} | {target} | {VERDICTS[verdict]} |")
    for k, (name, data) in enumerate(results.items()):
        section = SECTIONS[name]
        lines += ["", f"## {k + 1}. {section.title}", "", section.markdown(data)]
        if name in images:
            lines += ["", f"![{name}]({images[name]})"]
    return "\n".join(lines) + "\n"


def _profile(opts: argparse.Namespace) -> float:
    """Profile this machine into the output folder unless the user named a profile."""
    start = time.perf_counter()
    if opts.profile is None and opts.device == "cpu":
        opts.profile = opts.out / "local-profile.json"
        # this run's machine, not an earlier one's; the same for the layer table the cost-model
        # section writes beside it (a save merges into an older table of the same ranks)
        opts.profile.unlink(missing_ok=True)
        opts.profile.with_name(opts.profile.stem + ".layers.json").unlink(missing_ok=True)
        ensure_profile(opts.profile, 2 if opts.smoke else 4, opts.smoke)
    return time.perf_counter() - start


def _write(out: Path, results: dict[str, Data], seconds: dict[str, float], device: str) -> None:
    """Plots, JSON and report, written once every section has run: a failed run leaves the
    previous report whole (each file is replaced by a rename)."""
    images = {}
    for name, data in results.items():
        tmp = out / f".{name}.tmp.png"  # matplotlib picks the format from the suffix
        if SECTIONS[name].plot(data, tmp):
            tmp.replace(out / f"{name}.png")
            images[name] = f"{name}.png"
    for path, text in (
        (out / "latest.json", json.dumps(results, indent=2) + "\n"),
        (out / "latest.md", report(results, seconds, images, device)),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one run each")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
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
    results: dict[str, Data] = {}
    for name in sections:
        print(f"== {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[name] = SECTIONS[name].run(opts)
        seconds[name] = time.perf_counter() - start
        print(SECTIONS[name].markdown(results[name]), file=sys.stderr, flush=True)
    _write(opts.out, results, seconds, opts.device)
    print(f"wrote {opts.out / 'latest.md'} in {sum(seconds.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
