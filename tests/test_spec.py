from __future__ import annotations

import pytest
import torch

from galvatron_fx.models.gpt import GPT, GPTConfig
from galvatron_fx.models.spec import parse_model_spec


def test_gpt_spec_fields_and_block_parameter_count():
    spec = parse_model_spec("gpt:layers=3,hidden=96,heads=6,vocab=500,seq=64,dropout=0.1,tied=1")
    model = spec.build("meta")
    assert isinstance(model, GPT)
    assert model.config == GPTConfig(3, 96, 6, 500, 64, 0.1, True)
    h = 96
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 12 * h * h + 13 * h
    (idx,), kwargs = spec.example_inputs(model, batch=2, seq=16)
    assert idx.shape == (2, 16) and kwargs["targets"].shape == (2, 16)
    assert idx.device.type == "meta"


def test_hf_spec_overrides_reach_the_config():
    spec = parse_model_spec(
        "hf:llama:hidden_size=64,num_hidden_layers=3,num_attention_heads=4,"
        "num_key_value_heads=2,intermediate_size=96,vocab_size=100,rms_norm_eps=1e-5"
    )
    model = spec.build("meta")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 3 and model.config.rms_norm_eps == 1e-5
    _, kwargs = spec.example_inputs(model, batch=1, seq=8)
    assert set(kwargs) == {"input_ids", "labels"}


def test_list_overrides_build_a_swin():
    spec = parse_model_spec(
        "hf:swin:embed_dim=32,depths=[2,2],num_heads=[2,4],image_size=32,patch_size=4,"
        "window_size=4,num_labels=10"
    )
    model = spec.build("meta")
    assert type(model).__name__ == "SwinForImageClassification"
    assert model.config.depths == [2, 2] and model.config.num_heads == [2, 4]
    _, kwargs = spec.example_inputs(model, batch=2, seq=8)
    assert kwargs["pixel_values"].shape == (2, 3, 32, 32) and kwargs["labels"].shape == (2,)


def test_hf_bare_family_and_image_inputs():
    spec = parse_model_spec("hf:vit:image_size=32,patch_size=8,num_hidden_layers=1")
    model = spec.build("meta")
    _, kwargs = spec.example_inputs(model, batch=2)
    assert kwargs["pixel_values"].shape == (2, 3, 32, 32) and kwargs["labels"].shape == (2,)


def test_file_spec_with_and_without_example_inputs(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8))\n"
    )
    spec = parse_model_spec(f"{path}:make")
    model = spec.build()
    (ids,), _ = spec.example_inputs(model, batch=3, seq=5)
    assert ids.shape == (3, 5) and int(ids.max()) < 50
    path.write_text(
        path.read_text()
        + "def example_inputs(model, batch, seq):\n"
        + "    return (torch.zeros(batch, seq, dtype=torch.long),), {}\n"
    )
    spec = parse_model_spec(f"{path}:make")
    (ids,), _ = spec.example_inputs(spec.build(), batch=2, seq=4)
    assert torch.equal(ids, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resnet", "expected 'gpt:k=v"),
        ("gpt:layers=two", "layers='two' is not a number"),
        ("gpt:depth=3", "unknown gpt field 'depth'"),
        ("gpt:layers", "'layers' is not key=value"),
        ("gpt:hidden=100,heads=3", "hidden=100 is not divisible by num_heads=3"),
        ("hf:", "name a family"),
        ("hf:llama:hidden_sizes=3", "LlamaConfig has no field(s) hidden_sizes"),
        ("nowhere.py:make", "file nowhere.py does not exist"),
    ],
)
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as info:
        spec = parse_model_spec(text)
        spec.build("meta")
    assert message in str(info.value)
