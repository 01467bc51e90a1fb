"""`galvatron-fx`: the command line, one module per subcommand (`cmd_*.py`).

galvatron-fx inspect MODEL [--batch B] [--seq S] [--device meta|cpu] [--json FILE] [--dot FILE] [--no-gathers]
galvatron-fx profile [--nproc N] [--out FILE] [--max-bytes B] [--quick]
                     [--model MODEL --batch B --seq S [--strategies "dp=2;tp=2,sp=1"]]
galvatron-fx cost MODEL --cluster C --batch B --seq S (--plan FILE | --strategy "tp=4,dp=2,zero=3"
                  [--pp P] [--micro-batches M] [--schedule S] [--virtual-stages V])
galvatron-fx plan MODEL --cluster C --memory-gb M --global-batch B [--seq S] [--json FILE]
                  [--html FILE] [--png DIR]
galvatron-fx explain PLAN.json [--diff OTHER.json] [--html FILE] [--png DIR]
galvatron-fx train MODEL --nproc N [--cluster C --memory-gb M] [--global-batch B]
                   [--steps K] [--plan FILE] [--data FILE] [--save DIR] [--save-every K]
                   [--resume DIR] [--check-finite] [--timeout-s S]

Every command takes -v/--verbose (debug notes: each pass's time, the search's statistics,
warnings) and -q/--quiet (results and errors only: no progress bars or notes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from galvatron_fx.cli import cmd_cost, cmd_inspect, cmd_plan, cmd_profile, cmd_train, common
from galvatron_fx.cli.cmd_cost import parse_strategy
from galvatron_fx.cli.cmd_plan import format_result

__all__ = ["format_result", "main", "parse_strategy"]

COMMANDS = (cmd_inspect, cmd_profile, cmd_cost, cmd_plan, cmd_train)


def _parser() -> argparse.ArgumentParser:
    verbosity = argparse.ArgumentParser(add_help=False)
    group = verbosity.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="debug notes and warnings")
    group.add_argument("-q", "--quiet", action="store_true", help="results and errors only")
    parser = argparse.ArgumentParser(
        prog="galvatron-fx",
        description="Automatic-parallelism compiler for PyTorch training. "
        "`galvatron-fx COMMAND --help` shows each command's options and examples.",
        epilog=common.examples(
            ("look at a model's layers", "galvatron-fx inspect gpt:layers=12,hidden=768,heads=12"),
            (
                "search a plan for 8 A100s",
                "galvatron-fx plan gpt:layers=24,hidden=2048,heads=16 --memory-gb 16 --global-batch 64 --json plan.json",
            ),
            (
                "train it on local CPU ranks",
                "galvatron-fx train gpt:layers=2,hidden=64,heads=4 --nproc 2 --steps 5",
            ),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub, [verbosity])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from galvatron_fx.progress import configure

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # train: the ranks it launches run the same command
    common.VERBOSITY[0] = 1 if args.verbose else -1 if args.quiet else 0
    configure(common.VERBOSITY[0])
    try:
        return int(args.run(args))
    except (ValueError, ImportError, OSError) as err:
        print(f"galvatron-fx {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # CaptureError and PassError carry their own explanation
        print(f"galvatron-fx {args.command}: {err}", file=sys.stderr)
        return 1
