"""`measure_step_memory` against memory known by hand.

- A hand-written program whose step allocates blocks of known sizes: the state (a weight,
  its gradient and an aliasing view, counted once) and the peak are exact to the byte.
- The reference GPT compiled for one process: the state is exactly AdamW's four fp32 copies
  of every parameter plus its 4-byte step counters, the step is steady (nothing leaks).
- Two gloo ranks under ZeRO-2, where gloo frees buffers on its own threads: the ranks, which
  hold the same shapes, measure the same state and the same peak.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import TINY_GPT, build
from distributed import run_ranks
from torch import nn

from galvatron_fx import parallelize
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import DPMode, LayerStrategy
from galvatron_fx.runtime.memory_probe import measure_step_memory, state_storages

WEIGHT = (64, 64)  # 16 KiB of fp32
ACT_NUMEL = 256 * 1024  # 1 MiB of fp32


class _Program:
    """A stand-in for a compiled model: a weight, its gradient, a view of the weight."""

    def __init__(self) -> None:
        self.module = nn.Linear(*WEIGHT, bias=False)
        self.sync = SimpleNamespace(view=self.module.weight.detach()[:2], optimizer=None)

    def train_step(self) -> None:
        self.module.weight.grad = None  # frees last step's gradient
        a = torch.ones(ACT_NUMEL)
        b = torch.ones(2 * ACT_NUMEL)  # peak: weight + a + b
        del a, b
        self.module.weight.grad = torch.ones(WEIGHT)  # kept until the next step


def test_hand_written_program_exact() -> None:
    program = _Program()
    weight_bytes = 64 * 64 * 4
    m = measure_step_memory(program)
    assert m.state_bytes == 2 * weight_bytes  # weight + gradient; the view shares the weight
    assert m.peak_bytes == weight_bytes + 3 * ACT_NUMEL * 4
    assert m.peak_activation_bytes == 3 * ACT_NUMEL * 4 - weight_bytes
    assert m.net_bytes == 0 and m.unowned_bytes == 0
    assert m.phase_peak_bytes == {"other": m.peak_bytes}
    assert sum(a.bytes for a in m.live_at_peak) == 3 * ACT_NUMEL * 4


def test_compiled_gpt_state_is_adamw() -> None:
    model, args, kwargs = build(TINY_GPT, batch=4, seq=16)
    compiled = parallelize(analyze(model, args, kwargs))
    m = measure_step_memory(compiled, *args, **kwargs)
    params = list(compiled.module.parameters())
    numel = sum(p.numel() for p in params)
    assert m.state_bytes == 4 * 4 * numel + 4 * len(params)  # p, grad, exp_avg, exp_avg_sq, step
    assert m.net_bytes == 0 and m.unowned_bytes == 0
    assert m.peak_phase in ("forward", "backward")
    assert m.peak_bytes > max(m.phase_peak_bytes["optimizer"], m.phase_peak_bytes["zero_grad"])
    assert set(m.phase_peak_bytes) >= {"zero_grad", "forward", "backward", "optimizer"}
    assert sum(state_storages(compiled).values()) == m.state_bytes  # steady: same state after


def _zero2(rank: int, world: int) -> tuple[int, int, int, int]:
    model, args, kwargs = build(TINY_GPT, batch=4, seq=16)
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan(LayerStrategy(dp=world, dp_mode=DPMode.ZERO2), world_size=world)
    m = measure_step_memory(parallelize(analysis, plan=plan), *args, **kwargs)
    return m.state_bytes, m.net_bytes, m.unowned_bytes, m.peak_bytes


def test_zero2_ranks_agree() -> None:
    results = run_ranks(_zero2, 2)
    assert len({r[0] for r in results}) == 1
    peaks = [r[3] for r in results]
    assert max(peaks) - min(peaks) <= 16  # the loss scalars may be freed in another order
    # a buffer gloo frees on its thread just after a step ends moves between net and unowned
    assert all(r[1] + r[2] >= 0 and peak > r[0] for r, peak in zip(results, peaks, strict=True))
