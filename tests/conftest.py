"""Shared fixtures: tiny model specs for the reference GPT and the HuggingFace families."""

from __future__ import annotations

import warnings

import pytest
import torch

torch.set_num_threads(1)

TINY_GPT = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"

TINY_HF = {
    "gpt2": "hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=128,n_positions=32",
    "llama": (
        "hf:llama:hidden_size=64,num_hidden_layers=2,num_attention_heads=4,"
        "num_key_value_heads=2,intermediate_size=128,vocab_size=128"
    ),
    "bert": (
        "hf:bert:hidden_size=64,num_hidden_layers=2,num_attention_heads=4,"
        "intermediate_size=128,vocab_size=128"
    ),
    "vit": (
        "hf:vit:hidden_size=64,num_hidden_layers=2,num_attention_heads=4,"
        "intermediate_size=128,image_size=32,patch_size=8,num_labels=10"
    ),
    "t5": "hf:t5:d_model=64,d_kv=16,d_ff=128,num_layers=2,num_heads=4,vocab_size=128",
}
"""Family -> spec with two layers (T5: two encoder and two decoder blocks)."""

SWIN = (
    "hf:swin:embed_dim=32,depths=[2,2],num_heads=[2,4],image_size=32,patch_size=4,window_size=4,"
    "num_labels=10,hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0,drop_path_rate=0.0"
)
"""Swin with two stages of two blocks (widths 32 and 64), dropout off. Not in TINY_HF: its
capture takes seconds, and the tests that loop over TINY_HF do not need a sixth family."""

LAYER_GROUPS = {
    "gpt2": ["transformer.h"],
    "llama": ["model.layers"],
    "bert": ["bert.encoder.layer"],
    "vit": ["vit.layers"],
    "t5": ["encoder.block", "decoder.block"],
    "swin": ["swin.encoder.layers.0.blocks", "swin.encoder.layers.1.blocks"],
}
"""The stacks group_layers must find in each family (its layer groups, in order)."""


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build(spec_text: str, device: str = "cpu", batch: int = 2, seq: int = 16):
    """(model, args, kwargs) for a spec, seeded."""
    from galvatron_fx.models.spec import parse_model_spec

    torch.manual_seed(0)
    spec = parse_model_spec(spec_text)
    model = spec.build(device)
    args, kwargs = spec.example_inputs(model, batch, seq)
    return model, args, kwargs
