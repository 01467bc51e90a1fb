"""What `make demo` runs: compile a GPT, print its layer table and a hybrid plan, train a few
steps on local CPU ranks, and check the losses against the unmodified model in one process.

    python examples/quickstart.py                       # forks 2 local gloo ranks
    torchrun --nproc-per-node 2 examples/quickstart.py  # the same, launched by torchrun

The plan: the transformer blocks run Megatron tensor parallelism with sequence parallelism
over both ranks, the last block also recomputes its attention core; the embedding, head and
loss split the vocabulary across the same ranks.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

import galvatron_fx as gfx
from galvatron_fx.models.spec import parse_model_spec
from galvatron_fx.runtime.launch import fork_ranks

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=4096,seq=256"
BATCH, SEQ, STEPS, WORLD = 8, 128, 5, 2


def build() -> tuple[torch.nn.Module, tuple, dict]:
    torch.manual_seed(0)
    spec = parse_model_spec(SPEC)
    model = spec.build("cpu")
    args, kwargs = spec.example_inputs(model, BATCH, SEQ)
    return model, args, kwargs


def make_plan(analysis: gfx.Analysis, world: int) -> gfx.Plan:
    blocks = gfx.LayerStrategy(tp=world, sp=True)
    segments = gfx.LayerStrategy(tp=world, vocab_parallel=True)
    strategies = {u.name: blocks if u.kind == "layer" else segments for u in analysis.layers}
    last = [u.name for u in analysis.layers if u.kind == "layer"][-1]
    plan = analysis.plan(strategies, world_size=world)
    return plan.with_strategy(last, gfx.LayerStrategy(tp=world, sp=True, recompute="selective"))


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
    compiled = gfx.parallelize(analysis, plan=plan)
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
    print(f"{'step':>4}  {'compiled (2 ranks)':>18}  {'model (1 process)':>17}")
    for i, (a, b) in enumerate(zip(losses, ref, strict=True)):
        print(f"{i:>4}  {a:>18.6f}  {b:>17.6f}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True))
    print(f"largest relative difference: {worst:.1e}")
    if worst > 1e-5:
        raise SystemExit("the compiled program does not train like the model")


if __name__ == "__main__":
    main()
