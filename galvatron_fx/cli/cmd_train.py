"""`galvatron-fx train`: compile a model and train it on local ranks or under torchrun."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from galvatron_fx.cli.common import MODEL_HELP, examples, positive


def add(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        parents=parents,
        help="compile MODEL and train it on local ranks (or as one rank under torchrun)",
        description="Without torchrun, starts --nproc local ranks through "
        "torch.distributed.run; under torchrun each process is one rank. Rank 0 logs the "
        "loss, step time, samples/s and peak memory of every step.",
        epilog=examples(
            (
                "data parallel on 2 local ranks, synthetic tokens",
                "galvatron-fx train gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32 --nproc 2 --steps 20",
            ),
            (
                "a searched plan on 4 ranks, checkpoint every 50 steps",
                "galvatron-fx train gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128 --nproc 4 --cluster local --memory-gb 2 --save ckpt --save-every 50",
            ),
            (
                "resume (under another plan or world size, if you like)",
                "galvatron-fx train gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128 --nproc 2 --plan plan.json --resume ckpt --steps 200",
            ),
            (
                "stop at the first inf/NaN loss, naming the step and layer",
                "galvatron-fx train gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128 --lr 10 --check-finite",
            ),
            (
                "two nodes",
                "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m galvatron_fx.cli train MODEL --plan plan.json",
            ),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
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
    p.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="how long a collective waits for a rank that stopped answering (default 300)",
    )
    p.add_argument(
        "--check-finite",
        action="store_true",
        help="stop at an inf/NaN loss, naming the step and the layer where it first appeared",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.train import TrainConfig, launch, train, under_launcher

    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    positive([("--nproc", config.nproc), ("--global-batch", config.global_batch)])
    positive([("--seq", config.seq), ("--steps", config.steps)])
    if config.cluster is not None and config.memory_gb is None:
        raise ValueError("--cluster needs --memory-gb (the memory budget per device)")
    if config.timeout_s <= 0:
        raise ValueError(f"--timeout-s must be > 0, got {config.timeout_s}")
    if under_launcher():
        train(config)
        return 0
    _check_before_launch(config)
    return launch(config, args.argv)


def _check_before_launch(config: Any) -> None:
    """Refuse a bad model spec, plan file or resume directory here, with one clear message,
    rather than in every rank after they start."""
    from galvatron_fx.models.spec import parse_model_spec
    from galvatron_fx.plan import Plan
    from galvatron_fx.runtime.checkpoint import latest_checkpoint

    parse_model_spec(config.model)
    if config.plan is not None:
        plan = Plan.load(config.plan)
        if plan.world_size != config.nproc:
            raise ValueError(
                f"--plan {config.plan} is for {plan.world_size} ranks, --nproc is "
                f"{config.nproc}: run with --nproc {plan.world_size}, or search a plan for "
                f"{config.nproc} (galvatron-fx plan ... --world {config.nproc})"
            )
    if config.resume is not None and latest_checkpoint(config.resume) is None:
        raise ValueError(f"--resume {config.resume}: no complete checkpoint there")
