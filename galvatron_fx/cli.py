"""`galvatron-fx`: the command line. Subcommands: inspect, profile, cost, plan, explain, train.

galvatron-fx inspect MODEL [--batch B] [--seq S] [--device meta|cpu] [--json FILE] [--dot FILE]
galvatron-fx profile [--nproc N] [--out FILE] [--max-bytes B] [--quick]
                     [--model MODEL --batch B --seq S [--strategies "dp=2;tp=2,sp=1"]]
galvatron-fx cost MODEL --cluster C --batch B --seq S --strategy "tp=4,dp=2,zero=3,ckpt=full"
galvatron-fx plan MODEL --cluster C --memory-gb M --global-batch B [--seq S] [--json FILE]
galvatron-fx explain PLAN.json [--diff OTHER.json]
galvatron-fx train MODEL --nproc N [--cluster C --memory-gb M] [--global-batch B]
                   [--steps K] [--plan FILE] [--data FILE] [--save DIR] [--save-every K]
                   [--resume DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    p.add_argument("--model", help="also time each distinct layer of MODEL: " + _MODEL_HELP)
    p.add_argument("--batch", type=int, default=8, help="--model: global batch (default 8)")
    p.add_argument("--seq", type=int, default=None, help="--model: sequence length")
    p.add_argument(
        "--strategies",
        default=None,
        help='--model: ";"-separated strategies to time (default: every tp x dp split of '
        "--nproc, with sp, plain DP or ZeRO-3, each recomputation)",
    )
    p.add_argument("--layers", type=Path, default=None, help="--model: layer-timing JSON")
    p.set_defaults(run=_profile)
    p = sub.add_parser("cost", help="predicted time and memory of a uniform strategy")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--cluster", default="a100-80gb-sxm", help="preset[:nodes=N], local, or JSON")
    p.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: model max)")
    p.add_argument(
        "--strategy", default="dp=1", help='e.g. "tp=4,dp=2,sp=1,zero=3,ckpt=full,vocab=1"'
    )
    p.add_argument("--dtype", default="bf16", help="compute dtype for peak FLOP/s")
    p.add_argument("--precision", default="mixed", choices=("mixed", "fp32"))
    p.add_argument("--json", type=Path, help="write per-layer and total figures to FILE")
    p.add_argument("--explain", metavar="UNIT", help="print UNIT's formulas with their numbers")
    p.add_argument(
        "--layers",
        type=Path,
        default=None,
        help="measured layer times (profile --model) to use with --cluster local "
        "(default: the cached ones)",
    )
    p.set_defaults(run=_cost)
    p = sub.add_parser("plan", help="search the best plan for a cluster and a memory budget")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--cluster", default="a100-80gb-sxm", help="preset[:nodes=N], local, or JSON")
    p.add_argument("--memory-gb", type=float, required=True, help="memory budget per device")
    p.add_argument("--global-batch", type=int, required=True, help="samples per step")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: model max)")
    p.add_argument("--world", type=int, default=None, help="devices (default: the cluster's)")
    p.add_argument("--precision", default="mixed", choices=("mixed", "fp32"))
    p.add_argument("--max-pipeline", type=int, default=None, help="cap the pipeline degree")
    p.add_argument("--no-baselines", action="store_true", help="skip pricing the baselines")
    p.add_argument("--json", type=Path, help="write the plan, predictions and baselines")
    p.set_defaults(run=_plan)
    p = sub.add_parser("explain", help="why each layer of a plan got its strategy")
    p.add_argument("plan", type=Path, help="a JSON written by galvatron-fx plan --json")
    p.add_argument("--diff", type=Path, default=None, help="compare with another plan JSON")
    p.set_defaults(run=_explain_plan)
    _train_parser(sub)
    return parser


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="compile MODEL and train it on local ranks (or as one rank under torchrun)",
        description="Without torchrun, starts --nproc local ranks through torch.distributed.run; "
        "under torchrun (multi-node: torchrun --nnodes N ... -m galvatron_fx.cli train ...) "
        "each process is one rank.",
    )
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--nproc", type=int, default=2, help="local ranks to start (default 2)")
    p.add_argument("--global-batch", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: model max)")
    p.add_argument("--steps", type=int, default=10, help="train until this step (default 10)")
    p.add_argument("--plan", type=Path, default=None, help="a plan JSON (skips the search)")
    p.add_argument("--cluster", default=None, help="search a plan for this cluster (or local)")
    p.add_argument("--memory-gb", type=float, default=None, help="--cluster: budget per device")
    p.add_argument("--data", type=Path, default=None, help="token file (numpy memmap of ids)")
    p.add_argument("--data-dtype", default="uint16", help="--data element type (default uint16)")
    p.add_argument("--save", type=Path, default=None, help="checkpoint directory")
    p.add_argument("--save-every", type=int, default=0, help="also save every K steps")
    p.add_argument("--resume", type=Path, default=None, help="resume from this checkpoint dir")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from galvatron_fx.train import TrainConfig, launch, train, under_launcher

    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if config.cluster is not None and config.memory_gb is None:
        raise ValueError("--cluster needs --memory-gb (the memory budget per device)")
    if under_launcher():
        train(config)
        return 0
    return launch(config, args.argv)


_ZERO = {"0": "allreduce", "1": "zero1", "2": "zero2", "3": "zero3"}


def parse_strategy(text: str) -> Any:
    """`tp=4,dp=2,sp=1,zero=3,ckpt=full,vocab=1` -> LayerStrategy (ValueError names the key)."""
    from galvatron_fx.plan import LayerStrategy

    fields: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key in ("tp", "dp"):
            if not value.isdigit():
                raise ValueError(f"--strategy: {key}={value!r} is not a whole number")
            fields[key] = int(value)
        elif key in ("sp", "vocab"):
            fields["sp" if key == "sp" else "vocab_parallel"] = value in ("1", "true", "on")
        elif key == "zero":
            if value not in _ZERO:
                raise ValueError(f"--strategy: zero={value!r}: give 0, 1, 2 or 3")
            fields["dp_mode"] = _ZERO[value]
        elif key == "ckpt":
            fields["recompute"] = value
        elif key == "strided":
            fields["tp_consecutive"] = value not in ("1", "true", "on")
        else:
            raise ValueError(
                f"--strategy: unknown key {key!r} (tp, dp, sp, zero, ckpt, vocab, strided)"
            )
    return LayerStrategy(**fields)


def _cost(args: argparse.Namespace) -> int:
    from galvatron_fx.cost_models.hardware import load_cluster
    from galvatron_fx.passes.plan_costs import plan_costs, plan_peak

    cluster = load_cluster(args.cluster)
    strategy = parse_strategy(args.strategy)
    layer_times = _layer_times(args.layers, cluster.name)
    analysis, _, _ = _capture(args.model, "meta", args.batch, args.seq)
    units = analysis.units
    plan = analysis.plan(strategy, world_size=strategy.devices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep-copying the graph's pytree specs warns
        costs = plan_costs(
            analysis,
            plan,
            cluster,
            dtype=args.dtype,
            precision=args.precision,
            layer_times=layer_times,
        )
    peak = plan_peak(costs, plan, cluster, args.precision)
    _print_costs(costs, cluster.name, strategy.short())
    where = f"{peak.phase} {peak.unit}".strip()
    print(f"peak memory {peak.peak_bytes / 2**30:.3f} GiB (during {where})")
    if args.explain:
        cost = next((c for c in costs if c.unit == args.explain), None)
        if cost is None:
            raise ValueError(f"--explain: no unit {args.explain!r}; units: {units}")
        _explain(analysis, plan, cluster, cost, args.precision)
    if args.json:
        total = {
            "step_time_s": sum(c.time_s for c in costs),
            "peak_memory_bytes": peak.peak_bytes,
            "peak_phase": where,
        }
        data = {
            "cluster": cluster.name,
            "strategy": strategy.short(),
            "total": total,
            "layers": [{"unit": c.unit, **_cost_fields(c)} for c in costs],
        }
        _write(args.json, json.dumps(data, indent=2) + "\n")
    return 0


def _layer_times(path: Path | None, cluster: str) -> Any:
    """Measured layer times apply to the machine that measured them: `--cluster local`."""
    from galvatron_fx.runtime.layer_profile import DEFAULT_LAYERS, load_layer_times

    if cluster != "local":
        if path is not None:
            raise ValueError("--layers: measured layer times apply only to --cluster local")
        return None
    if path is not None and not path.exists():
        raise ValueError(f"--layers: no file {path} (run galvatron-fx profile --model first)")
    return load_layer_times(path or DEFAULT_LAYERS)


def _explain(analysis: Any, plan: Any, cluster: Any, cost: Any, precision: Any) -> None:
    from galvatron_fx.cost_models.communication import explain, spans_nodes
    from galvatron_fx.cost_models.compute import explain_training_flops
    from galvatron_fx.cost_models.memory import explain_model_states
    from galvatron_fx.summary import unit_flops

    unit = cost.unit
    flops = unit_flops(analysis.graph_module)
    s = plan.strategy(unit)
    print(f"\n{unit} under {s.short()}")
    print(explain_training_flops(flops[unit], s.recompute))
    print(f"  (this rank computes 1/tp of split ops, 1/dp of the batch: tp={s.tp}, dp={s.dp})")
    print(explain_model_states(cost.params, s.dp, s.dp_mode, precision))
    spans = spans_nodes(s, cluster)
    for c in cost.collectives:
        link = cluster.link(c.kind, c.group_size, spans(c.group_size))
        print(f"{c.phase} {c.source}: " + explain(c.kind, c.size_bytes, c.group_size, link))


def _cost_fields(c: Any) -> dict[str, Any]:
    return {
        "time_s": c.time_s,
        "fwd_s": c.fwd_s,
        "bwd_s": c.bwd_s,
        "recompute_s": c.recompute_s,
        "step_s": c.step_s,
        "measured": c.measured,
        "comm_exposed_s": c.comm_exposed_s,
        "comm_total_s": c.comm_total_s,
        "memory_bytes": c.memory_bytes,
        "model_state_bytes": c.model_state_bytes,
        "activation_bytes": c.activation_bytes,
    }


def _print_costs(costs: Sequence[Any], cluster: str, strategy: str) -> None:
    print(f"{strategy} on {cluster} (one rank)")
    print(
        f"{'unit':<24}{'time ms':>10}{'compute':>10}{'comm':>9}{'states MiB':>12}{'acts MiB':>10}"
    )
    for c in costs:
        compute = f"{c.compute_s * 1e3:.3f}{'*' if c.measured else ' '}"
        print(
            f"{c.unit:<24}{c.time_s * 1e3:>10.3f}{compute:>11}{c.comm_exposed_s * 1e3:>8.3f}"
            f"{c.model_state_bytes / 2**20:>12.1f}{c.activation_bytes / 2**20:>10.1f}"
        )
    if any(c.measured for c in costs):
        print("* compute measured by galvatron-fx profile --model; the rest: roofline")
    step = sum(c.time_s for c in costs)
    print(f"step time {step * 1e3:.3f} ms")


def _profile(args: argparse.Namespace) -> int:
    from galvatron_fx.runtime.profiler import DEFAULT_PROFILE, ProfileConfig, profile

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


def _capture(model_text: str, device: str, batch: int, seq: int | None) -> tuple[Any, tuple, dict]:
    """Build MODEL on `device` and analyse it: (analysis, example args, example kwargs)."""
    import galvatron_fx as gfx
    from galvatron_fx.models.spec import parse_model_spec

    spec = parse_model_spec(model_text)
    model = spec.build(device)
    inputs, kwargs = spec.example_inputs(model, batch, seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the use_cache notice is expected here
        return gfx.analyze(model, inputs, kwargs), inputs, kwargs


def _layer_inputs(args: argparse.Namespace) -> tuple[Any, tuple, dict, list[Any]]:
    from galvatron_fx.runtime.layer_profile import default_strategies, fitting_strategies

    analysis, inputs, kwargs = _capture(args.model, "cpu", args.batch, args.seq)
    if args.strategies:
        strategies = [parse_strategy(t) for t in args.strategies.split(";") if t.strip()]
    else:
        strategies = fitting_strategies(analysis, default_strategies(args.nproc))
    return analysis, inputs, kwargs, strategies


def _profile_layers(
    args: argparse.Namespace, analysis: Any, inputs: tuple, kwargs: dict, strategies: list[Any]
) -> None:
    from galvatron_fx.runtime.layer_profile import DEFAULT_LAYERS, profile_layers

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


def _plan(args: argparse.Namespace) -> int:
    from galvatron_fx.compile import search

    if args.seq is not None and args.seq < 1:
        raise ValueError("--seq must be >= 1")
    # captured whole, as `compile` will capture it: the plan's fingerprint then matches
    analysis, _, _ = _capture(args.model, "meta", args.global_batch, args.seq)
    result = search(
        analysis,
        cluster=args.cluster,
        memory_budget_gb=args.memory_gb,
        global_batch=args.global_batch,
        world_size=args.world,
        precision=args.precision,
        baselines=not args.no_baselines,
        max_pipeline=args.max_pipeline,
        progress=_progress,
    )
    print(format_result(result))
    if args.json:
        _write(args.json, json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty() or done == total:
        bar = "#" * (20 * done // max(total, 1))
        end = "\n" if done == total else ""
        print(f"\rsearching configurations [{bar:<20}] {done}/{total}", end=end, file=sys.stderr)


def format_result(result: Any) -> str:
    """The plan table, the predictions and the baselines, as `galvatron-fx plan` prints."""
    p = result.predicted
    lines = [result.plan.table(), ""]
    lines.append(f"predicted step time   {p['step_time_s'] * 1e3:.1f} ms")
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


def _explain_plan(args: argparse.Namespace) -> int:
    from galvatron_fx.search.explain import diff_plans, format_explain

    data = _read_json(args.plan)
    if args.diff is not None:
        print(diff_plans(data, _read_json(args.diff), (args.plan.name, args.diff.name)))
        return 0
    if "units" not in data:
        raise ValueError(
            f"{args.plan}: no per-unit explanations (write it with galvatron-fx plan --json)"
        )
    print(format_explain(data))
    return 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # train: the ranks it launches run the same command
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
