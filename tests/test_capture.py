from __future__ import annotations

import resource

import pytest
import torch
from torch import nn

import galvatron_fx as gfx
from galvatron_fx.models.gpt import GPT, GPTConfig
from tests.conftest import TINY_GPT, TINY_HF, build


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def _every_node_has_val(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "get_attr" and isinstance(getattr(gm, str(node.target), None), nn.Module):
            continue  # a higher-order op's subgraph is a module, not a value
        assert "val" in node.meta, node.name


def test_gpt_capture_is_aten_level_and_matches_eager():
    model, args, kwargs = build(TINY_GPT)
    gm = gfx.capture(model, args, kwargs)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.linear.default", "aten.layer_norm.default", "aten.embedding.default"} <= targets
    assert "aten.scaled_dot_product_attention.default" in targets
    _every_node_has_val(gm)
    params = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert params == {name for name, _ in model.named_parameters()}
    torch.testing.assert_close(gm(*args, **kwargs), model(*args, **kwargs), rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(TINY_HF))
def test_hf_families_capture_and_match_eager(family):
    model, args, kwargs = build(TINY_HF[family])
    model.eval()  # deterministic dropout for the comparison
    gm = gfx.capture(model, args, kwargs)
    _every_node_has_val(gm)
    torch.testing.assert_close(_loss(gm(*args, **kwargs)), _loss(model(*args, **kwargs)))


def test_hf_use_cache_is_turned_off_with_a_warning():
    model, args, kwargs = build(TINY_HF["llama"])
    model.config.use_cache = True
    with pytest.warns(UserWarning, match="use_cache"):
        gfx.capture(model, args, kwargs)
    assert model.config.use_cache is False


def test_symbolic_traced_graph_module_is_captured_with_its_layers():
    model, args, _ = build(TINY_GPT)
    traced = torch.fx.symbolic_trace(model, concrete_args={"targets": None})
    result = gfx.analyze(traced, args)
    names = [r.name for r in result.layers if r.kind == "layer"]
    assert names == ["blocks.0", "blocks.1"]
    torch.testing.assert_close(result.graph_module(*args), model(*args))


def test_meta_model_allocates_nothing():
    # 2.4B parameters: about 10 GB in fp32 if capture or annotation materialised anything.
    spec = "gpt:layers=2,hidden=8192,heads=64,vocab=50257,seq=4096"
    model, args, kwargs = build(spec, "meta", batch=8, seq=4096)
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = gfx.analyze(model, args, kwargs)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib
    assert grown_kib < 1024 * 1024, f"peak RSS grew by {grown_kib / 1024:.0f} MiB"
    assert all(p.device.type == "meta" for p in result.graph_module.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total > 2e9 and sum(r.params for r in result.layers) == total


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lin(x).sum() > 0:  # branches on a value: not capturable
            return x * 2
        return x


def test_uncapturable_model_gets_one_clear_error():
    with pytest.raises(gfx.CaptureError) as info:
        gfx.capture(_DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "_DataDependent" in message
    assert "test_capture.py" in message and "if self.lin(x).sum() > 0" in message
    assert "torch.where" in message or "torch.cond" in message
    assert len(message.splitlines()) <= 4
    assert info.value.__cause__ is None and info.value.original is not None


def test_capture_rejects_non_modules():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gfx.capture(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]


def test_tied_head_is_captured_once():
    model = GPT(GPTConfig(num_layers=1, hidden=32, num_heads=2, vocab_size=64, tie_weights=True))
    result = gfx.analyze(model, (torch.randint(0, 64, (2, 8)),))
    assert sum(r.params for r in result.layers) == sum(p.numel() for p in model.parameters())
