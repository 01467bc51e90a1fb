"""Pipeline stages on ranks: one stage of a `StageSplit` per rank, run by PyTorch's own
`torch.distributed.pipelining` (`PipelineStage` and its GPipe / 1F1B schedules).

A stage of the split takes some of the model's inputs and some earlier stages' values, but a
`PipelineStage` receives only what the stage before it sends. So every stage is wrapped in a
`StageRunner` that takes and returns a *flight*: the tuple of every value some later stage
still needs (the model's inputs included: the targets travel to the loss). The last stage
returns the loss as a 1-element tensor (`pipeline_loss` turns it back into a scalar);
micro-batch gradients are averaged by the schedule (`scale_grads`).

Inside a stage, the program is the parallel passes' rewrite for the stage's ranks (3D:
pipeline x tensor x data / ZeRO); pipeline rank s owns global ranks s*S .. s*S + S - 1
(S = world / degree), and rank s*S + i sends to rank (s+1)*S + i (`stage_ranks`).
Gradients are synced by `GradSync` once every micro-batch's gradient has accumulated. A
weight tied across stages (embedding and head) is held by every pipeline rank whose stages
read it, as in Megatron: the same initial values, its gradient summed over those ranks (one
all-reduce per stage position, `shared_params`), the same optimizer, so the copies stay equal;
checkpoints and whole-parameter gathers see one tensor under its original names.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from galvatron_fx.runtime.collectives import (
    GROUPS,
    GroupRef,
    counting,
    whole_inputs,
    zero3_saved_tensors,
)
from galvatron_fx.runtime.compiled import InputSlice, counts_targets, micro_batch, slice_batch
from galvatron_fx.runtime.data_parallel import GradSync
from galvatron_fx.runtime.finite import first_nonfinite_in, raise_nonfinite
from galvatron_fx.runtime.program import ParamSpec, StageSplit, get_attr
from galvatron_fx.runtime.whole_state import WholeState

__all__ = [
    "Flight",
    "PipelinedModel",
    "StageProgram",
    "StageRunner",
    "example_flights",
    "flights",
    "held_specs",
    "pipeline_loss",
    "shared_groups",
    "shared_params",
    "stage_runners",
    "stages_holding",
]


@dataclass(frozen=True)
class Flight:
    """What one stage receives and sends, as nodes of the split's root graph."""

    receives: tuple[fx.Node, ...]
    sends: tuple[fx.Node, ...]
    call: fx.Node
    """The root's call of this stage's submodule."""
    local: tuple[fx.Node, ...] = ()
    """Model inputs a later stage reads (the targets, say): every rank holds the whole
    batch, so it slices them itself instead of receiving them from the stage before."""


def flights(split: StageSplit) -> list[Flight]:
    """Per stage, in order: the values it receives and the ones it passes on. The first
    stage receives the model's inputs; the others receive activations only and read the
    inputs they use from their own rank's batch (`Flight.local`)."""
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
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    flight: list[fx.Node] = []
    out = []
    for k, call in enumerate(calls):
        have = [*flight, *sorted(produced[call], key=_order(graph))]
        sends = tuple(v for v in have if last_use.get(v, -1) > k)
        if k == len(calls) - 1 and outputs and outputs[0] in sends:
            # the last stage returns the loss: the model's first output, wherever it was
            # computed (T5's outputs also carry the encoder's states from earlier stages)
            sends = (outputs[0], *(v for v in sends if v is not outputs[0]))
        if k == 0:
            out.append(Flight(tuple(inputs), sends, call))
        else:
            local = tuple(v for v in inputs if v in call.all_input_nodes)
            out.append(Flight(tuple(flight), sends, call, local))
        flight = list(sends)
    return out


def _order(graph: fx.Graph) -> Any:
    position = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: position[n]


@dataclass
class StageProgram:
    """One rank's rewritten program, cut into stages, with what running it needs."""

    split: StageSplit
    module: fx.GraphModule
    """The rewritten graph before the cut: its parameters by name (the stages share them)."""
    specs: dict[str, ParamSpec]
    """How every parameter lives on this rank (groups in global ranks)."""
    inputs: list[InputSlice]
    """Per model input: the dp group its batch is split over (stage-local ranks)."""
    local_rank: int
    """This rank's position among its stage's ranks."""
    loss_group: GroupRef
    loss_avg: bool
    zero3: bool

    @property
    def input_index(self) -> dict[str, int]:
        """Placeholder name -> position among the model's inputs."""
        nodes = self.split.graph_module.graph.nodes
        return {n.name: i for i, n in enumerate(x for x in nodes if x.op == "placeholder")}


