"""HuggingFace families by name: config class with overrides, random weights, no download.

`build_hf("llama", {"hidden_size": 256})` builds `LlamaForCausalLM(LlamaConfig(hidden_size=256))`
and `hf_inputs` makes matching example inputs with labels, so the captured graph holds the
loss. Families not in the table are built with `AutoConfig.for_model` and
`AutoModelForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["HF_FAMILIES", "SEQ_FIELDS", "build_hf", "hf_inputs", "hf_seq_field", "hf_takes_tokens"]

SEQ_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "max_seq_length",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)
"""Config fields that name a model's longest sequence, by family (Llama, GPT-2, MPT, ...,
ChatGLM's `seq_length`), in the order they are read."""


@dataclass(frozen=True)
class HFFamily:
    config_class: str
    model_class: str
    inputs: str
    """`tokens` (input_ids + labels) or `image` (pixel_values + class labels)."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """Config fields a bare config lacks for training (e.g. T5's decoder start token)."""


HF_FAMILIES: dict[str, HFFamily] = {
    "gpt2": HFFamily("GPT2Config", "GPT2LMHeadModel", "tokens"),
    "llama": HFFamily("LlamaConfig", "LlamaForCausalLM", "tokens"),
    "bert": HFFamily("BertConfig", "BertForMaskedLM", "tokens"),
    "vit": HFFamily("ViTConfig", "ViTForImageClassification", "image"),
    "swin": HFFamily("SwinConfig", "SwinForImageClassification", "image"),
    "t5": HFFamily(
        "T5Config",
        "T5ForConditionalGeneration",
        "tokens",
        (("decoder_start_token_id", 0), ("pad_token_id", 0)),
    ),
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "HuggingFace models need transformers: pip install 'galvatron-fx[hf]'"
        ) from err
    transformers.logging.set_verbosity_error()
    return transformers


def build_hf(family: str, overrides: dict[str, Any]) -> nn.Module:
    """A randomly initialised model of `family` on the current default device."""
    tf = _transformers()
    fam = HF_FAMILIES.get(family)
    if fam is None:
        try:
            config = tf.AutoConfig.for_model(family, **overrides)
        except ValueError as err:
            known = ", ".join(sorted(HF_FAMILIES))
            raise ValueError(
                f"hf:{family}: unknown model type ({known}, or any "
                f"transformers model_type with a causal-LM head)"
            ) from err
        try:
            return tf.AutoModelForCausalLM.from_config(config)
        except ValueError:
            known = ", ".join(sorted(HF_FAMILIES))
            raise ValueError(
                f"hf:{family}: {type(config).__name__} has no causal-LM head; the families "
                f"with their own heads and inputs are {known}, and any other model_type "
                "must be a causal LM. Pass your own model as path/to/file.py:factory"
            ) from None
    settings = {**dict(fam.defaults), **overrides}
    config_class = getattr(tf, fam.config_class)
    unknown = [k for k in overrides if not hasattr(config_class(), k)]
    if unknown:
        raise ValueError(f"hf:{family}: {fam.config_class} has no field(s) {', '.join(unknown)}")
    config = config_class(**settings)
    model: nn.Module = getattr(tf, fam.model_class)(config)
    return model


def hf_inputs(
    model: nn.Module, family: str, batch: int, seq: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Random example inputs with labels for a model built by `build_hf`."""
    config: Any = getattr(model, "config", None)
    kind = HF_FAMILIES[family].inputs if family in HF_FAMILIES else "tokens"
    if kind == "image":
        size = config.image_size
        return {
            "pixel_values": torch.randn(batch, config.num_channels, size, size, device=device),
            "labels": torch.randint(0, config.num_labels, (batch,), device=device),
        }
    vocab = config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), device=device),
        "labels": torch.randint(0, vocab, (batch, seq), device=device),
    }


def hf_takes_tokens(family: str) -> bool:
    """Whether the family's example inputs are token sequences (not images)."""
    return family not in HF_FAMILIES or HF_FAMILIES[family].inputs == "tokens"


def hf_seq_field(model: nn.Module) -> tuple[str, int] | None:
    """The first of `SEQ_FIELDS` set to a positive int in the model's config (or its text
    config, for models that nest one), with its value; None when there is none. The field is
    named as the config stores it (GPT-2's `max_position_embeddings` is its `n_positions`)."""
    config: Any = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", None)
    configs = [config, text_config()] if callable(text_config) else [config]
    for cfg in configs:
        for field in SEQ_FIELDS:
            value = getattr(cfg, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return getattr(cfg, "attribute_map", {}).get(field, field), value
    return None
