"""Pass machinery: what a pass is, and the runner that checks every pass it runs.

A pass is a function `(gm, ctx) -> gm` wrapped by `@graph_pass(reads=..., writes=...)`, which
names the node-meta keys it needs and the ones it produces. Around every pass the runner:

- checks that each key the pass reads is on every node (else: which pass writes it),
- runs it and times it,
- checks that each key it writes is now on every node, and that it wrote no other `gfx_` key,
- runs `graph.lint()` and the project's invariants (`check_invariants`),
- prints and/or dumps the graph after the passes named in `print_after` / `dump_after`
  (or in the environment variables `GFX_PRINT_AFTER=a,b` / `GFX_DUMP_DIR=dir`),
- wraps any error in `PassError`, naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from galvatron_fx.meta import REGISTRY, node_label
from galvatron_fx.plan import PipelineConfig, Plan
from galvatron_fx.runtime.program import ParamSpec, StageSplit

LOG = logging.getLogger("galvatron_fx.passes")

__all__ = [
    "Pass",
    "PassContext",
    "PassError",
    "RewriteTarget",
    "check_invariants",
    "format_graph",
    "graph_pass",
    "insert_after",
    "run_passes",
]

VAL = "val"
"""PyTorch's key for the FakeTensor a node produces: capture guarantees it on every node."""


class PassError(RuntimeError):
    """A pass failed or broke an invariant; says which pass and which passes ran before it."""


@dataclass(frozen=True)
class RewriteTarget:
    """What the parallel passes rewrite a graph for: one rank's program under a plan."""

    plan: Plan
    """Each unit's strategy; for a pipeline, one stage's plan (its ranks are the world)."""
    rank: int = 0
    """This rank's position among the plan's ranks."""
    codegen: bool = True
    """Recompile the module after rewriting; pricing only reads the graph and skips it."""
    micro_batches: int = 1
    """The batch is cut into this many: every mean cross-entropy becomes sum / count."""
    unit_stage: Mapping[str, int] = field(default_factory=dict)
    """Pipeline: each unit's stage (ZeRO-3 starts a stage's first gather at its input)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Pipeline: the whole job's stages (`split_stages` cuts the graph at them)."""
    rank_offset: int = 0
    """Pipeline: the first global rank of this rank's stage (`stage_ranks` adds it)."""


@dataclass
class PassContext:
    """What passes share besides the graph: the inputs of the capture, the print and dump
    switches, what the parallel passes rewrite for (`target`) and what they produce
    (`params`, `stages`); `results` is for passes a user adds (the compiler's own passes
    exchange typed fields only)."""

    model: torch.nn.Module | None = None
    """The user's model, unmodified (None when only a graph was given)."""
    example_inputs: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    print_after: frozenset[str] = frozenset()
    """Pass names whose output graph is printed to stderr ("all" for every pass)."""
    dump_dir: Path | None = None
    """When set, the graph after each pass is written to `<dump_dir>/<i>_<pass>.txt`."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """Wall time of every pass that ran, in order."""
    target: RewriteTarget | None = None
    """Set by `lowering.lower` before the parallel passes; None while analysing."""
    params: dict[str, ParamSpec] = field(default_factory=dict)
    """Written by `insert_collectives` (how every parameter lives on this rank), updated by
    `zero3` and `stage_ranks`."""
    stages: StageSplit | None = None
    """Written by `split_stages`: the program cut into pipeline stages."""
    results: dict[str, object] = field(default_factory=dict)

    def require_target(self, pass_name: str) -> RewriteTarget:
        """The rewrite target, or a PassError saying the pass runs under `lower()` only."""
        if self.target is None:
            raise PassError(
                f"pass {pass_name!r} rewrites for a plan and rank: run it through "
                "galvatron_fx.lowering.lower (ctx.target is unset)"
            )
        return self.target

    @classmethod
    def from_env(cls, **kwargs: Any) -> PassContext:
        """A context whose print/dump switches also honour GFX_PRINT_AFTER and GFX_DUMP_DIR."""
        ctx = cls(**kwargs)
        env_print = os.environ.get("GFX_PRINT_AFTER", "")
        names = {n.strip() for n in env_print.split(",") if n.strip()}
        ctx.print_after = frozenset(ctx.print_after | names)
        if ctx.dump_dir is None and os.environ.get("GFX_DUMP_DIR"):
            ctx.dump_dir = Path(os.environ["GFX_DUMP_DIR"])
        return ctx


PassFn = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


@dataclass(frozen=True)
class Pass:
    """A named graph pass with the node-meta keys it reads and writes."""

    name: str
    fn: PassFn
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    doc: str = ""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return self.fn(gm, ctx)


def graph_pass(
    *, reads: Iterable[str] = (), writes: Iterable[str] = (), name: str | None = None
) -> Callable[[PassFn], Pass]:
    """Declare a function `(gm, ctx) -> gm` as a pass. Keys are node-meta names (`val`,
    `gfx_layer`, ...); every `gfx_` key must be declared in `galvatron_fx.meta`."""

    def wrap(fn: PassFn) -> Pass:
        pass_name = name or fn.__name__
        for key in (*reads, *writes):
            if key != VAL and key not in REGISTRY and key != "nn_module_stack":
                raise ValueError(
                    f"pass {pass_name!r} declares unknown meta key {key!r}; declare it with "
                    "galvatron_fx.meta.MetaKey first"
                )
        return Pass(pass_name, fn, tuple(reads), tuple(writes), (fn.__doc__ or "").strip())

    return wrap


def insert_after(passes: Sequence[Pass], anchor: str, new: Pass) -> tuple[Pass, ...]:
    """The pass list with `new` inserted after the pass named `anchor`."""
    names = [p.name for p in passes]
    if anchor not in names:
        raise ValueError(f"no pass named {anchor!r} to insert after; passes are {names}")
    i = names.index(anchor) + 1
    return (*passes[:i], new, *passes[i:])


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[Pass]) -> fx.GraphModule:
    """Run `passes` in order with every check described in the module docstring."""
    done: list[str] = [*ctx.timings_s]
    for i, p in enumerate(passes):
        try:
            _require(gm, p, done)
            before = _gfx_snapshot(gm)
            start = time.perf_counter()
            gm = p(gm, ctx)
            ctx.timings_s[p.name] = time.perf_counter() - start
            LOG.debug("pass %s: %.3f s", p.name, ctx.timings_s[p.name])
            _ensure(gm, p, before)
            check_invariants(gm)
        except PassError:
            raise
        except Exception as err:
            ran = ", ".join(done) or "nothing"
            raise PassError(f"pass {p.name!r} failed (ran before it: {ran}): {err}") from err
        done.append(p.name)
        _show(gm, ctx, i, p.name)
    return gm


def check_invariants(gm: fx.GraphModule) -> None:
    """The project's invariants, on top of `graph.lint()`: every node but the output and
    submodule references has `val`; every `gfx_` key is declared and holds its declared type."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op != "output" and VAL not in node.meta and not _is_module_ref(gm, node):
            raise PassError(f"invariant: node {node_label(node)} has no 'val'")
        for key, value in node.meta.items():
            if not key.startswith("gfx_"):
                continue
            declared = REGISTRY.get(key)
            if declared is None:
                raise PassError(f"invariant: node {node_label(node)} has undeclared key {key!r}")
            if not isinstance(value, declared.value_type):
                raise PassError(
                    f"invariant: {key} on node {node_label(node)} is {type(value).__name__}, "
                    f"expected {declared.value_type.__name__}"
                )


