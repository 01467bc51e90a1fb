"""`galvatron-fx cost`: a whole plan priced by the search's own cost model (`gfx.price`)."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galvatron_fx.cli.common import (
    MODEL_HELP,
    capture,
    examples,
    positive,
    read_json,
    write_json,
)

if TYPE_CHECKING:  # types only: the CLI imports torch lazily, to keep --help fast
    from galvatron_fx.cost_models.hardware import ClusterSpec
    from galvatron_fx.cost_models.layer_times import LayerTimes
    from galvatron_fx.lowering import Analysis
    from galvatron_fx.plan import LayerStrategy, Plan
    from galvatron_fx.planning.plan_price import PlanPrice
    from galvatron_fx.planning.price import UnitCost


def add(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cost",
        parents=parents,
        help="predicted step time and memory of a plan, as the search prices it",
        description="Price a whole plan with the search's cost model: a plan JSON (--plan), "
        "or one strategy for every unit (--strategy) with pipeline stages cut evenly (--pp, "
        "--micro-batches, --schedule, --virtual-stages). Per unit its time per micro-batch, "
        "layout switch or stage boundary, model states and activations; per stage its time "
        "and memory; the step time with the schedule's bubble, the same number `plan` "
        "predicts for the same plan.",
        epilog=examples(
            (
                "Megatron-style TP-4 x DP-2 with ZeRO-3 and full recomputation on 8 A100s",
                'galvatron-fx cost gpt:layers=24,hidden=2048,heads=16 --strategy "tp=4,dp=2,zero=3,ckpt=full"',
            ),
            (
                "TP-2 in 4 pipeline stages, interleaved with 2 chunks a device, 8 micro-batches",
                'galvatron-fx cost gpt:layers=24,hidden=2048,heads=16 --batch 32 --strategy "tp=2" --pp 4 --virtual-stages 2 --micro-batches 8',
            ),
            (
                "a plan the search wrote (its batch is read from the file)",
                "galvatron-fx cost gpt:layers=24,hidden=2048,heads=16 --plan plan.json",
            ),
            (
                "the formulas behind one layer's figures",
                "galvatron-fx cost gpt:layers=4 --strategy tp=2 --explain blocks.0",
            ),
            (
                "this machine, with measured layer times beside (after galvatron-fx profile --model)",
                "galvatron-fx cost gpt:layers=4 --cluster local --strategy dp=2",
            ),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--cluster", default="a100-80gb-sxm", help="preset[:nodes=N], local, or JSON")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global batch (default: a search result's own, else 8)",
    )
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: model max)")
    p.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="a plan JSON (Plan.save, or galvatron-fx plan --json) instead of --strategy",
    )
    p.add_argument(
        "--strategy",
        default=None,
        help='every unit\'s strategy, e.g. "tp=4,dp=2,sp=1,zero=3,ckpt=full,vocab=1"; '
        '"tp=4,ulysses=1": Ulysses SP (default dp=1; segments take it without sp)',
    )
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default 1)")
    p.add_argument("--micro-batches", type=int, default=None, help="per step (default 1)")
    p.add_argument(
        "--schedule",
        default=None,
        choices=("1f1b", "gpipe", "interleaved-1f1b", "interleaved-zb"),
        help="pipeline schedule (default 1f1b; interleaved-1f1b with --virtual-stages > 1)",
    )
    p.add_argument(
        "--virtual-stages", type=int, default=None, help="model chunks per device (default 1)"
    )
    p.add_argument("--memory-gb", type=float, default=None, help="refuse a plan over this budget")
    p.add_argument("--dtype", default="bf16", help="compute dtype for peak FLOP/s")
    p.add_argument("--precision", default="mixed", choices=("mixed", "fp32"))
    p.add_argument("--json", type=Path, help="write the totals, stages and units to FILE")
    p.add_argument("--explain", metavar="UNIT", help="print UNIT's formulas with their numbers")
    p.add_argument(
        "--layers",
        type=Path,
        default=None,
        help="measured layer times (profile --model) to show beside, with --cluster local "
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
                f"--strategy: unknown key {key!r} (tp, dp, sp, ulysses, zero, ckpt, vocab, "
                "strided; pipeline stages: --pp)"
            )
    return LayerStrategy(**fields)


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.cost_models.hardware import load_cluster
    from galvatron_fx.planning.plan_price import price

    positive(
        [
            ("--batch", args.batch),
            ("--seq", args.seq),
            ("--pp", args.pp),
            ("--micro-batches", args.micro_batches),
            ("--virtual-stages", args.virtual_stages),
        ]
    )
    flags = (args.strategy, args.pp, args.micro_batches, args.schedule, args.virtual_stages)
    if args.plan is not None and any(f is not None for f in flags):
        raise ValueError(
            "--plan: the plan file gives the strategies and the pipeline; drop --strategy, "
            "--pp, --micro-batches, --schedule and --virtual-stages"
        )
    cluster = load_cluster(args.cluster)
    layer_times = _layer_times(args.layers, cluster.name)
    batch = args.batch or _searched_batch(args.plan) or 8
    analysis, _, _ = capture(args.model, "meta", batch, args.seq)
    plan = _plan(args, analysis) if args.plan is None else _load_plan(args.plan, analysis, batch)
    if args.explain is not None and args.explain not in plan.units:
        raise ValueError(f"--explain: no unit {args.explain!r}; units: {list(plan.units)}")
    priced = price(
        analysis,
        plan,
        cluster,
        global_batch=batch,
        precision=args.precision,
        dtype=args.dtype,
        memory_budget_gb=args.memory_gb,
    )
    print(format_price(priced, plan, cluster.name))
    costs: list[UnitCost] = []
    if layer_times is not None or args.explain or args.json:
        staged, costs = _per_rank(args, analysis, batch, plan, cluster, layer_times)
        if layer_times is not None:
            _print_costs(costs, cluster.name)
        if args.explain:
            cost = next(c for c in costs if c.unit == args.explain)
            _explain(analysis, staged, cluster, cost, args.precision)
    if args.json:
        data = {
            "cluster": cluster.name,
            "plan": plan.to_json(),
            "total": {
                "step_time_s": priced.step_time_s,
                "samples_per_s": priced.samples_per_s,
                "tflops_per_device": priced.tflops_per_device,
                "peak_memory_bytes": max(priced.peak_memory_bytes),
                "peak_memory_bytes_per_device": list(priced.peak_memory_bytes),
            },
            "price": priced.to_json(),
            "layers": [{"unit": c.unit, **_cost_fields(c)} for c in costs],
        }
        write_json(args.json, data)
    return 0


def uniform_plan(
    analysis: Analysis,
    strategy: LayerStrategy,
    *,
    pp: int = 1,
    micro_batches: int = 1,
    schedule: str | None = None,
    virtual_stages: int = 1,
) -> Plan:
    """`strategy` on every unit (the layers without the vocabulary split, the segments
    without sequence parallelism: a layout switch gathers their input, as in the search's
    plans), layers cut evenly into `pp x virtual_stages` stages (`baselines.even_starts`)."""
    from galvatron_fx.plan import PipelineConfig, Schedule
    from galvatron_fx.search.baselines import even_starts

    layer = dataclasses.replace(strategy, vocab_parallel=False)
    segment = dataclasses.replace(strategy, sp=False, ulysses=False)
    kinds = tuple(u.kind for u in analysis.layers)
    stages = pp * virtual_stages
    starts = even_starts(kinds, stages)
    if starts is None:
        raise ValueError(
            f"--pp {pp} x --virtual-stages {virtual_stages}: {stages} stages, but the model "
            f"has {kinds.count('layer')} layers (each stage takes at least one)"
        )
    schedule = schedule or ("interleaved-1f1b" if virtual_stages > 1 else "1f1b")
    pipeline = PipelineConfig(
        degree=pp,
        stage_starts=tuple(analysis.units[i] for i in starts[1:]),
        micro_batches=micro_batches,
        schedule=Schedule(schedule),
        virtual_stages=virtual_stages,
    )
    return analysis.plan(
        {u.name: segment if u.kind == "segment" else layer for u in analysis.layers},
        world_size=strategy.devices * pp,
        pipeline=pipeline,
    )


def _plan(args: argparse.Namespace, analysis: Analysis) -> Plan:
    return uniform_plan(
        analysis,
        parse_strategy(args.strategy or "dp=1"),
        pp=args.pp or 1,
        micro_batches=args.micro_batches or 1,
        schedule=args.schedule,
        virtual_stages=args.virtual_stages or 1,
    )


def _load_plan(path: Path, analysis: Analysis, batch: int) -> Plan:
    """The plan in `path`, for this model as captured (`--batch`, `--seq`)."""
    from galvatron_fx.plan import Plan
    from galvatron_fx.unit_graph.units import model_fingerprint

    plan = Plan.load(path)
    ours = model_fingerprint(analysis.graph_module)
    if plan.model_fingerprint != ours and list(plan.units) == list(analysis.units):
        raise ValueError(
            f"--plan {path}: made for model {plan.model_fingerprint}, this one captures as "
            f"{ours} at --batch {batch}: give the global batch and --seq the plan was made for"
        )
    return plan


def _searched_batch(path: Path | None) -> int | None:
    """The global batch a search result (`plan --json`) was searched for."""
    if path is None or not path.exists():
        return None
    data = read_json(path)
    setup = data.get("setup") if isinstance(data, dict) else None
    batch = setup.get("global_batch") if isinstance(setup, dict) else None
    return batch if isinstance(batch, int) else None


def _per_rank(
    args: argparse.Namespace,
    analysis: Analysis,
    batch: int,
    plan: Plan,
    cluster: ClusterSpec,
    layer_times: LayerTimes | None,
) -> tuple[Plan, list[UnitCost]]:
    """`price_plan`'s breakdown of one micro-batch on one rank of every unit's stage: the
    plan's strategies on `world / pp` devices, without pipeline stages, on the model
    captured at the micro-batch size."""
    from galvatron_fx.planning.price import price_plan

    m = plan.pipeline.micro_batches
    small = analysis if m == 1 else capture(args.model, "meta", batch // m, args.seq)[0]
    staged = small.plan(dict(plan.strategies), world_size=plan.world_size // plan.pipeline.degree)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep-copying the graph's pytree specs warns
        costs = price_plan(
            small,
            staged,
            cluster,
            dtype=args.dtype,
            precision=args.precision,
            layer_times=layer_times,
        )
    return staged, costs


def format_price(priced: PlanPrice, plan: Plan, cluster: str) -> str:
    """Per unit, per stage and the totals, as `galvatron-fx cost` prints them."""
    p = plan.pipeline
    m = p.micro_batches
    strategies = {s.short() for _, s in plan.strategies}
    what = strategies.pop() if len(strategies) == 1 else "mixed strategies"
    lines = [
        f"{what} on {cluster}: {plan.world_size} devices, global batch {priced.global_batch}"
        + (f", {m} micro-batches" if m > 1 else "")
        + (
            f", {p.degree} pipeline stages x {p.virtual_stages} chunk(s), {p.schedule.value}"
            if p.degree > 1
            else ""
        ),
        f"{'unit':<20}{'stage':>6}  {'strategy':<26}{'ms/mb':>9}{'boundary':>10}"
        f"{'states MiB':>12}{'acts MiB':>10}",
    ]
    for u in priced.units:
        lines.append(
            f"{u.unit:<20}{u.stage:>6}  {u.strategy.short():<26}{u.time_s * 1e3:>9.3f}"
            f"{u.boundary_s * 1e3:>10.3f}{u.state_bytes / 2**20:>12.1f}"
            f"{u.activation_bytes / 2**20:>10.1f}"
        )
    for k, t in enumerate(priced.stage_time_s):
        lines.append(
            f"stage {k}: {t * 1e3:.3f} ms a micro-batch, {priced.in_flight[k]:g} in flight, "
            f"{priced.stage_memory_bytes[k] / 2**30:.3f} GiB"
        )
    for d, mem in enumerate(priced.peak_memory_bytes):
        lines.append(f"device {d} peak memory {mem / 2**30:.3f} GiB (upper bound)")
    lines.append(
        f"step time {priced.step_time_s * 1e3:.4g} ms (bubble, stage boundaries and layout "
        "switches included)"
    )
    lines.append(f"samples/s {priced.samples_per_s:.2f}")
    lines.append(f"TFLOP/s per device {priced.tflops_per_device:.1f}")
    return "\n".join(lines)


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
    print(f"\n{unit} under {s.short()} (one rank, one micro-batch)")
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


def _print_costs(costs: Sequence[Any], cluster: str) -> None:
    print(f"\nper unit as the program runs it on {cluster} (one rank, one micro-batch)")
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
