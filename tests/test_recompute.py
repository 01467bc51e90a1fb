"""Recompute: checkpointed regions give the same loss and gradients, really save fewer
activations, leave units without attention alone, and name unknown units."""

from __future__ import annotations

import copy
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import galvatron_fx as gfx
from galvatron_fx.meta import LAYER, PLACEMENT
from galvatron_fx.passes.manager import PassContext, RewriteTarget, run_passes
from galvatron_fx.passes.recompute import recompute, recompute_regions
from galvatron_fx.passes.shard import shard
from galvatron_fx.plan import LayerStrategy, Plan, Recompute
from galvatron_fx.unit_graph.attention import attention_cores
from galvatron_fx.unit_graph.units import unit_nodes
from tests.conftest import TINY_GPT, TINY_HF, build

SPECS = {"gpt": TINY_GPT, "llama": TINY_HF["llama"], "bert": TINY_HF["bert"]}


class EagerAttention(nn.Module):
    """Attention written out by hand (no sdpa), with dropout on the probabilities."""

    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
            for t in self.qkv(x).split(C, dim=2)
        )
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)  # (B, nh, T, T)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), 0.1, self.training)
        return x + self.proj((att @ v).transpose(1, 2).reshape(B, T, C))


class EagerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList(EagerAttention() for _ in range(2))
        self.head = nn.Linear(32, 50)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


@pytest.fixture(scope="module")
def analysed():
    """name -> (graph module, args, kwargs), each analysed once for the whole module."""
    out = {}
    with warnings.catch_warnings():  # conftest's quieting is per test, this runs before it
        warnings.simplefilter("ignore")
        for name, spec in SPECS.items():
            model, args, kwargs = build(spec)
            out[name] = (gfx.analyze(model, args, kwargs).graph_module, args, kwargs)
        torch.manual_seed(0)
        idx, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
        eager = gfx.analyze(EagerModel(), (idx, targets)).graph_module
    out["eager"] = (eager, (idx, targets), {})
    return out


def _layers(gm: fx.GraphModule) -> list[str]:
    return [u for u, nodes in unit_nodes(gm).items() if LAYER.get(nodes[0]).kind == "layer"]


def _rewritten(gm: fx.GraphModule, mode: Recompute) -> fx.GraphModule:
    return recompute_regions(copy.deepcopy(gm), dict.fromkeys(_layers(gm), mode))


def _checkpoints(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]


def _loss_and_grads(gm: fx.GraphModule, args, kwargs) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)  # bert has dropout: both runs must draw the same masks
    out = gm(*args, **kwargs)
    loss = out if isinstance(out, torch.Tensor) else out["loss"]
    params = dict(gm.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), dict(zip(params, grads, strict=True))


