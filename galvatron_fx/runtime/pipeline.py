"""Pipeline stages on ranks: one stage of a `StageSplit` per rank, run by PyTorch's own
`torch.distributed.pipelining` (`PipelineStage` and its GPipe / 1F1B schedules).

A stage of the split takes some of the model's inputs and some earlier stages' values, but a
`PipelineStage` receives only what the stage before it sends. So every stage is wrapped in a
`StageRunner` that takes and returns a *flight*: the tuple of every value some later stage
still needs (the model's inputs included: the targets travel to the loss). The last stage
returns the loss as a 1-element tensor (`pipeline_loss` turns it back into a scalar);
micro-batch gradients are averaged by the schedule (`scale_grads`).

This is the pipeline issue's second piece: pipeline-only plans (tp = dp = 1 in every stage);
intra-stage strategies and interleaved chunks come with the rest of that issue.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from galvatron_fx.passes.split_stages import StageSplit

__all__ = [
    "Flight",
    "StageRunner",
    "example_flights",
    "flights",
    "pipeline_loss",
    "stage_runners",
]


@dataclass(frozen=True)
class Flight:
    """What one stage receives and sends, as nodes of the split's root graph."""

    receives: tuple[fx.Node, ...]
    sends: tuple[fx.Node, ...]
    call: fx.Node
    """The root's call of this stage's submodule."""


def flights(split: StageSplit) -> list[Flight]:
    """Per stage, in order: the values it receives and the ones it passes on."""
    graph = split.graph_module.graph
    calls = [n for n in graph.nodes if n.op == "call_module"]
    produced = {c: {c, *(u for u in c.users if u.target is operator.getitem)} for c in calls}
    last_use: dict[fx.Node, int] = {}
    for k, call in enumerate(calls):
        for a in call.all_input_nodes:
            last_use[a] = k
    outputs = next(n for n in graph.nodes if n.op == "output").all_input_nodes
    for value in outputs:
        last_use[value] = len(calls)
    flight = [n for n in graph.nodes if n.op == "placeholder"]
    out = []
    for k, call in enumerate(calls):
        have = [*flight, *sorted(produced[call], key=_order(graph))]
        sends = tuple(v for v in have if last_use.get(v, -1) > k)
        out.append(Flight(tuple(flight), sends, call))
        flight = list(sends)
    return out


def _order(graph: fx.Graph) -> Any:
    position = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: position[n]


class StageRunner(nn.Module):
    """One stage as a `PipelineStage` runs it: flight in, flight (or the loss) out."""

    def __init__(self, split: StageSplit, k: int, flight: Flight, last: bool) -> None:
        super().__init__()
        self.stage = split.stage(k)
        self.flight, self.last = flight, last

    def forward(self, *values: torch.Tensor) -> Any:
        env: dict[fx.Node, Any] = dict(zip(self.flight.receives, values, strict=True))
        call = self.flight.call
        out = self.stage(*[env[cast(fx.Node, a)] for a in call.args])  # split passes nodes only
        env[call] = out
        for user in call.users:
            if user.target is operator.getitem:
                env[user] = out[user.args[1]]
        if self.last:  # shape (1,): the schedule concatenates the micro-batches' outputs
            return _loss(env[self.flight.sends[0]] if self.flight.sends else out).reshape(1)
        return tuple(env[v] for v in self.flight.sends)


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise ValueError("pipeline: the last stage's first output must be the scalar loss")
    return out


def stage_runners(split: StageSplit, stages: Sequence[int]) -> list[StageRunner]:
    """This rank's stages, wrapped."""
    plan = flights(split)
    n = len(plan)
    return [StageRunner(split, k, plan[k], k == n - 1) for k in stages]


def example_flights(
    runners: Sequence[StageRunner], micro_batch: Sequence[torch.Tensor]
) -> list[tuple[tuple[torch.Tensor, ...], Any]]:
    """(inputs, outputs) of every stage on one real micro-batch, for `PipelineStage`'s
    `input_args` / `output_args`: without them it infers shapes by running each stage on
    uninitialised tensors, and a stage that receives the targets then indexes garbage.
    Floating values are marked as needing gradients: that is what tells the stages to send
    and expect activation gradients."""
    out = []
    values: tuple[torch.Tensor, ...] = tuple(micro_batch)
    with torch.no_grad():
        for runner in runners:
            result = runner(*values)
            sent = tuple(
                _trainable(v) for v in (result if isinstance(result, tuple) else (result,))
            )
            out.append((values, sent if isinstance(result, tuple) else sent[0]))
            values = sent
    return out


def _trainable(value: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    return value.requires_grad_() if value.is_floating_point() else value


def pipeline_loss(output: torch.Tensor, target: Any = None) -> torch.Tensor:
    """The schedule's `loss_fn`: the last stage already computed the loss."""
    del target
    return output.sum()
