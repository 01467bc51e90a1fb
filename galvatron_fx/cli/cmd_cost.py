"""`galvatron-fx cost`: one uniform strategy priced by the cost model."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galvatron_fx.cli.common import (
    MODEL_HELP,
    capture,
    examples,
    write_json,
)

if TYPE_CHECKING:  # types only: the CLI imports torch lazily, to keep --help fast
    from galvatron_fx.cost_models.layer_times import LayerTimes
    from galvatron_fx.plan import LayerStrategy


def add(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cost",
        parents=parents,
        help="predicted time and memory of a uniform strategy",
        description="Price one strategy applied to every layer with the cost model: per "
        "layer compute, exposed communication, model states and activations, and the peak.",
        epilog=examples(
            (
                "Megatron-style TP-4 x DP-2 with ZeRO-3 and full recomputation on 8 A100s",
                'galvatron-fx cost gpt:layers=24,hidden=2048,heads=16 --strategy "tp=4,dp=2,zero=3,ckpt=full"',
            ),
            (
                "the formulas behind one layer's figures",
                "galvatron-fx cost gpt:layers=4 --strategy tp=2 --explain blocks.0",
            ),
            (
                "this machine, with measured layer times (after galvatron-fx profile --model)",
                "galvatron-fx cost gpt:layers=4 --cluster local --strategy dp=2",
            ),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--cluster", default="a100-80gb-sxm", help="preset[:nodes=N], local, or JSON")
    p.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: model max)")
    p.add_argument(
        "--strategy",
        default="dp=1",
        help='e.g. "tp=4,dp=2,sp=1,zero=3,ckpt=full,vocab=1"; "tp=4,ulysses=1": Ulysses SP',
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
    p.set_defaults(run=run)


_ZERO = {"0": "allreduce", "1": "zero1", "2": "zero2", "3": "zero3"}


def parse_strategy(text: str) -> LayerStrategy:
    """`tp=4,dp=2,sp=1,zero=3,ckpt=full,vocab=1` -> LayerStrategy (ValueError names the key);
    `tp=4,ulysses=1`: the group of 4 runs Ulysses sequence parallelism."""
    from galvatron_fx.plan import LayerStrategy

    fields: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key in ("tp", "dp"):
            if not value.isdigit():
                raise ValueError(f"--strategy: {key}={value!r} is not a whole number")
            fields[key] = int(value)
        elif key in ("sp", "vocab", "ulysses"):
            name = {"sp": "sp", "vocab": "vocab_parallel", "ulysses": "ulysses"}[key]
            fields[name] = value in ("1", "true", "on")
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
                f"--strategy: unknown key {key!r} (tp, dp, sp, ulysses, zero, ckpt, vocab, strided)"
            )
    return LayerStrategy(**fields)


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.cost_models.hardware import load_cluster
    from galvatron_fx.planning.price import plan_peak, price_plan

    cluster = load_cluster(args.cluster)
    strategy = parse_strategy(args.strategy)
    layer_times = _layer_times(args.layers, cluster.name)
    analysis, _, _ = capture(args.model, "meta", args.batch, args.seq)
    units = analysis.units
    plan = analysis.plan(strategy, world_size=strategy.devices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep-copying the graph's pytree specs warns
        costs = price_plan(
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
        write_json(args.json, data)
    return 0


def _layer_times(path: Path | None, cluster: str) -> LayerTimes | None:
    """Measured layer times apply to the machine that measured them: `--cluster local`."""
    from galvatron_fx.cost_models.layer_times import DEFAULT_LAYERS, load_layer_times

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
    from galvatron_fx.unit_graph.units import unit_flops

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
