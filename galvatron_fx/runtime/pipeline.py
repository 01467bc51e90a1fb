"""Pipeline stages on ranks: one stage of a `StageSplit` per rank, run by PyTorch's own
`torch.distributed.pipelining` (`PipelineStage` and its GPipe / 1F1B schedules).

A stage of the split takes some of the model's inputs and some earlier stages' values, but a
`PipelineStage` receives only what the stage before it sends. So every stage is wrapped in a
`StageRunner` that takes and returns a *flight*: the tuple of every value some later stage
still needs (the model's inputs included: the targets travel to the loss). The last stage
returns the loss as a 1-element tensor (`pipeline_loss` turns it back into a scalar);
micro-batch gradients are averaged by the schedule (`scale_grads`).

This is the pipeline issue's second piece: pipeline-only plans (tp = dp = 1 in every stage),
GPipe, 1F1B and interleaved 1F1B; intra-stage strategies come with the rest of that issue.
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
    "PipelinedModel",
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


class PipelinedModel:
    """A pipeline-only plan on this rank: its stages, their schedule and their optimizer.

    `train_step(*args, **kwargs)` takes whole batches (as `CompiledModel.train_step` does):
    the schedule cuts them into the plan's micro-batches, runs forward and backward, and the
    optimizer steps this rank's stages; the loss of the whole batch (the micro-batches'
    mean) is returned on every rank."""

    def __init__(
        self,
        split: StageSplit,
        plan: Any,
        micro_inputs: Sequence[torch.Tensor],
        optimizer: Any,
        rank: int,
        world: int,
    ) -> None:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        p = plan.pipeline
        n = p.degree * p.virtual_stages
        self.split, self.plan, self.rank, self.world = split, plan, rank, world
        runners = stage_runners(split, range(n))
        examples = example_flights(runners, micro_inputs)
        self.mine = list(range(rank, n, p.degree))
        self.last = (n - 1) in self.mine
        device = torch.device("cpu")
        stages: list[Any] = [
            PipelineStage(runners[k], k, n, device, examples[k][0], examples[k][1])
            for k in self.mine
        ]
        m = p.micro_batches
        if p.schedule.value == "interleaved-1f1b":
            self.schedule: Any = ScheduleInterleaved1F1B(stages, m, loss_fn=pipeline_loss)
        else:
            kind = ScheduleGPipe if p.schedule.value == "gpipe" else Schedule1F1B
            self.schedule = kind(stages[0], m, loss_fn=pipeline_loss)
        self.params = [q for k in self.mine for q in split.stage(k).parameters()]
        self.optimizer = optimizer(self.params)
        self.batch = int(micro_inputs[0].shape[0]) * m

    def train_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        import torch.distributed as dist

        self.optimizer.zero_grad(set_to_none=True)
        inputs = [*args, *kwargs.values()]
        target = torch.zeros(self.batch) if self.last else None
        losses: list[torch.Tensor] = []
        if self.rank == 0:
            self.schedule.step(*inputs, target=target, losses=losses)
        else:
            self.schedule.step(target=target, losses=losses)
        self.optimizer.step()
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        p = self.plan.pipeline
        dist.broadcast(loss, src=(p.degree * p.virtual_stages - 1) % p.degree)  # the last stage's
        return loss

    def full_params(self) -> dict[str, torch.Tensor]:
        return self._gathered(lambda q: q.detach())

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        return self._gathered(lambda q: q.grad)

    def _gathered(self, pick: Any) -> dict[str, Any]:
        import torch.distributed as dist

        mine = {
            self.split.param_names[k][name]: pick(q)
            for k in self.mine
            for name, q in self.split.stage(k).named_parameters()
        }
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return {name: t for part in everyone for name, t in part.items()}
