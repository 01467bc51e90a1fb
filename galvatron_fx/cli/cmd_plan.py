"""`galvatron-fx plan` and `explain`: search a plan, print it, report it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galvatron_fx.cli.common import (
    MODEL_HELP,
    VERBOSITY,
    capture,
    examples,
    gather_check,
    info,
    read_json,
    write_json,
)
from galvatron_fx.progress import progress

if TYPE_CHECKING:  # types only: the CLI imports torch lazily, to keep --help fast
    from torch import fx

    from galvatron_fx.gathers import GatherCheck
    from galvatron_fx.lowering import Analysis


SPACE_WORLDS = (8, 16, 32, 64)
"""The worlds `--explain-space` always counts, beside the searched one."""


def add(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        parents=parents,
        help="search the best plan for a cluster and a memory budget",
        description="Search per-layer strategies (tp, sp, dp / ZeRO, recomputation) and "
        "pipeline stages for --world devices of --cluster under --memory-gb per device; "
        "print the plan, its predicted step time and memory, and the baselines priced by "
        "the same cost model. Runs on the meta device: plan a 1024-GPU job from a laptop.",
        epilog=examples(
            (
                "Llama-2-7B's shape on 8 A100s with 36 GiB each",
                "galvatron-fx plan hf:llama:hidden_size=4096,num_hidden_layers=32,num_attention_heads=32,intermediate_size=11008 --memory-gb 36 --global-batch 32 --seq 2048",
            ),
            (
                "GPT on 64 H100s (8 nodes), the plan as JSON for train --plan",
                "galvatron-fx plan gpt:layers=48,hidden=6144,heads=48 --cluster h100-80gb-sxm:nodes=8 --memory-gb 60 --global-batch 512 --json plan.json",
            ),
            (
                "how many candidates each pruning rule leaves, 8 to 64 devices",
                "galvatron-fx plan hf:llama --memory-gb 40 --global-batch 64 --explain-space",
            ),
            (
                "a report to look at: strategy table, memory bars, pipeline timeline, baselines",
                "galvatron-fx plan gpt:layers=24,hidden=2048,heads=16 --memory-gb 8 --global-batch 64 --html report.html --png charts/",
            ),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--cluster", default="a100-80gb-sxm", help="preset[:nodes=N], local, or JSON")
    p.add_argument("--memory-gb", type=float, required=True, help="memory budget per device")
    p.add_argument("--global-batch", type=int, required=True, help="samples per step")
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="sequence length (default: the model's maximum, at most 2048 for hf: specs)",
    )
    p.add_argument("--world", type=int, default=None, help="devices (default: the cluster's)")
    p.add_argument("--precision", default="mixed", choices=("mixed", "fp32"))
    p.add_argument("--max-pipeline", type=int, default=None, help="cap the pipeline degree")
    p.add_argument("--no-baselines", action="store_true", help="skip pricing the baselines")
    p.add_argument("--json", type=Path, help="write the plan, predictions and baselines")
    p.add_argument(
        "--explain-space",
        action="store_true",
        help="print the candidate counts before and after each pruning rule for 8, 16, 32 "
        "and 64 devices and the searched world (--world, or the cluster's), Galvatron's "
        "34 -> 22 for 8 beside them, instead of searching",
    )
    _report_arguments(p)
    p.set_defaults(run=run)
    p = sub.add_parser(
        "explain",
        parents=parents,
        help="why each layer of a plan got its strategy",
        description="Read a result written by galvatron-fx plan --json: per layer, its "
        "strategy, cost, the runner-up and what bound the choice (time or memory); --diff "
        "compares two plans layer by layer; --html/--png report a saved search.",
        epilog=examples(
            ("why each layer got its strategy", "galvatron-fx explain plan.json"),
            (
                "what changed between two budgets",
                "galvatron-fx explain plan-36gb.json --diff plan-16gb.json",
            ),
            ("the report of a saved search", "galvatron-fx explain plan.json --html report.html"),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("plan", type=Path, help="a JSON written by galvatron-fx plan --json")
    p.add_argument("--diff", type=Path, default=None, help="compare with another plan JSON")
    _report_arguments(p)
    p.set_defaults(run=run_explain)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--html", type=Path, help="write a self-contained HTML report to FILE")
    p.add_argument("--png", type=Path, metavar="DIR", help="write the report's charts as PNGs")


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.compile import search

    if args.seq is not None and args.seq < 1:
        raise ValueError("--seq must be >= 1")
    # captured whole, as `compile` will capture it: the plan's fingerprint then matches
    analysis, _, _ = capture(args.model, "meta", args.global_batch, args.seq)
    if args.explain_space:
        return _explain_space(analysis, args)
    result = search(
        analysis,
        cluster=args.cluster,
        memory_budget_gb=args.memory_gb,
        global_batch=args.global_batch,
        world_size=args.world,
        precision=args.precision,
        baselines=not args.no_baselines,
        max_pipeline=args.max_pipeline,
        progress=lambda done, total: progress(done, total, "configurations searched"),
    )
    print(format_result(result))
    if VERBOSITY[0] >= 1:  # -v: what the rules could not keep split, per layer
        from galvatron_fx.gathers import format_gathers

        print()
        print(format_gathers(_gathers(analysis, args)))
    if args.json:
        write_json(args.json, result.to_json())
    _report(result.to_json(), args)
    return 0


def _gathers(analysis: Analysis, args: argparse.Namespace) -> GatherCheck:
    """The ops that would gather under a uniform tp/dp plan (`galvatron_fx.gathers`)."""

    def recapture(batch: int) -> fx.GraphModule:
        return capture(args.model, "meta", batch, args.seq, say_seq=False)[0].graph_module

    return gather_check(analysis.graph_module, args.global_batch, recapture)


def _explain_space(analysis: Analysis, args: argparse.Namespace) -> int:
    from galvatron_fx.cost_models.hardware import load_cluster
    from galvatron_fx.planning.search_step import explain_space
    from galvatron_fx.search.space import GALVATRON_8_GPUS

    spec = load_cluster(args.cluster)
    world = args.world or spec.nodes * spec.devices_per_node
    found = explain_space(
        analysis,
        cluster=spec,
        global_batch=args.global_batch,
        worlds=tuple(sorted({*SPACE_WORLDS, world})),
        precision=args.precision,
    )
    print(format_space(found, GALVATRON_8_GPUS))
    if args.json:
        write_json(args.json, {"space": found, "galvatron_8_gpus": list(GALVATRON_8_GPUS)})
    return 0


def format_space(found: list[dict[str, Any]], galvatron: tuple[int, int]) -> str:
    """One row per rule, one column per world size, Galvatron's 8-GPU figures beside."""
    worlds = [f"{row['world']} dev" for row in found]
    head = f"{'candidates (all pipeline degrees)':<70}" + "".join(f"{w:>9}" for w in worlds)
    lines = [head + f"{'Galvatron, 8':>15}"]
    for i, rule in enumerate(found[0]["rules"]):
        cells = "".join(f"{row['rules'][i]['count']:>9}" for row in found)
        ref = f"{galvatron[i]:>15}" if i < len(galvatron) else ""
        lines.append(f"{rule['rule']:<70}{cells}{ref}")
    layer = found[0]["layer"]
    if layer is not None:
        lines.append(
            f"{'priced for ' + layer + ' (heads and batch allow)':<70}"
            + "".join(f"{row['priced']:>9}" for row in found)
        )
        lines.append(
            f"{'left after dominance (slower and larger, same layout)':<70}"
            + "".join(f"{row['kept']:>9}" for row in found)
        )
    return "\n".join(lines)