def held_specs(program: StageProgram, stages: Sequence[int]) -> dict[str, ParamSpec]:
    """The parameters `stages` hold (matched by identity: a recomputed region's submodule
    holds the same Parameter under another name)."""
    split = program.split
    held = {id(q) for k in stages for q in split.stage(k).parameters()}
    return {
        name: spec
        for name, spec in program.specs.items()
        if id(get_attr(program.module, spec.zero3_flat or name)) in held
    }


def shared_params(program: StageProgram, degree: int) -> dict[str, tuple[int, ...]]:
    """Parameters (spec names) that the stages of several pipeline ranks hold (a weight tied
    across stages) -> those pipeline ranks, in order. Every rank computes the same answer
    (from the whole program, before `release_other_stages`)."""
    n = len(program.split.stages)
    held = [held_specs(program, range(pp, n, degree)) for pp in range(degree)]
    out = {}
    for name, spec in program.specs.items():
        ranks = tuple(pp for pp in range(degree) if name in held[pp])
        if len(ranks) > 1 and spec.alias_of is None:
            out[name] = ranks
    return out


def shared_groups(pipeline_ranks: tuple[int, ...], per_stage: int) -> list[tuple[int, ...]]:
    """The groups summing the gradient of a weight these pipeline ranks hold: one per
    position in the stage (its global ranks on each holder), Megatron's embedding groups."""
    return [tuple(r * per_stage + i for r in pipeline_ranks) for i in range(per_stage)]


def stages_holding(program: StageProgram, stages: Sequence[int]) -> dict[str, int]:
    """Spec name -> how many of `stages` hold it (each runs its own backward)."""
    counts = [held_specs(program, [k]) for k in stages]
    return {name: sum(name in c for c in counts) for name in program.specs}


class StageRunner(nn.Module):
    """One stage as a `PipelineStage` runs it: flight in, flight (or the loss) out. The
    first stage takes whole micro-batches and keeps this rank's slice of each input; the
    last returns its loss scaled so that summing gradients over micro-batches and ranks
    gives the gradient of the batch's mean loss."""

    def __init__(
        self, program: StageProgram, k: int, flight: Flight, last: bool, loss_scale: float
    ) -> None:
        super().__init__()
        self.stage = program.split.stage(k)
        self.flight, self.last, self.loss_scale = flight, last, loss_scale
        self.program, self.first = program, k == 0
        self.input_index = program.input_index

        self.batch: list[Any] = []
        """Every model input of the step (whole batch), for the inputs this stage reads
        itself (`Flight.local`); set by `start_step`."""
        self.micro_batches, self.calls = 1, 0
        self.weighed = last and counts_targets(self.stage)
        """The loss divides by a counted-target total: return it times that count (the
        micro-batch's share of the sum), `PipelinedModel.train_step` divides by the batch's."""
        self.replicas = program.loss_group.size if program.loss_avg else 1
        """Ranks computing this same loss (a replicated one: its unit took the whole batch)."""
        self.counted: list[torch.Tensor] = []
        self.keep_inputs = False
        """Keep each micro-batch's inputs for the step (`check_finite`'s re-run)."""
        self.kept: list[tuple[torch.Tensor, ...]] = []
        self.watch: Any = None
        """While set (an `fx.Interpreter` class), the stage runs through it."""

    def start_step(self, inputs: list[Any], micro_batches: int) -> None:
        self.batch, self.micro_batches, self.calls = inputs, micro_batches, 0
        self.kept, self.counted = [], []

    def forward(self, *values: torch.Tensor) -> Any:
        if self.keep_inputs and self.watch is None:
            self.kept.append(tuple(v.detach() for v in values))
        whole = list(values) if self.first else []  # the micro-batch, before dp slicing
        if self.first:
            values = tuple(self._mine(v, i) for i, v in enumerate(values))
        env: dict[fx.Node, Any] = dict(zip(self.flight.receives, values, strict=True))
        if self.flight.local:
            # every schedule runs a stage's forwards in micro-batch order
            i, self.calls = self.calls % self.micro_batches, self.calls + 1
            for node in self.flight.local:
                k = self.input_index[node.name]
                whole.append(micro_batch(self.batch[k], self.micro_batches, i))
                env[node] = self._mine(whole[-1], k)
        call = self.flight.call
        with (
            zero3_saved_tensors() if self.program.zero3 else contextlib.nullcontext(),
            whole_inputs(whole),
            counting() as counts,
        ):
            # received values' gradients are sent back: dense (ones passed on go as they are)
            received = set(self.flight.receives) if not self.first else set()
            args = [
                _contiguous_grad(env[a]) if a in received else env[a]
                for a in cast(list[fx.Node], call.args)  # nodes only
            ]
            out = self.watch.run(*args) if self.watch is not None else self.stage(*args)
        env[call] = out
        for user in call.users:
            if user.target is operator.getitem:
                env[user] = out[user.args[1]]
        if self.last:  # shape (1,): the schedule concatenates the micro-batches' outputs
            loss = _loss(env[self.flight.sends[0]] if self.flight.sends else out)
            if self.weighed:  # a loss replicated over its dp group is averaged there too
                self.counted.append(counts[-1])
                return (loss * counts[-1] / self.replicas).reshape(1)
            return (loss * self.loss_scale).reshape(1)
        # contiguous: the next stage receives into buffers laid out like these (gloo: dense)
        return tuple(_dense(env[v]) for v in self.flight.sends)

    def _mine(self, value: Any, k: int) -> Any:
        """This rank's dp slice of model input `k` (a micro-batch of it)."""
        return slice_batch(value, self.program.inputs[k].dp_group, self.program.local_rank)


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise ValueError("pipeline: the last stage's first output must be the scalar loss")
    return out


