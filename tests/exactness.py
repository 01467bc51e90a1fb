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

Replicas: comparing one rank's gathered tensors with the reference says nothing of the other
ranks, and a data-parallel replica that stepped with its own gradient (a missed or partial
all-reduce) leaves rank 0 exact. `run_steps_and_replicas` has every rank return checksums
of its losses, of each piece it holds (`held_checksums`) and of the whole tensors it gathered
(`whole_checksums`); `replica_disagreements` names each rank whose checksum differs from
the lowest rank holding the same piece. Replicas are compared bit for bit: each piece's
value comes out of one collective (the same result on every member) or the same
computation on the same operands, so any difference is a desynchronised replica.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pytest
import torch
from conftest import build

from galvatron_fx.runtime.program import get_attr
from galvatron_fx.runtime.state import Cache, whole_value

__all__ = ["BATCH", "EPS", "LR", "RTOL", "SEQ", "STEPS", "adamw", "check", "reference"]
__all__ += ["reference_of", "rel_err", "run_steps"]
__all__ += ["checksum", "held_checksums", "replica_disagreements", "run_steps_and_replicas"]
__all__ += ["whole_checksums"]

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


def checksum(t: torch.Tensor) -> str:
    """A hash of `t`'s dtype, shape and bytes (one ulp anywhere changes it), and its 2-norm
    to read in a failure message."""
    data = t.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{data.dtype} {tuple(data.shape)}".encode(), digest_size=8)
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{h.hexdigest()} (norm {data.double().norm().item():.9g})"


def held_checksums(compiled: Any, what: Literal["value", "gradient"]) -> dict[str, str]:
    """Checksums of the pieces of parameters (or their gradients) this rank holds, keyed by
    what the piece is: the parameter's name and its TP position. Ranks that hold the same
    piece (the same TP position in different dp groups or pipeline stages) share the key.

    A piece is the tensor the forward reads (the parameter itself: replicated, a TP piece,
    or ZeRO-1/2's copy refreshed from the shards) and the gradient the optimizer steps with;
    a ZeRO-1/2/3 shard is gathered over its dp group first (a shard alone has no replica).
    The gathers are collectives over each parameter's dp group: call on every rank."""
    module, sync, specs, rank = compiled.state_parts()
    cache: Cache = {}
    out = {}
    for name, spec in specs.items():
        tp = spec.tp_group.size if spec.tp_dim is not None else 1
        where = f"tp piece {spec.tp_group.index(rank)} of {tp}" if tp > 1 else "replicated"
        local = dataclasses.replace(spec, tp_dim=None)  # no TP gather: this rank's piece
        if what == "gradient":
            t = whole_value(module, sync, local, lambda q: q.grad, "grad", cache)
        elif spec.zero3_flat:  # no parameter of its own: the gathered shard is its value
            t = whole_value(module, sync, local, lambda q: q.detach(), "value", cache)
        else:
            t = get_attr(module, name).detach()
        if t is not None:
            out[f"{what} of {name} ({where})"] = checksum(t)
    return out


def whole_checksums(tensors: Mapping[str, torch.Tensor | None], what: str) -> dict[str, str]:
    """Checksums of the whole tensors this rank gathered (`full_grads`, `full_params`)."""
    return {f"whole {what} of {n}": checksum(t) for n, t in tensors.items() if t is not None}


def run_steps_and_replicas(
    compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any], keep: bool = True
) -> dict[str, Any]:
    """`run_steps`, and under "replicas" this rank's checksums: each step's loss, the pieces
    it holds (gradients after the first step, values after the last) and the whole tensors
    it gathered. `keep=False` leaves the whole tensors out (they are large; the checksums
    stand for them). Collectives: call on every rank."""
    losses, grads, sums = [], {}, {}
    for step in range(STEPS):
        losses.append(compiled.train_step(*args, **kwargs).item())
        if step == 0:
            grads = compiled.full_grads()
            sums |= held_checksums(compiled, "gradient") | whole_checksums(grads, "gradient")
    params = compiled.full_params()
    sums |= held_checksums(compiled, "value") | whole_checksums(params, "value")
    sums |= {f"loss of step {i}": repr(x) for i, x in enumerate(losses)}
    got = {"losses": losses, "grads": grads, "params": params} if keep else {"losses": losses}
    return {**got, "replicas": sums}


def replica_disagreements(per_rank: Sequence[Mapping[str, str]]) -> list[str]:
    """One line per rank whose checksum of a piece differs from the lowest rank holding the
    same piece (`per_rank[r]`: rank r's checksums), naming both ranks and the tensor."""
    holders: dict[str, list[int]] = {}
    for rank, sums in enumerate(per_rank):
        for key in sums:
            holders.setdefault(key, []).append(rank)
    out = []
    for key, ranks in holders.items():
        first, want = ranks[0], per_rank[ranks[0]][key]
        out += [
            f"rank {r}: {key} is {per_rank[r][key]}, its replica on rank {first} {want}"
            for r in ranks[1:]
            if per_rank[r][key] != want
        ]
    return out
