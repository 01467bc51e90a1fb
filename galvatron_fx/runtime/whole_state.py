"""Whole parameters, gradients and checkpoints of a compiled model, whatever its plan: the base
of `CompiledModel` and `PipelinedModel`. It joins the piece arithmetic (`state`) and the
checkpoint files (`checkpoint`), which need only `StateHolder` and so stay below it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from galvatron_fx.plan import Plan
from galvatron_fx.runtime import checkpoint
from galvatron_fx.runtime.data_parallel import GradSync
from galvatron_fx.runtime.state import Cache, whole_value

__all__ = ["WholeState"]


class WholeState:
    """Whole parameters, gradients and checkpoints for a compiled model, one program or a
    pipeline: the model says which parameters this rank holds (`state_parts`) and how the
    ranks' parts come together (`_merge`). Collectives: call on every rank."""

    plan: Plan
    compile_timings_s: dict[str, float]
    """Set by `compile`: seconds per step of the compile (capture, each pass, search, ...)."""

    def state_parts(self) -> tuple[fx.GraphModule, GradSync, dict[str, Any], int]:
        """(module, gradient sync, the parameter specs this rank holds, rank)."""
        raise NotImplementedError

    def _merge(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Every parameter's whole tensor, from this rank's (default: it holds them all)."""
        return mine

    def full_params(self) -> dict[str, torch.Tensor]:
        return self._whole(lambda q: q.detach())

    def full_grads(self) -> dict[str, torch.Tensor | None]:
        return self._whole(lambda q: q.grad)

    def _whole(self, value_of: Callable[[nn.Parameter], torch.Tensor | None]) -> dict[str, Any]:
        module, sync, specs, _ = self.state_parts()
        cache: Cache = {}
        return self._merge(
            {n: whole_value(module, sync, s, value_of, "", cache) for n, s in specs.items()}
        )

    def save_checkpoint(
        self, root: str | Path, step: int, extra: Mapping[str, Any] | None = None
    ) -> Path:
        """`runtime.checkpoint.save`: an atomic, plan-independent checkpoint."""
        return checkpoint.save(self, root, step, extra)

    def load_checkpoint(self, root: str | Path) -> dict[str, Any]:
        """`runtime.checkpoint.load`: the newest checkpoint under `root`, resharded for this
        plan; returns its meta (`step`, `extra`)."""
        return checkpoint.load(self, root)
