"""A HuggingFace Llama (built from a config: random weights, no download) under a searched
plan on 4 local ranks, trained a few steps against the unmodified model in one process.

    python examples/hf_llama.py

Rank 0 searches the plan for 4 devices of the `local` cluster if this machine has been
profiled (`galvatron-fx profile`), otherwise of an A100 node with a small memory budget so
the search has to split the model; every rank receives the same plan.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from _shared import compare_losses, seeded_model  # examples/_shared.py

import galvatron_fx as gfx
from galvatron_fx.runtime.launch import fork_ranks

SPEC = (
    "hf:llama:hidden_size=256,num_hidden_layers=4,num_attention_heads=8,"
    "num_key_value_heads=4,intermediate_size=688,vocab_size=2048,max_position_embeddings=256"
)
BATCH, SEQ, STEPS, WORLD = 8, 128, 4, 4
LOCAL_PROFILE = Path.home() / ".cache" / "galvatron_fx" / "local.json"


def build() -> tuple[torch.nn.Module, tuple, dict]:
    return seeded_model(SPEC, BATCH, SEQ)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def train(rank: int, world: int) -> list[float]:
    model, args, kwargs = build()
    cluster = "local" if LOCAL_PROFILE.exists() else "a100-80gb-sxm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_cache is turned off for capture
        compiled = gfx.compile(
            model, args, kwargs, cluster=cluster, memory_budget_gb=0.03, optimizer=adamw
        )
    if rank == 0:
        print(f"searched on {cluster!r} for {world} devices, 0.03 GB each:")
        print(compiled.plan.table(), end="\n\n")
    return [compiled.train_step(*args, **kwargs).item() for _ in range(STEPS)]


def reference() -> list[float]:
    model, args, kwargs = build()
    opt = adamw(model.parameters())
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(*args, **kwargs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    losses = fork_ranks(train, WORLD)[0]
    ref = reference()
    compare_losses(losses, ref, ("compiled", "HF model"))


if __name__ == "__main__":
    main()
