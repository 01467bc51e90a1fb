"""`galvatron-fx inspect`: the captured model's layer table, and the ops that would gather
their inputs under tensor or data parallelism (`galvatron_fx.gathers`)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from galvatron_fx.cli.common import (
    MODEL_HELP,
    examples,
    gather_check,
    info,
    write,
    write_json,
)


def add(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        parents=parents,
        help="capture a model and print its layers and costs",
        description="Capture MODEL to a torch.fx graph, group it into layers and print each "
        "layer's parameters, FLOPs and saved activations (on the meta device by default: "
        "nothing is allocated, so a 70B model inspects on a laptop), then the ops that would "
        "gather their inputs under tensor or data parallelism (no sharding rule keeps them "
        "split), found by the sharding propagation under a uniform plan: every layer at the "
        "largest tp up to 8 that divides its heads and widths, dp 2.",
        epilog=examples(
            (
                "the reference GPT, batch 8",
                "galvatron-fx inspect gpt:layers=12,hidden=768,heads=12 --batch 8",
            ),
            (
                "a HuggingFace family from a config, layer table as JSON",
                "galvatron-fx inspect hf:llama:hidden_size=256,num_hidden_layers=4 --json llama.json",
            ),
            (
                "the graph after a pass",
                "galvatron-fx inspect gpt:layers=2 --print-after group_layers",
            ),
            (
                "your own model: a factory returning (model, example args)",
                "galvatron-fx inspect path/to/model.py:build",
            ),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="sequence length (default: the model's maximum, at most 2048 for hf: specs)",
    )
    p.add_argument(
        "--device",
        default="meta",
        choices=("meta", "cpu"),
        help="where to build the model: meta allocates nothing (default)",
    )
    p.add_argument("--json", type=Path, help="write the layer table as JSON to FILE")
    p.add_argument("--dot", type=Path, help="write the layer graph as Graphviz to FILE")
    p.add_argument("--print-after", default="", help="comma-separated passes to print after")
    p.add_argument(
        "--no-gathers",
        action="store_true",
        help="skip the ops-that-gather section (it captures the model again where the "
        "batch does not divide by the devices of its uniform plan)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import galvatron_fx as gfx
    from galvatron_fx.gathers import gathers_json
    from galvatron_fx.models.spec import parse_model_spec

    if args.batch < 1 or (args.seq is not None and args.seq < 1):
        raise ValueError("--batch and --seq must be >= 1")
    spec = parse_model_spec(args.model)
    model = spec.build(args.device)
    inputs, kwargs = spec.example_inputs(model, args.batch, args.seq)
    seq = args.seq if args.seq is not None else spec.max_seq(model)
    if args.seq is None:
        info(spec.default_seq(model).describe())
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
    check = None if args.no_gathers else _gathers(args, spec, model, gm)
    if args.json:
        data = gfx.to_json(gm, model=args.model, batch=args.batch, seq=seq)
        gathers = {} if check is None else {"ops_that_gather": gathers_json(check)}
        write_json(args.json, {**data, **gathers})
    if args.dot:
        write(args.dot, gfx.to_dot(gm))
    return 0


def _gathers(args: argparse.Namespace, spec: Any, model: Any, gm: Any) -> Any:
    """Print the ops that would gather (`galvatron_fx.gathers`) and return what was found."""
    import galvatron_fx as gfx
    from galvatron_fx.gathers import format_gathers

    def recapture(batch: int) -> Any:
        more_args, more_kwargs = spec.example_inputs(model, batch, args.seq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the use_cache notice, as above
            return gfx.analyze(model, more_args, more_kwargs).graph_module

    check = gather_check(gm, args.batch, recapture)
    print()
    print(format_gathers(check))
    return check