def release_other_stages(program: StageProgram, mine: Sequence[int]) -> None:
    """Replace the parameters and buffers only other ranks' stages use by meta tensors of
    the same shape, in the rank's whole rewritten module and in the split's stages: a
    pipeline rank then holds its own stages' weights, not the whole model's. (The model the
    caller built still holds them all until the caller drops it.)"""
    split = program.split
    keep = {id(t) for k in mine for t in (*split.stage(k).parameters(), *split.stage(k).buffers())}
    for root in (program.module, split.graph_module):
        for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:  # fmt: skip
            if id(t) in keep or t.device.type == "meta":
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = root.get_submodule(owner_name)
            empty = torch.empty_like(t, device="meta")
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(empty, requires_grad=t.requires_grad)
            else:
                owner._buffers[attr] = empty


def stage_runners(
    program: StageProgram, stages: Sequence[int], micro_batches: int
) -> dict[int, StageRunner]:
    """This rank's stages, wrapped."""
    plan = flights(program.split)
    n = len(plan)
    scale = 1.0 / micro_batches / (program.loss_group.size if program.loss_avg else 1)
    return {k: StageRunner(program, k, plan[k], k == n - 1, scale) for k in stages}


def example_flights(
    runners: dict[int, StageRunner],
    micro_batch: Sequence[torch.Tensor],
    num_stages: int,
    rank_of: Callable[[int], int],
) -> dict[int, tuple[tuple[torch.Tensor, ...], Any]]:
    """(inputs, outputs) of this rank's stages on one real micro-batch, for
    `PipelineStage`'s `input_args` / `output_args`: without them it infers shapes by running
    each stage on uninitialised tensors, and a stage that receives the targets then indexes
    garbage. Stages run in order, each on what the previous one really sent (`rank_of(k)`:
    the rank running stage k). Floating values are marked as needing gradients: that is
    what tells the stages to send and expect activation gradients."""
    import torch.distributed as dist

    out = {}
    values: tuple[torch.Tensor, ...] = tuple(micro_batch)
    for k in sorted(runners):
        if k > 0:
            box: list[Any] = [None]
            dist.recv_object_list(box, src=rank_of(k - 1))
            values = tuple(_trainable(v) for v in box[0])
        with torch.no_grad():
            result = runners[k](*values)
        sent = tuple(_trainable(v) for v in (result if isinstance(result, tuple) else (result,)))
        out[k] = (values, sent if isinstance(result, tuple) else sent[0])
        if k < num_stages - 1:
            dist.send_object_list([[v.detach() for v in sent]], dst=rank_of(k + 1))
    return out


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous: the zero-bubble schedules send a stage's
    input gradients as `autograd.grad` returns them, gloo sends contiguous tensors only, and
    the gradient of a sequence-parallel gather's input is a strided view."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