def _is_module_ref(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    try:
        return isinstance(gm.get_submodule(str(node.target)), torch.nn.Module)
    except AttributeError:
        return False


def _require(gm: fx.GraphModule, p: Pass, done: list[str]) -> None:
    for key in p.reads:
        missing = [n for n in gm.graph.nodes if not _has_key(gm, n, key)]
        if missing:
            raise PassError(
                f"pass {p.name!r} reads {key!r} but node {node_label(missing[0])} "
                f"(and {len(missing) - 1} more) has none; passes run so far: {done or 'none'}"
            )


def _has_key(gm: fx.GraphModule, node: fx.Node, key: str) -> bool:
    if key in node.meta:
        return True
    # Keys PyTorch puts on computed values only: the output node and submodule refs lack them.
    if key in (VAL, "nn_module_stack"):
        return node.op in ("output", "placeholder", "get_attr") or _is_module_ref(gm, node)
    return False


def _gfx_snapshot(gm: fx.GraphModule) -> dict[fx.Node, dict[str, int]]:
    return {
        n: {k: id(v) for k, v in n.meta.items() if k.startswith("gfx_")} for n in gm.graph.nodes
    }


def _ensure(gm: fx.GraphModule, p: Pass, before: dict[fx.Node, dict[str, int]]) -> None:
    for key in p.writes:
        missing = [n for n in gm.graph.nodes if key not in n.meta]
        if missing:
            raise PassError(
                f"pass {p.name!r} declares it writes {key!r} but left node "
                f"{node_label(missing[0])} (and {len(missing) - 1} more) without it"
            )
    for node in gm.graph.nodes:
        old = before.get(node, {})
        for key, value in node.meta.items():
            if key.startswith("gfx_") and key not in p.writes and old.get(key) != id(value):
                raise PassError(
                    f"pass {p.name!r} wrote {key!r} on node {node_label(node)} without "
                    "declaring it in writes="
                )


def format_graph(gm: fx.GraphModule) -> str:
    """The graph one node a line, with every `gfx_` annotation after it."""
    lines = []
    for node in gm.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        notes = "  ".join(f"{k[4:]}={v}" for k, v in node.meta.items() if k.startswith("gfx_"))
        lines.append(f"%{node.name} = {node.op}[{target}]{node.args}  # {notes}".rstrip(" #"))
    return "\n".join(lines)


def _show(gm: fx.GraphModule, ctx: PassContext, index: int, name: str) -> None:
    if name in ctx.print_after or "all" in ctx.print_after:
        print(f"# ---- graph after pass {name!r} ----\n{format_graph(gm)}", file=sys.stderr)
    if ctx.dump_dir is not None:
        ctx.dump_dir.mkdir(parents=True, exist_ok=True)
        (ctx.dump_dir / f"{index:02d}_{name}.txt").write_text(format_graph(gm) + "\n")
