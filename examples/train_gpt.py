"""Train a GPT with the library API under torchrun: compile (searching a plan for the job's
ranks), train on synthetic tokens or a token file, checkpoint, and resume under any plan.

    torchrun --nproc-per-node 4 examples/train_gpt.py --steps 20 --save ckpt
    torchrun --nproc-per-node 2 examples/train_gpt.py --steps 40 --resume ckpt  # other world
    python examples/train_gpt.py --steps 5      # no torchrun: one process, world size 1

`galvatron-fx train` is the same loop as a command (it also starts the ranks itself).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import galvatron_fx as gfx
from galvatron_fx.models.spec import parse_model_spec

SPEC = "gpt:layers=4,hidden=256,heads=8,vocab=4096,seq=128"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--memory-gb", type=float, default=0.05, help="per-device budget")
    parser.add_argument("--save", type=Path, default=None)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    spec = parse_model_spec(SPEC)
    torch.manual_seed(0)  # every rank builds the same model
    model = spec.build("cpu")

    def batch(step: int) -> tuple[tuple, dict]:  # the same batch on every rank
        torch.manual_seed(1000 + step)
        return spec.example_inputs(model, args.global_batch)

    inputs, kwargs = batch(0)
    compiled = gfx.compile(
        model,
        inputs,
        kwargs,
        cluster="a100-80gb-sxm",  # plan as if on A100s; the run itself is CPU gloo ranks
        memory_budget_gb=args.memory_gb,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4),
    )
    if rank == 0:
        print(compiled.plan.table())
    start = compiled.load_checkpoint(args.resume)["step"] if args.resume else 0
    for step in range(start, args.steps):
        inputs, kwargs = batch(step)
        began = time.perf_counter()
        loss = compiled.train_step(*inputs, **kwargs).item()
        if rank == 0:
            print(f"step {step + 1}  loss {loss:.4f}  {time.perf_counter() - began:.3f} s")
    if args.save:
        compiled.save_checkpoint(args.save, args.steps)
        if rank == 0:
            print(f"saved {args.save}; plain state dict: {gfx.export_state_dict(args.save)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
