from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from galvatron_fx.models.gpt import GPT, GPTConfig
from galvatron_fx.models.hf import SEQ_FIELDS, hf_seq_field
from galvatron_fx.models.spec import DEFAULT_SEQ, SeqDefault, parse_model_spec


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


def _config_model(**fields: object) -> nn.Module:
    model = nn.Linear(1, 1)
    model.config = SimpleNamespace(**fields)  # type: ignore[assignment]
    return model


@pytest.mark.parametrize("field", SEQ_FIELDS)
def test_hf_default_seq_reads_every_common_field_name(field):
    assert hf_seq_field(_config_model(**{field: 1024, "vocab_size": 7})) == (field, 1024)


@pytest.mark.parametrize(
    ("text", "seq", "source"),
    [
        (  # a long-context config: planned at the common pre-training length, and says so
            "hf:llama:max_position_embeddings=131072",
            DEFAULT_SEQ,
            f"config max_position_embeddings=131072 capped at {DEFAULT_SEQ}",
        ),
        ("hf:gpt2:n_positions=512", 512, "config n_positions=512"),  # smaller: the config's
        ("hf:mpt:max_seq_len=256", 256, "config max_seq_len=256"),
        ("hf:t5", DEFAULT_SEQ, "the config sets none of max_position_embeddings, n_positions"),
    ],
)
def test_hf_default_seq_is_capped_and_names_its_source(text, seq, source):
    spec = parse_model_spec(text)
    model = spec.build("meta")
    default = spec.default_seq(model)
    assert default.seq == spec.max_seq(model) == seq
    assert source in default.describe() and "pass --seq to change" in default.describe()
    assert default.describe().startswith(f"seq {seq} (")
    _, kwargs = spec.example_inputs(model, batch=1)
    assert kwargs["input_ids"].shape == (1, seq)


def test_default_seq_of_image_and_gpt_specs():
    vit = parse_model_spec("hf:vit:image_size=32,patch_size=8,num_hidden_layers=1")
    assert vit.default_seq(vit.build("meta")).describe().startswith("seq not used (")
    gpt = parse_model_spec("gpt:layers=1,hidden=32,heads=2,seq=64")
    assert gpt.default_seq(gpt.build("meta")) == SeqDefault(64, "gpt seq=64")