def _dense(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def _contiguous_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _ContiguousGrad.apply(value)
    return value


def _trainable(value: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    return value.requires_grad_() if value.is_floating_point() else value


def pipeline_loss(output: torch.Tensor, target: Any = None) -> torch.Tensor:
    """The schedule's `loss_fn`: the last stage already computed the loss."""
    del target
    return output.sum()


class PipelinedModel(WholeState):
    """A plan with pipeline stages on this rank: its stages (each rewritten for the
    stage's tp / dp / ZeRO strategies), their schedule, gradient sync and optimizer.

    `train_step(*args, **kwargs)` takes whole batches (as `CompiledModel.train_step` does):
    the schedule cuts them into the plan's micro-batches, runs forward and backward, the
    gradients are synced inside each stage and the optimizer steps this rank's stages; the
    loss of the whole batch (the micro-batches' mean) is returned on every rank."""

    @property
    def check_finite(self) -> bool:
        """Stop with `NonFiniteLossError` on an inf or NaN loss; the stages then keep each
        micro-batch's inputs until the step ends (`finite.py`)."""
        return any(r.keep_inputs for r in self.runners.values())

    @check_finite.setter
    def check_finite(self, on: bool) -> None:
        for runner in self.runners.values():
            runner.keep_inputs = on

    def __init__(
        self,
        program: StageProgram,
        plan: Any,
        micro_inputs: Sequence[torch.Tensor],
        sync: GradSync,
        rank: int,
        world: int,
        pp_group: Any = None,
    ) -> None:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleInterleavedZeroBubble,
        )

        p = plan.pipeline
        n = p.degree * p.virtual_stages
        per_stage = world // p.degree
        self.program, self.plan, self.rank, self.world = program, plan, rank, world
        self.sync = sync
        self.steps = 0
        self.weighed = counts_targets(program.split.stage(p.degree * p.virtual_stages - 1))
        pp_rank, local = divmod(rank, per_stage)
        self.mine = list(range(pp_rank, n, p.degree))
        self.held = held_specs(program, self.mine)
        """The parameters this rank's stages hold."""
        self.last = (n - 1) in self.mine
        self.last_rank = ((n - 1) % p.degree) * per_stage  # the last stage's first rank
        self.runners = runners = stage_runners(program, self.mine, p.micro_batches)
        for runner in runners.values():
            runner.start_step(list(micro_inputs), 1)
        examples = example_flights(
            runners, micro_inputs, n, lambda k: (k % p.degree) * per_stage + local
        )
        self.device = device = _device(micro_inputs)  # where the stages exchange activations
        release_other_stages(program, self.mine)
        stages: list[Any] = [
            PipelineStage(runners[k], k, n, device, *examples[k], group=pp_group) for k in self.mine
        ]
        m = p.micro_batches
        # the loss is already scaled by 1 / m, and the schedule's own scaling would land
        # after GradSync has launched the gradients' all-reduce
        if p.schedule.value in ("interleaved-1f1b", "interleaved-zb"):
            multi = (
                ScheduleInterleaved1F1B
                if p.schedule.value == "interleaved-1f1b"
                else ScheduleInterleavedZeroBubble
            )
            self.schedule: Any = multi(stages, m, loss_fn=pipeline_loss, scale_grads=False)
        else:
            # with fewer micro-batches than stages 1F1B never reaches its steady state: it is
            # GPipe (which torch's Schedule1F1B then refuses to run)
            gpipe = p.schedule.value == "gpipe" or m < p.degree
            kind = ScheduleGPipe if gpipe else Schedule1F1B
            self.schedule = kind(stages[0], m, loss_fn=pipeline_loss, scale_grads=False)
        self.batch = int(micro_inputs[0].shape[0]) * m

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.sync.optimizer

    def train_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        import torch.distributed as dist

        self.sync.zero_grad()
        inputs = [*args, *kwargs.values()]
        for runner in self.runners.values():
            runner.start_step(inputs, self.plan.pipeline.micro_batches)
        target = torch.zeros(self.batch, device=self.device) if self.last else None
        losses: list[torch.Tensor] = []
        if 0 in self.mine:
            self.schedule.step(*inputs, target=target, losses=losses)
        else:
            self.schedule.step(target=target, losses=losses)
        self.sync.finish()
        self.steps += 1
        later = self.check_finite or self.weighed  # the step needs the broadcast below
        if not later:
            self.sync.step()
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros((), device=self.device)
        if self.last and self.program.loss_group.size > 1:
            dist.all_reduce(loss, group=GROUPS.groups[tuple(sorted(self.program.loss_group.ranks))])
        counted = [c for r in self.runners.values() for c in r.counted]
        packed = torch.stack([loss, sum(counted, torch.zeros_like(loss)).to(loss.dtype)])
        dist.broadcast(packed, src=self.last_rank)  # the loss (and the batch's count)
        loss = packed[0] / packed[1] if self.weighed else packed[0]
        if self.weighed:
            self.sync.scale_grads(1.0 / packed[1])
        if self.check_finite and not bool(loss.isfinite()):
            self._stop_nonfinite(loss)  # decided before the update: a bad step changes nothing
        if later:
            self.sync.step()
        return loss

    def _stop_nonfinite(self, loss: torch.Tensor) -> None:
        """Re-run each of this rank's stages on the inputs it kept, watching every node."""
        found = None
        for runner in self.runners.values():
            hit = first_nonfinite_in(runner, runner.kept)
            found = found or hit
        raise_nonfinite(self.steps, loss, found, self.plan.units)

    def state_parts(self) -> tuple[Any, GradSync, dict[str, Any], int]:
        return (self.program.module, self.sync, self.held, self.rank)

    def _merge(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Each stage assembled its own parameters; every rank receives them all."""
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return {name: t for part in everyone for name, t in part.items()}


def _device(inputs: Sequence[Any]) -> torch.device:
    """The device of the first input tensor (CPU when there is none)."""
    tensor = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    return tensor.device if tensor is not None else torch.device("cpu")
