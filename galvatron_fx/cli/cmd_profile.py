"""`galvatron-fx profile`: measure this machine for `--cluster local`."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galvatron_fx.cli.cmd_cost import parse_strategy
from galvatron_fx.cli.common import (
    MODEL_HELP,
    capture,
    examples,
)

if TYPE_CHECKING:  # types only: the CLI imports torch lazily, to keep --help fast
    from galvatron_fx.lowering import Analysis
    from galvatron_fx.plan import LayerStrategy


def add(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "profile",
        parents=parents,
        help="measure this machine's compute and collectives",
        description="Measure matmul FLOP/s, memory bandwidth and every collective on --nproc "
        "local ranks, fit latency and bandwidth, and write the cluster JSON that "
        "--cluster local reads. With --model, also time each distinct layer under each "
        "strategy (the measured layer table the cost model prefers to its roofline).",
        epilog=examples(
            ("profile 4 local ranks (a few minutes)", "galvatron-fx profile --nproc 4"),
            ("a quick, rough profile", "galvatron-fx profile --quick"),
            (
                "one GPU's GEMM, attention and memory efficiency against its datasheet",
                "galvatron-fx profile --device cuda --base h100-80gb-sxm --out h100.json",
            ),
            (
                "also time a model's layers under two strategies",
                'galvatron-fx profile --nproc 2 --model gpt:layers=4,hidden=256,heads=4 --strategies "dp=2;tp=2,sp=1"',
            ),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks to measure collectives on")
    p.add_argument(
        "--device",
        default=None,
        help="measure one device's achievable GEMM, attention and memory-bound efficiency "
        "(cuda, cuda:1, cpu) against --base's datasheet, instead of the CPU ranks",
    )
    p.add_argument(
        "--base",
        default="h100-80gb-sxm",
        help="--device: the preset (or JSON) whose peaks and interconnect the result keeps",
    )
    p.add_argument("--out", type=Path, default=None, help="where to write the cluster JSON")
    p.add_argument("--max-bytes", type=int, default=256 * 2**20, help="largest message")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (tests)")
    p.add_argument("--model", help="also time each distinct layer of MODEL: " + MODEL_HELP)
    p.add_argument("--batch", type=int, default=8, help="--model: global batch (default 8)")
    p.add_argument("--seq", type=int, default=None, help="--model: sequence length")
    p.add_argument(
        "--strategies",
        default=None,
        help='--model: ";"-separated strategies to time (default: every tp x dp split of '
        "--nproc, with sp, plain DP or ZeRO-3, each recomputation)",
    )
    p.add_argument("--layers", type=Path, default=None, help="--model: layer-timing JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.runtime.profiler import DEFAULT_PROFILE, ProfileConfig, profile

    if args.device:
        return _profile_device(args)
    if args.nproc < 2:
        raise ValueError("--nproc must be >= 2: collectives need two ranks")
    cfg = ProfileConfig(nproc=args.nproc, max_bytes=args.max_bytes)
    if args.quick:
        cfg = ProfileConfig(args.nproc, 2**20, 2, (128, 256), 8 * 2**20)
    if args.model:  # fail on a bad model before minutes of measuring
        layer_inputs = _layer_inputs(args)
    spec = profile(cfg)
    out = args.out or DEFAULT_PROFILE
    spec.save(out)
    print(f"wrote {out}")
    for name, value in spec.peak_flops.items():
        print(f"matmul {name}: {value / 1e9:.1f} GFLOP/s")
    print(f"memory bandwidth: {spec.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s")
    for link in spec.links:
        if link.scope == "intra" and link.group_size:
            print(
                f"{link.kind:<15} n={link.group_size}: latency {link.latency_s * 1e6:.0f} us, "
                f"bus bandwidth {link.bus_bandwidth_bytes_per_s / 1e9:.2f} GB/s"
            )
    print(f"overlap of asynchronous collectives with compute: {spec.overlap:.2f}")
    if args.model:
        _profile_layers(args, *layer_inputs)
    return 0


def _profile_device(args: argparse.Namespace) -> int:
    import torch

    from galvatron_fx.cost_models.hardware import load_cluster
    from galvatron_fx.runtime.device_profile import profile_device

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch has no CUDA device")
    if args.out is None:
        raise ValueError("--device: give --out FILE for the measured cluster JSON")
    base = load_cluster(args.base)
    scale = 1 / 16 if args.quick else 1.0
    spec, measured = profile_device(args.device, base, scale=scale, repeats=2 if args.quick else 5)
    spec.save(args.out)
    eff = spec.efficiency
    print(f"wrote {args.out} ({measured['device']} against {base.name}'s datasheet)")
    print(
        f"GEMM {eff.gemm:.1%} of peak; attention forward {eff.attention_fwd:.1%}, backward "
        f"{eff.attention_bwd:.1%}"
    )
    print(
        f"memory-bound {eff.memory:.1%} of bandwidth; kernel floor {eff.kernel_floor_s * 1e6:.1f} us"
    )
    print("GEMM (M x N x K): measured / predicted fraction of peak")
    for c in measured["gemm_curve"]:
        print(f"  {c['m']} x {c['n']} x {c['k']}: {c['measured']:.2f} / {c['predicted']:.2f}")
    return 0


def _layer_inputs(args: argparse.Namespace) -> tuple[Any, tuple, dict, list[Any]]:
    from galvatron_fx.cost_models.layer_times import default_strategies
    from galvatron_fx.planning.layer_profile import fitting_strategies

    analysis, inputs, kwargs = capture(args.model, "cpu", args.batch, args.seq)
    if args.strategies:
        strategies = [parse_strategy(t) for t in args.strategies.split(";") if t.strip()]
    else:
        strategies = fitting_strategies(analysis, default_strategies(args.nproc))
    return analysis, inputs, kwargs, strategies


def _profile_layers(
    args: argparse.Namespace,
    analysis: Analysis,
    inputs: tuple,
    kwargs: dict,
    strategies: list[LayerStrategy],
) -> None:
    from galvatron_fx.cost_models.layer_times import DEFAULT_LAYERS
    from galvatron_fx.planning.layer_profile import profile_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = profile_layers(
            analysis,
            inputs,
            kwargs,
            strategies,
            concurrency=args.nproc,
            repeats=2 if args.quick else 5,
        )
    out = args.layers or DEFAULT_LAYERS
    times.save(out)
    print(f"wrote {out}: {len(times.entries)} (unit, strategy) timings of {args.model}")
