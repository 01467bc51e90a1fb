from __future__ import annotations

import pytest
import torch
from torch import nn

import galvatron_fx as gfx
from galvatron_fx.meta import LAYER
from galvatron_fx.unit_graph.units import cut_tensors, layer_digraph, unit_nodes
from tests.conftest import LAYER_GROUPS, SWIN, TINY_GPT, TINY_HF, build


def _analyze(spec: str):
    model, args, kwargs = build(spec, "meta")
    return gfx.analyze(model, args, kwargs)


def _assert_units_contiguous(gm: torch.fx.GraphModule) -> None:
    order = [LAYER.get(n).name for n in gm.graph.nodes if n.op == "call_function"]
    runs = [u for i, u in enumerate(order) if i == 0 or order[i - 1] != u]
    assert len(runs) == len(set(runs)), f"a unit is split: {runs}"


def test_gpt_layers_and_segments():
    result = _analyze(TINY_GPT)
    names = [(r.name, r.kind) for r in result.layers]
    assert names == [
        ("embedding", "segment"),
        ("blocks.0", "layer"),
        ("blocks.1", "layer"),
        ("head", "segment"),
        ("loss", "segment"),
    ]
    fps = {r.name: r.fingerprint for r in result.layers}
    assert fps["blocks.0"] == fps["blocks.1"] != fps["embedding"]
    assert all(LAYER.has(n) for n in result.graph.nodes)
    _assert_units_contiguous(result.graph_module)


@pytest.mark.parametrize("family", sorted(TINY_HF))
def test_hf_families_find_their_stacks(family):
    result = _analyze(TINY_HF[family])
    layers = [r for r in result.layers if r.kind == "layer"]
    groups = list(dict.fromkeys(r.group for r in layers))
    assert groups == LAYER_GROUPS[family]
    assert len(layers) == 2 * len(groups)  # two blocks per stack in the tiny configs
    assert result.layers[0].name == "embedding" and result.layers[-1].name == "loss"
    _assert_units_contiguous(result.graph_module)
    if family != "t5":  # T5's first block alone owns the relative position bias
        assert len({r.fingerprint for r in layers}) == 1


def test_t5_stacks_are_two_groups_joined_by_glue():
    result = _analyze(TINY_HF["t5"])
    names = [r.name for r in result.layers]
    assert names.index("glue_0") == names.index("encoder.block.1") + 1
    assert names.index("decoder.block.0") == names.index("glue_0") + 1


def test_swin_stages_are_groups_joined_by_patch_merging():
    """Each stage's blocks are a layer group of their own (widths 32 and 64); the patch
    merging between the stages is a segment and owns its parameters."""
    result = _analyze(SWIN)
    stage = "swin.encoder.layers.{}.blocks.{}".format
    assert [r.name for r in result.layers] == [
        "embedding", stage(0, 0), stage(0, 1), "glue_0", stage(1, 0), stage(1, 1), "head", "loss",
    ]  # fmt: skip
    layers = [r for r in result.layers if r.kind == "layer"]
    assert list(dict.fromkeys(r.group for r in layers)) == LAYER_GROUPS["swin"]
    owners = {LAYER.get(n).name for n in result.graph.nodes if ".downsample." in str(n.target)}
    assert owners == {"glue_0"}
    fps = {r.name: r.fingerprint for r in layers}
    assert fps[stage(1, 0)] == fps[stage(1, 1)]  # no shift at the 4x4 stage: one window
    assert fps[stage(0, 0)] != fps[stage(1, 0)]
    _assert_units_contiguous(result.graph_module)


class _Part(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _Block(nn.Module):
    """Two parts of one class, run one after the other or side by side (nanoGPT's lecture
    version: attention heads in a ModuleList, concatenated)."""

    def __init__(self, chained: bool) -> None:
        super().__init__()
        self.parts = nn.ModuleList([_Part(), _Part()])
        self.merge = nn.Linear(8 if chained else 16, 8)
        self.chained = chained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chained:
            for part in self.parts:
                x = part(x)
            return self.merge(x)
        return x + self.merge(torch.cat([p(x) for p in self.parts], -1))


class _Stack(nn.Module):
    def __init__(self, chained: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(chained), _Block(chained)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


@pytest.mark.parametrize(
    ("chained", "groups"),
    [(True, ["blocks.0.parts", "blocks.1.parts"]), (False, ["blocks"])],
    ids=["stages", "parallel-parts"],
)
def test_a_block_holding_a_stack_is_a_stage_only_if_its_parts_run_in_turn(chained, groups):
    """Parts that feed each other make each block a stage (its parts the layers, the merge
    a segment); parts reading the same input, like heads, stay inside their block."""
    result = gfx.analyze(_Stack(chained), (torch.randn(2, 8),))
    layers = [r for r in result.layers if r.kind == "layer"]
    assert list(dict.fromkeys(r.group for r in layers)) == groups
    assert len(layers) == (4 if chained else 2)
    _assert_units_contiguous(result.graph_module)


def test_layer_graph_is_a_chain_for_gpt_and_cuts_carry_one_tensor():
    result = _analyze(TINY_GPT)
    g = layer_digraph(result.graph_module)
    assert list(g.edges) == [
        ("embedding", "blocks.0"),
        ("blocks.0", "blocks.1"),
        ("blocks.1", "head"),
        ("head", "loss"),
    ]
    cuts = cut_tensors(result.graph_module)
    # between blocks exactly one activation (the residual stream) crosses
    assert len(cuts[1]) == 1
    (x,) = cuts[1]
    assert tuple(x.meta["val"].shape) == (2, 16, 64)


def test_llama_layers_receive_shared_mask_and_rotary_inputs():
    result = _analyze(TINY_HF["llama"])
    nodes = unit_nodes(result.graph_module)
    first = set(nodes["model.layers.0"])
    inputs = {a for n in first for a in n.all_input_nodes if a not in first and a.op != "get_attr"}
    assert len(inputs) >= 3  # hidden states, cos/sin, mask: more than one tensor crosses
