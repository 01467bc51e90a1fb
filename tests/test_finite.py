"""`check_finite`: a non-finite loss stops training with the step and the layer where the first
inf appeared, on every rank alike, before the optimizer touches the parameters."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GPT, build
from distributed import run_ranks

import galvatron_fx as gfx
from galvatron_fx.plan import LayerStrategy, PipelineConfig, Plan
from galvatron_fx.runtime.finite import NonFiniteLossError

SPEC = "gpt:layers=4,hidden=64,heads=4,vocab=128,seq=32"


def _poison(model: torch.nn.Module, layer: str) -> None:
    """An inf in one weight of `layer`: its output, and everything after, is non-finite."""
    with torch.no_grad():
        weight = next(p for n, p in model.named_parameters() if n.startswith(layer + "."))
        weight.view(-1)[0] = float("inf")


def test_the_step_and_layer_are_named_and_the_update_skipped():
    model, args, kwargs = build(TINY_GPT, batch=4)
    compiled = gfx.compile(model, args, kwargs, check_finite=True)
    compiled.train_step(*args, **kwargs)  # step 1 is fine
    weights = next(n for n, _ in compiled.module.named_parameters() if n.startswith("blocks.1.mlp"))
    with torch.no_grad():
        compiled.module.get_parameter(weights).view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in compiled.full_params().items()}
    with pytest.raises(
        NonFiniteLossError,
        match=r"step 2: the loss is nan; it first appeared in layer 'blocks\.1', in parameter ",
    ):
        compiled.train_step(*args, **kwargs)
    after = compiled.full_params()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True)


def test_off_by_default_a_nonfinite_loss_is_returned():
    model, args, kwargs = build(TINY_GPT, batch=4)
    _poison(model, "blocks.1")
    compiled = gfx.compile(model, args, kwargs)
    assert not torch.isfinite(compiled.train_step(*args, **kwargs))


def _plans(units: list[str], fingerprint: str) -> dict[str, Plan]:
    dp, tp = LayerStrategy(dp=4), LayerStrategy(tp=2, dp=2, dp_mode="zero3")
    pipe = PipelineConfig(degree=2, stage_starts=("blocks.2",), micro_batches=2)
    accumulate = PipelineConfig(micro_batches=2)
    return {
        "dp4": Plan.uniform(units, dp, world_size=4, model_fingerprint=fingerprint),
        "tp2 zero3 accumulate": Plan.uniform(
            units, tp, world_size=4, model_fingerprint=fingerprint, pipeline=accumulate
        ),
        "pp2 tp2": Plan.uniform(
            units, LayerStrategy(tp=2), world_size=4, model_fingerprint=fingerprint, pipeline=pipe
        ),
    }


def _rank(rank: int, world: int, layer: str) -> dict[str, str]:
    model, args, kwargs = build(SPEC, batch=8)
    analysis = gfx.analyze(model, args, kwargs)
    fingerprint = analysis.plan(LayerStrategy(), world_size=1).model_fingerprint
    out = {}
    for name, plan in _plans(analysis.units, fingerprint).items():
        model, args, kwargs = build(SPEC, batch=8)
        _poison(model, layer)
        compiled = gfx.compile(model, args, kwargs, plan=plan, check_finite=True)
        try:
            compiled.train_step(*args, **kwargs)
            out[name] = "no error"
        except NonFiniteLossError as err:
            out[name] = f"{err.step} {err.unit}" + (
                "" if err.unit == layer else f" {err.node} {err}"
            )
    return out


def test_every_rank_names_the_same_layer_under_dp_tp_zero3_and_pipelines():
    results = run_ranks(_rank, 4, "blocks.2")  # the first layer of the second stage
    for rank, found in enumerate(results):
        assert found == dict.fromkeys(found, "1 blocks.2") and len(found) == 3, (rank, found)
