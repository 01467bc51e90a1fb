"""One process against N ranks: the reference run, the ranks' run and the comparison.

`reference(spec)` trains the unmodified model for `STEPS` AdamW steps in this process;
`run_steps(compiled, ...)` does the same with a compiled program on every rank (gathering
whole gradients after the first step and whole parameters at the end: collectives, so every
rank calls it); `check(ref, got, label)` asserts the loss and every gradient after one step,
and every parameter after `STEPS` steps, agree within `RTOL` (relative, in the 2-norm of
each tensor).

Two things the tolerances must allow for, both measured:
- a key bias gets an analytically zero gradient (softmax ignores a shift shared by all keys),
  so its computed gradient is rounding noise (~1e-12) in any summation order; gradients below
  1e-6 of the model's largest are compared in absolute terms against that floor;
- AdamW divides by sqrt(v) + eps and so turns such noise into full-size steps; the tests use
  eps=1e-5 (measured: with eps=1e-6 the key-bias noise alone moves a fresh qkv bias by 1.06e-5
  of its norm in three steps; real gradients here are 1e-4 and larger, far above eps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import build

__all__ = ["BATCH", "EPS", "LR", "RTOL", "SEQ", "STEPS", "adamw", "check", "reference"]
__all__ += ["reference_of", "rel_err", "run_steps"]

BATCH, SEQ, STEPS, LR, EPS = 8, 16, 3, 1e-3, 1e-5
RTOL = 1e-5


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, eps=EPS)


def reference(spec: str) -> dict[str, Any]:
    """Losses of `STEPS` steps, gradients of the first, parameters after the last."""
    return reference_of(lambda: build(spec, batch=BATCH, seq=SEQ))


def reference_of(make: Callable[[], tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> dict[str, Any]:
    """`reference` for the (model, args, kwargs) that `make` builds (seeded in `make`)."""
    model, args, kwargs = make()
    opt = adamw(model.parameters())
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        out = model(*args, **kwargs)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params}


def run_steps(compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """What `reference` returns, from a compiled program (call it on every rank)."""
    losses, grads = [], {}
    for step in range(STEPS):
        losses.append(compiled.train_step(*args, **kwargs).item())
        if step == 0:
            grads = compiled.full_grads()
    return {"losses": losses, "grads": grads, "params": compiled.full_params()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).norm().item() / max(want.norm().item(), 1e-30)


def check(ref: dict, got: dict, label: str) -> None:
    assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=RTOL), label
    floor = 1e-6 * max(g.norm().item() for g in ref["grads"].values())
    noise = {n for n, g in ref["grads"].items() if g.norm().item() < floor}
    bad = [  # below the floor (rounding noise of an analytically zero gradient): absolute
        n
        for n, g in ref["grads"].items()
        if (got["grads"][n] - g).norm().item()
        > (RTOL * g.norm().item() if n not in noise else floor)
    ]
    assert not bad, f"{label}: gradients differ for {bad[:4]}"
    bad = [
        n
        for n, p in ref["params"].items()
        if n not in noise and rel_err(got["params"][n], p) > RTOL
    ]
    assert not bad, f"{label}: parameters after {STEPS} AdamW steps differ for {bad[:4]}"
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL), label
