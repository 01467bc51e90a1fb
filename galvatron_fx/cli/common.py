"""What every subcommand shares: the model-spec help, capture, atomic writes, help epilogs."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galvatron_fx.jsonio import read_json as _read

if TYPE_CHECKING:  # types only: the CLI imports torch lazily, to keep --help fast
    from torch import fx

    from galvatron_fx.gathers import GatherCheck

__all__ = ["MODEL_HELP", "capture", "examples", "gather_check", "info", "read_json", "write"]

MODEL_HELP = (
    "model spec: gpt:layers=12,hidden=768,heads=12,vocab=50257,seq=1024 | hf:gpt2 | "
    "hf:llama:hidden_size=256,num_hidden_layers=4 | path/to/file.py:factory"
)

VERBOSITY = [0]
"""-1 quiet, 0 normal, 1 verbose: set once by `main` from -q / -v."""


def examples(*pairs: tuple[str, str]) -> str:
    """An argparse epilog: each example command under its one-line purpose."""
    return "examples:\n" + "\n".join(f"  # {what}\n  {cmd}\n" for what, cmd in pairs)


def info(text: str) -> None:
    """A note for the user (what was written where); --quiet drops it, results stay."""
    if VERBOSITY[0] >= 0:
        print(text)


def read_json(path: Path) -> Any:
    return _read(path)


def capture(
    model_text: str, device: str, batch: int, seq: int | None, *, say_seq: bool = True
) -> tuple[Any, tuple, dict]:
    """Build MODEL on `device` and analyse it: (analysis, example args, example kwargs).
    Without `seq`, says which sequence length the spec chose and why (unless `say_seq` is
    False: a second capture of the same model)."""
    import galvatron_fx as gfx
    from galvatron_fx.models.spec import parse_model_spec

    spec = parse_model_spec(model_text)
    model = spec.build(device)
    if seq is None and say_seq:
        info(spec.default_seq(model).describe())
    inputs, kwargs = spec.example_inputs(model, batch, seq)
    with warnings.catch_warnings():
        if VERBOSITY[0] < 1:  # the use_cache notice is expected here; -v shows it
            warnings.simplefilter("ignore")
        return gfx.analyze(model, inputs, kwargs), inputs, kwargs


def gather_check(
    gm: fx.GraphModule, batch: int, recapture: Callable[[int], fx.GraphModule]
) -> GatherCheck:
    """`galvatron_fx.gathers.find_gathers` on the analysed graph `gm`, captured at `batch`;
    where the representative plan's data parallelism does not divide that batch, on the
    graph `recapture(world_size)` returns instead (the same model at that batch)."""
    from galvatron_fx.gathers import find_gathers, representative_plan

    world = representative_plan(gm).world_size
    return find_gathers(gm if batch % world == 0 else recapture(world))


def write(path: Path, text: str) -> None:
    """Write through a temporary file so a failure leaves no half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    info(f"wrote {path}")


def write_json(path: Path, data: Any) -> None:
    write(path, json.dumps(data, indent=2) + "\n")


def positive(values: Sequence[tuple[str, int | None]]) -> None:
    """Refuse counts below 1, naming the flag."""
    for flag, value in values:
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
