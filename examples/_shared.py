"""Shared by the examples: a seeded model with its batch, and a check that two loss
sequences agree."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from galvatron_fx.models.spec import parse_model_spec


def seeded_model(spec_text: str, batch: int, seq: int) -> tuple[torch.nn.Module, tuple, dict]:
    """The model of `spec_text` and one batch, the same in every process (seed 0)."""
    torch.manual_seed(0)
    spec = parse_model_spec(spec_text)
    model = spec.build("cpu")
    args, kwargs = spec.example_inputs(model, batch, seq)
    return model, args, kwargs


def compare_losses(
    ours: Sequence[float], reference: Sequence[float], labels: tuple[str, str]
) -> None:
    """Exit with an error if any step differs by more than 1e-5 (relative)."""
    width = max(len(label) for label in labels)
    print(f"{'step':>4}  {labels[0]:>{width}}  {labels[1]:>{width}}")
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        print(f"{i:>4}  {a:>{width}.6f}  {b:>{width}.6f}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, reference, strict=True))
    print(f"largest relative difference: {worst:.1e}")
    if worst > 1e-5:
        raise SystemExit("the compiled program does not train like the model")
