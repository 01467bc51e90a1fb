"""`galvatron-fx`: the command line. Subcommands: inspect, profile (later issues add cost,
plan, train, explain).

    galvatron-fx inspect MODEL [--batch B] [--seq S] [--device meta|cpu] [--json FILE] [--dot FILE]
    galvatron-fx profile [--nproc N] [--out FILE] [--max-bytes B] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_MODEL_HELP = (
    "model spec: gpt:layers=12,hidden=768,heads=12,vocab=50257,seq=1024 | hf:gpt2 | "
    "hf:llama:hidden_size=256,num_hidden_layers=4 | path/to/file.py:factory"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galvatron-fx", description="Automatic-parallelism compiler for PyTorch training."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="capture a model and print its layers and costs")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: model max)")
    p.add_argument(
        "--device",
        default="meta",
        choices=("meta", "cpu"),
        help="where to build the model: meta allocates nothing (default)",
    )
    p.add_argument("--json", type=Path, help="write the layer table as JSON to FILE")
    p.add_argument("--dot", type=Path, help="write the layer graph as Graphviz to FILE")
    p.add_argument("--print-after", default="", help="comma-separated passes to print after")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("profile", help="measure this machine's compute and collectives")
    p.add_argument("--nproc", type=int, default=2, help="ranks to measure collectives on")
    p.add_argument("--out", type=Path, default=None, help="where to write the cluster JSON")
    p.add_argument("--max-bytes", type=int, default=256 * 2**20, help="largest message")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (tests)")
    p.set_defaults(run=_profile)
    return parser


def _profile(args: argparse.Namespace) -> int:
    from galvatron_fx.runtime.profiler import DEFAULT_PROFILE, ProfileConfig, profile

    if args.nproc < 2:
        raise ValueError("--nproc must be >= 2: collectives need two ranks")
    cfg = ProfileConfig(nproc=args.nproc, max_bytes=args.max_bytes)
    if args.quick:
        cfg = ProfileConfig(args.nproc, 2**20, 2, (128, 256), 8 * 2**20)
    spec = profile(cfg)
    out = args.out or DEFAULT_PROFILE
    _write(out, json.dumps(spec.to_json(), indent=2) + "\n")
    for name, value in spec.peak_flops.items():
        print(f"matmul {name}: {value / 1e9:.1f} GFLOP/s")
    print(f"memory bandwidth: {spec.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s")
    for link in spec.links:
        if link.scope == "intra" and link.group_size:
            print(
                f"{link.kind:<15} n={link.group_size}: latency {link.latency_s * 1e6:.0f} us, "
                f"bus bandwidth {link.bus_bandwidth_bytes_per_s / 1e9:.2f} GB/s"
            )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import galvatron_fx as gfx
    from galvatron_fx.models.spec import parse_model_spec

    if args.batch < 1 or (args.seq is not None and args.seq < 1):
        raise ValueError("--batch and --seq must be >= 1")
    spec = parse_model_spec(args.model)
    model = spec.build(args.device)
    inputs, kwargs = spec.example_inputs(model, args.batch, args.seq)
    seq = args.seq if args.seq is not None else spec.max_seq(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the use_cache notice is expected here
        result = gfx.analyze(
            model, inputs, kwargs, print_after=[s for s in args.print_after.split(",") if s]
        )
    gm = result.graph_module
    print(f"{args.model}  batch={args.batch} seq={seq}  ({len(gm.graph.nodes)} graph nodes)")
    print(gfx.summary(gm))
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items())
    print(f"passes: {timings}")
    if args.json:
        data = gfx.to_json(gm, model=args.model, batch=args.batch, seq=seq)
        _write(args.json, json.dumps(data, indent=2) + "\n")
    if args.dot:
        _write(args.dot, gfx.to_dot(gm))
    return 0


def _write(path: Path, text: str) -> None:
    """Write through a temporary file so a failure leaves no half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, ImportError, OSError) as err:
        print(f"galvatron-fx {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # CaptureError and PassError carry their own explanation
        print(f"galvatron-fx {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