def _saved_bytes(gm: fx.GraphModule, args, kwargs) -> int:
    """Activation bytes autograd keeps for backward; parameters excluded, storages once."""
    weights = {p.untyped_storage().data_ptr() for p in (*gm.parameters(), *gm.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gm(*args, **kwargs)
    return sum(saved.values())


@pytest.mark.parametrize("mode", [Recompute.FULL, Recompute.SELECTIVE])
@pytest.mark.parametrize("name", ["gpt", "llama", "bert", "eager"])
def test_same_loss_and_gradients(analysed, name, mode):
    gm, args, kwargs = analysed[name]
    new = _rewritten(gm, mode)
    assert _checkpoints(new), "nothing was checkpointed"
    ref_loss, ref_grads = _loss_and_grads(gm, args, kwargs)
    loss, grads = _loss_and_grads(new, args, kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for param, grad in ref_grads.items():
        torch.testing.assert_close(grads[param], grad, rtol=1e-6, atol=1e-6, msg=param)


def test_gpt_full_saves_least_and_selective_in_between(analysed):
    gm, args, kwargs = analysed["gpt"]
    full, selective = _rewritten(gm, Recompute.FULL), _rewritten(gm, Recompute.SELECTIVE)
    assert len(_checkpoints(full)) == len(_layers(gm)) == 2  # one per layer
    cores = [c for u in _layers(gm) for c in attention_cores(unit_nodes(gm)[u])]
    assert len(_checkpoints(selective)) == len(cores) == 2  # one per sdpa
    none_b, sel_b, full_b = (_saved_bytes(g, args, kwargs) for g in (gm, selective, full))
    assert full_b < sel_b < none_b, (full_b, sel_b, none_b)


def test_eager_attention_core_is_the_score_chain(analysed):
    gm, args, kwargs = analysed["eager"]
    core = attention_cores(unit_nodes(gm)["blocks.0"])[0]
    ops = [n.target.__name__.split(".")[0] for n in core[0].graph.nodes if n in core]
    assert ops == ["matmul", "div", "masked_fill", "softmax", "dropout", "matmul"]
    selective = _rewritten(gm, Recompute.SELECTIVE)
    # the (B, nh, T, T) scores, probabilities and dropout mask are no longer kept
    assert _saved_bytes(selective, args, kwargs) < _saved_bytes(gm, args, kwargs)


def test_region_reads_the_roots_parameters_and_every_node_is_tagged(analysed):
    gm, _, _ = analysed["gpt"]
    new = _rewritten(gm, Recompute.FULL)
    sub = new.get_submodule("recompute_0")
    assert sub.get_parameter("blocks.0.mlp.fc.weight") is new.get_parameter(
        "blocks.0.mlp.fc.weight"
    )
    assert all(LAYER.has(n) for n in new.graph.nodes)
    assert all("val" in n.meta for n in _checkpoints(new))


def test_selective_on_a_unit_without_attention_does_nothing(analysed):
    gm, _, _ = analysed["gpt"]
    new = recompute_regions(
        copy.deepcopy(gm), {"embedding": Recompute.SELECTIVE, "blocks.0": Recompute.NONE}
    )
    assert new.code == gm.code  # the pass's output (on a deep copy) against the untouched input
    assert not _checkpoints(new)


def test_multi_output_region_returns_a_tuple_and_getitems(analysed):
    gm, args, kwargs = analysed["llama"]
    # llama's embedding segment hands the layers the hidden states, the mask, cos and sin
    new = recompute_regions(copy.deepcopy(gm), {"embedding": Recompute.FULL})
    (call,) = _checkpoints(new)
    assert len(call.users) == len(call.meta["val"]) >= 3
    assert all(u.target is operator.getitem and "val" in u.meta for u in call.users)
    ref_loss, ref_grads = _loss_and_grads(gm, args, kwargs)
    loss, grads = _loss_and_grads(new, args, kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grads, ref_grads, rtol=0, atol=0)


def test_unknown_unit_is_named_with_the_known_ones(analysed):
    gm, _, _ = analysed["gpt"]
    with pytest.raises(ValueError, match=r"'blocks\.9'.*known units: \['embedding', 'blocks\.0'"):
        recompute_regions(copy.deepcopy(gm), {"blocks.9": Recompute.FULL})


def test_pass_follows_the_plan_under_the_runner(analysed):
    gm, _, _ = analysed["gpt"]
    units = list(unit_nodes(gm))
    plan = Plan.uniform(units, LayerStrategy(), world_size=1, model_fingerprint="test")
    plan = plan.with_strategy("blocks.1", LayerStrategy(recompute=Recompute.FULL))
    # the pass runs after `shard` in the compiler's list: placements must exist
    placed = run_passes(copy.deepcopy(gm), PassContext(target=RewriteTarget(plan)), [shard])
    untouched = run_passes(copy.deepcopy(placed), PassContext(), [recompute])
    assert not _checkpoints(untouched)  # no plan, nothing to do
    new = run_passes(copy.deepcopy(placed), PassContext(target=RewriteTarget(plan)), [recompute])
    assert all(PLACEMENT.has(n) for n in new.graph.nodes)
    (call,) = _checkpoints(new)
    assert LAYER.get(call).name == "blocks.1"
