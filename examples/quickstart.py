"""What `make demo` runs: compile a GPT for 4 local ranks, print its layer table and a 3D
plan, train a few steps on CPU gloo ranks, and check the losses against the unmodified model
in one process.

    python examples/quickstart.py                       # forks 4 local gloo ranks
    torchrun --nproc-per-node 4 examples/quickstart.py  # the same, launched by torchrun

The plan: two pipeline stages (1F1B, 4 micro-batches) of two ranks each. Inside them, the
transformer blocks run Megatron tensor parallelism with sequence parallelism, the last block
also recomputes its attention core, the second stage's first block shards its parameters
ZeRO-3 style across the pair instead; the embedding, head and loss split the vocabulary.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from _shared import compare_losses, seeded_model  # examples/_shared.py

import galvatron_fx as gfx
from galvatron_fx.runtime.launch import fork_ranks

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=4096,seq=256"
BATCH, SEQ, STEPS, WORLD = 8, 128, 5, 4


def build() -> tuple[torch.nn.Module, tuple, dict]:
    return seeded_model(SPEC, BATCH, SEQ)


def make_plan(analysis: gfx.Analysis, world: int) -> gfx.Plan:
    inner = world // 2  # ranks per pipeline stage
    blocks = gfx.LayerStrategy(tp=inner, sp=True)
    segments = gfx.LayerStrategy(tp=inner, vocab_parallel=True)
    strategies = {u.name: blocks if u.kind == "layer" else segments for u in analysis.layers}
    layers = [u.name for u in analysis.layers if u.kind == "layer"]
    middle = layers[len(layers) // 2]
    strategies[middle] = gfx.LayerStrategy(dp=inner, dp_mode="zero3")
    strategies[layers[-1]] = gfx.LayerStrategy(tp=inner, sp=True, recompute="selective")
    pipeline = gfx.PipelineConfig(degree=2, stage_starts=(middle,), micro_batches=4)
    return analysis.plan(strategies, world_size=world, pipeline=pipeline)


def reference_losses() -> list[float]:
    model, args, kwargs = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(*args, **kwargs)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train(rank: int, world: int) -> list[float]:
    model, args, kwargs = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture's notices, once per rank
        analysis = gfx.analyze(model, args, kwargs)
    plan = make_plan(analysis, world)
    if rank == 0:
        print(gfx.summary(analysis.graph_module), end="\n\n")
        print(plan.table(), end="\n\n")
    compiled = gfx.compile(model, args, kwargs, plan=plan)
    return [compiled.train_step(*args, **kwargs).item() for _ in range(STEPS)]


def main() -> None:
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
        losses = train(dist.get_rank(), dist.get_world_size())
        if dist.get_rank() != 0:
            return
    else:
        print(f"{SPEC}  batch={BATCH} seq={SEQ}: forking {WORLD} local gloo ranks\n")
        losses = fork_ranks(train, WORLD)[0]
    ref = reference_losses()
    compare_losses(losses, ref, ("compiled (4 ranks)", "model (1 process)"))


if __name__ == "__main__":
    main()