def format_result(result: Any) -> str:
    """The plan table, the predictions and the baselines, as `galvatron-fx plan` prints."""
    p = result.predicted
    lines = [result.plan.table(), ""]
    lines.append(f"predicted step time   {p['step_time_s'] * 1e3:.4g} ms")
    lines.append(f"samples/s             {p['samples_per_s']:.2f}")
    lines.append(f"TFLOP/s per device    {p['tflops_per_device']:.1f}")
    for k, mem in enumerate(p["peak_memory_bytes"]):
        lines.append(f"stage {k} peak memory  {mem / 2**30:.2f} GiB (upper bound)")
    lines.append(f"search time           {result.search_time_s:.2f} s")
    if result.baselines:
        lines.append("")
        lines.append(f"{'baseline':<24}{'samples/s':>12}{'plan / baseline':>18}")
        for name, sps in result.baselines.items():
            if sps is None:
                lines.append(f"{name:<24}{'does not fit':>12}")
            else:
                lines.append(f"{name:<24}{sps:>12.2f}{p['samples_per_s'] / sps:>17.3f}x")
    return "\n".join(lines)


def run_explain(args: argparse.Namespace) -> int:
    from galvatron_fx.search.explain import diff_plans, format_explain

    data = read_json(args.plan)
    _report(data, args)
    if args.diff is not None:
        print(diff_plans(data, read_json(args.diff), (args.plan.name, args.diff.name)))
        return 0
    if "units" not in data:
        raise ValueError(
            f"{args.plan}: no per-unit explanations (write it with galvatron-fx plan --json)"
        )
    print(format_explain(data))
    return 0


def _report(data: Any, args: argparse.Namespace) -> None:
    """--html and --png: the plan report (`galvatron_fx.report`), written atomically."""
    if args.html or args.png:
        from galvatron_fx.report import write_report

        for path in write_report(data, html=args.html, png=args.png):
            info(f"wrote {path}")
