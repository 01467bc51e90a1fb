"""Time every unit of one rank's compiled program: forward, backward, recomputation, step.

`time_units(compiled, args, kwargs)` instruments the program's graph in place (it is meant
for a throw-away program, as the profiler builds on the fake process group) and runs a few
training steps:

- forward: a `_tick(label)` call is inserted wherever the graph passes from one unit to the
  next (and around each checkpoint call), so the forward is cut into consecutive pieces, each
  charged to its unit; a checkpoint call is also the unit's recomputation, which backward
  repeats;
- backward: every tensor a unit takes from another unit passes through `_Enter`, an identity
  whose backward notes the moment the unit's input gradient is ready. Autograd on the CPU runs
  backward on one thread in reverse order, so the moments cut the backward into pieces, each
  ending when one unit has finished; the last piece (after every input gradient is ready)
  belongs to the first unit, whose inputs need no gradient. Parameter-gradient accumulation
  and the gradient-sync hooks land in the unit that produced them;
- step: the optimizer step, shared among units by the elements each unit steps.

Times are medians over the measured steps. Nothing here is approximate by design except that
the instrumentation itself costs a Python call per crossing (a few per unit).
"""

from __future__ import annotations

import itertools
import operator
import time
from collections import defaultdict
from typing import Any

import torch
import torch.utils.checkpoint
from torch import fx

from galvatron_fx.cost_models.layer_times import LayerTime, median_time
from galvatron_fx.meta import LAYER

__all__ = ["time_units"]

_FORWARD: list[tuple[float, str]] = []
_BACKWARD: list[tuple[float, str]] = []
_RECOMPUTE = "/recompute"


def _tick(label: str) -> None:
    _FORWARD.append((time.perf_counter(), label))


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, unit: str) -> torch.Tensor:
        ctx.unit = unit
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        _BACKWARD.append((time.perf_counter(), ctx.unit))
        return grad, None


def _enter(x: Any, unit: str) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return _Enter.apply(x, unit)
    return x


def _unit(node: fx.Node) -> str | None:
    return LAYER.get(node).name if LAYER.has(node) else None


def _label(node: fx.Node) -> str | None:
    unit = _unit(node)
    if unit is None:
        return None
    source = node.args[0] if node.target is operator.getitem else node
    if isinstance(source, fx.Node) and source.target is torch.utils.checkpoint.checkpoint:
        return unit + _RECOMPUTE
    return unit


def instrument(gm: fx.GraphModule) -> list[str]:
    """Insert the ticks and `_Enter` marks; returns the units in forward order."""
    graph, current, units = gm.graph, None, []
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        label = "end" if node.op == "output" else _label(node)
        if label is not None and label != current:
            with graph.inserting_before(node):
                graph.call_function(_tick, (label,))
            current = label
        unit = _unit(node)
        if unit is None or node.op == "output":
            continue
        if unit not in units:
            units.append(unit)
        _mark_inputs(graph, node, unit)
    gm.recompile()
    return units


def _mark_inputs(graph: fx.Graph, node: fx.Node, unit: str) -> None:
    outside = [
        a
        for a in node.all_input_nodes
        if a.op not in ("get_attr", "placeholder") and _unit(a) not in (None, unit)
    ]
    for a in dict.fromkeys(outside):
        with graph.inserting_before(node):
            mark = graph.call_function(_enter, (a, unit))
        node.replace_input_with(a, mark)


def _forward_times(events: list[tuple[float, str]]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (start, label), (end, _) in itertools.pairwise(events):
        out[label] += end - start
    return out


def _backward_times(
    start_s: float, end_s: float, events: list[tuple[float, str]], first_unit: str
) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    last = start_s
    for t, unit in sorted(events):
        out[unit] += t - last
        last = t
    out[first_unit] += end_s - last
    return out


def time_units(
    compiled: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    step_elems: dict[str, int],
    *,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, LayerTime]:
    """Per unit of `compiled` (a `CompiledModel`, instrumented here): its median times over
    `repeats` training steps. `step_elems` says how many elements each unit's optimizer
    steps, to share the step's time."""
    units = instrument(compiled.module)
    samples: dict[str, list[LayerTime]] = defaultdict(list)
    for i in range(warmup + repeats):
        one = _one_step(compiled, args, kwargs, units, step_elems)
        if i >= warmup:
            for unit, t in one.items():
                samples[unit].append(t)
    return {unit: median_time(ts) for unit, ts in samples.items()}


def _one_step(
    compiled: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    units: list[str],
    step_elems: dict[str, int],
) -> dict[str, LayerTime]:
    _FORWARD.clear()
    _BACKWARD.clear()
    compiled.sync.zero_grad()
    loss = compiled.forward_loss(*args, **kwargs)
    backward_s = time.perf_counter()
    loss.backward()
    step_start_s = time.perf_counter()
    compiled.sync.finish()
    compiled.sync.step()
    step_s = time.perf_counter() - step_start_s
    fwd = _forward_times(_FORWARD)
    bwd = _backward_times(backward_s, step_start_s, _BACKWARD, units[0])
    total_elems = sum(step_elems.values()) or 1
    out = {}
    for unit in units:
        again = fwd.get(unit + _RECOMPUTE, 0.0)
        out[unit] = LayerTime(
            fwd_s=fwd.get(unit, 0.0) + again,
            bwd_s=max(bwd.get(unit, 0.0) - again, 0.0),
            recompute_s=again,
            step_s=step_s * step_elems.get(unit, 0) / total_elems,
        )
    return out
