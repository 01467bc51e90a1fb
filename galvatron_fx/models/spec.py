"""Model specs: one string names a model for the CLI, the benchmarks and the tests.

- `gpt:layers=12,hidden=768,heads=12,vocab=50257,seq=1024` (also `dropout=0.1`, `tied=1`)
- `llama:layers=32,hidden=4096,heads=32,kv_heads=8,ffn=14336,vocab=128256,seq=8192`
  (torchtitan's Llama 3: RMSNorm, rotary, grouped-query causal SDPA, SwiGLU)
- `hf:gpt2`, `hf:llama:hidden_size=256,num_hidden_layers=4` (a family's config class with
  overrides, random weights, no download); without `--seq` it runs at `DEFAULT_SEQ` tokens,
  or at the config's maximum length when that is smaller (`SeqDefault` says which field)
- `path/to/file.py:factory` (a function returning an `nn.Module`; the file may define
  `example_inputs(model, batch, seq)` returning `(args, kwargs)`, otherwise token ids are
  made from the model's first `nn.Embedding`)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from galvatron_fx.models.gpt import GPT, GPTConfig
from galvatron_fx.models.hf import SEQ_FIELDS, build_hf, hf_inputs, hf_seq_field, hf_takes_tokens
from galvatron_fx.models.llama import Llama, LlamaConfig

__all__ = ["DEFAULT_SEQ", "FILE_SPEC_SEQ", "ModelSpec", "SeqDefault", "parse_model_spec"]

DEFAULT_SEQ = 2048
"""Tokens per sample of an `hf:` spec run without `--seq`, unless its config allows fewer:
configs state 32K-128K positions (`max_position_embeddings`), the longest the model can
take, not what a plan should assume; 2048 is the common pre-training length."""
FILE_SPEC_SEQ = 128
"""Tokens per sample of a `file.py:factory` spec run without `--seq`."""

Inputs = tuple[tuple[Any, ...], dict[str, Any]]

_GPT_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "layers": ("num_layers", int),
    "hidden": ("hidden", int),
    "heads": ("num_heads", int),
    "vocab": ("vocab_size", int),
    "seq": ("max_seq", int),
    "dropout": ("dropout", float),
    "tied": ("tie_weights", lambda v: v.lower() in ("1", "true", "yes")),
}

_LLAMA_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "layers": ("num_layers", int),
    "hidden": ("hidden", int),
    "heads": ("num_heads", int),
    "kv_heads": ("num_kv_heads", int),
    "ffn": ("ffn", int),
    "vocab": ("vocab_size", int),
    "seq": ("max_seq", int),
}


@dataclass(frozen=True)
class SeqDefault:
    """The sequence length a spec runs at when none is given, and where it came from."""

    seq: int
    source: str
    """Why this length: `config max_position_embeddings=131072 capped at 2048`."""
    used: bool = True
    """False where the inputs have no sequence (images)."""

    def describe(self) -> str:
        """One line for the user: `seq 2048 (config ... capped at 2048; pass --seq to change)`."""
        if not self.used:
            return f"seq not used ({self.source})"
        return f"seq {self.seq} ({self.source}; pass --seq to change)"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: how to build the model and matching example inputs."""

    text: str
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[nn.Module, int, int, torch.device], Inputs]
    default_seq_fn: Callable[[nn.Module], SeqDefault]

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model, built directly on `device` (`meta` allocates nothing)."""
        with torch.device(device):
            model = self.build_fn()
        return model.train()

    def example_inputs(self, model: nn.Module, batch: int, seq: int | None = None) -> Inputs:
        """`(args, kwargs)` for one training step, with targets/labels, on the model's device."""
        device = next(iter(model.parameters()), torch.empty(0)).device
        seq = seq if seq is not None else self.max_seq(model)
        return self.inputs_fn(model, batch, seq, device)

    def default_seq(self, model: nn.Module) -> SeqDefault:
        """The sequence length used when none is given, with its source."""
        return self.default_seq_fn(model)

    def max_seq(self, model: nn.Module) -> int:
        """The sequence length used when none is given (`default_seq(model).seq`)."""
        return self.default_seq_fn(model).seq


def parse_model_spec(text: str) -> ModelSpec:
    """Parse `gpt:...`, `hf:family[:k=v,...]` or `file.py:factory`; ValueError names the part."""
    head, _, rest = text.partition(":")
    if head == "gpt":
        return _gpt_spec(text, rest)
    if head == "llama":
        return _llama_spec(text, rest)
    if head == "hf":
        return _hf_spec(text, rest)
    if head.endswith(".py"):
        return _file_spec(text, Path(head), rest)
    raise ValueError(
        f"model spec {text!r}: expected 'gpt:k=v,...', 'llama:k=v,...', 'hf:family[:k=v,...]' or "
        "'path/to/file.py:factory'"
    )


def _pairs(text: str, where: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in _split(text))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"model spec {where!r}: {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _fields(
    text: str, rest: str, family: str, known: dict[str, tuple[str, Callable[[str], Any]]]
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, value in _pairs(rest, text).items():
        if key not in known:
            raise ValueError(
                f"model spec {text!r}: unknown {family} field {key!r} (known: {', '.join(known)})"
            )
        field, conv = known[key]
        try:
            kwargs[field] = conv(value)
        except ValueError:
            raise ValueError(f"model spec {text!r}: {key}={value!r} is not a number") from None
    return kwargs


def _token_inputs(vocab: int) -> Callable[[nn.Module, int, int, torch.device], Inputs]:
    def inputs(model: nn.Module, batch: int, seq: int, device: torch.device) -> Inputs:
        idx = torch.randint(0, vocab, (batch, seq), device=device)
        tgt = torch.randint(0, vocab, (batch, seq), device=device)
        return (idx,), {"targets": tgt}

    return inputs


def _llama_spec(text: str, rest: str) -> ModelSpec:
    config = LlamaConfig(**_fields(text, rest, "llama", _LLAMA_FIELDS))
    default = SeqDefault(config.max_seq, f"llama seq={config.max_seq}")
    inputs = _token_inputs(config.vocab_size)
    return ModelSpec(text, lambda: Llama(config), inputs, lambda m: default)


def _gpt_spec(text: str, rest: str) -> ModelSpec:
    config = GPTConfig(**_fields(text, rest, "gpt", _GPT_FIELDS))

    default = SeqDefault(config.max_seq, f"gpt seq={config.max_seq}")
    return ModelSpec(text, lambda: GPT(config), _token_inputs(config.vocab_size), lambda m: default)


def _split(text: str) -> list[str]:
    """`a=1,b=[2,2]` -> ['a=1', 'b=[2,2]']: commas inside brackets belong to a list value."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def _literal(value: str) -> Any:
    if value.startswith("[") and value.endswith("]"):  # Swin's depths=[2,2,6,2]
        return [_literal(v.strip()) for v in _split(value[1:-1]) if v.strip()]
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def _hf_spec(text: str, rest: str) -> ModelSpec:
    family, _, overrides = rest.partition(":")
    if not family:
        raise ValueError(f"model spec {text!r}: name a family, e.g. hf:llama")
    fields = {k: _literal(v) for k, v in _pairs(overrides, text).items()}

    def inputs(model: nn.Module, batch: int, seq: int, device: torch.device) -> Inputs:
        return (), hf_inputs(model, family, batch, seq, device)

    def default(model: nn.Module) -> SeqDefault:
        return _hf_seq_default(model) if hf_takes_tokens(family) else _IMAGES

    return ModelSpec(text, lambda: build_hf(family, fields), inputs, default)


_IMAGES = SeqDefault(DEFAULT_SEQ, "the inputs are images of the config's image_size", used=False)


def _hf_seq_default(model: nn.Module) -> SeqDefault:
    """`DEFAULT_SEQ`, or the config's maximum length when smaller."""
    found = hf_seq_field(model)
    if found is None:
        names = ", ".join(SEQ_FIELDS)
        return SeqDefault(DEFAULT_SEQ, f"the config sets none of {names}")
    field, value = found
    if value > DEFAULT_SEQ:
        return SeqDefault(DEFAULT_SEQ, f"config {field}={value} capped at {DEFAULT_SEQ}")
    return SeqDefault(value, f"config {field}={value}")


def _file_spec(text: str, path: Path, factory: str) -> ModelSpec:
    if not path.is_file():
        raise ValueError(f"model spec {text!r}: file {path} does not exist")
    if not factory.isidentifier():
        raise ValueError(f"model spec {text!r}: name the factory function after the colon")
    module_name = f"_gfx_user_{path.stem}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    loader.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ValueError(f"model spec {text!r}: {path} has no function {factory!r}")
    user_inputs = getattr(module, "example_inputs", None)

    def inputs(model: nn.Module, batch: int, seq: int, device: torch.device) -> Inputs:
        if callable(user_inputs):
            args, kwargs = user_inputs(model, batch, seq)
            return tuple(args), dict(kwargs)
        return (_token_ids(model, text, batch, seq, device),), {}

    default = SeqDefault(FILE_SPEC_SEQ, f"default of a file spec without --seq: {FILE_SPEC_SEQ}")
    return ModelSpec(text, fn, inputs, lambda m: default)


def _token_ids(
    model: nn.Module, text: str, batch: int, seq: int, device: torch.device
) -> torch.Tensor:
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ValueError(
            f"model spec {text!r}: the model has no nn.Embedding to size token ids from; "
            "define example_inputs(model, batch, seq) -> (args, kwargs) in the file"
        )
    return torch.randint(0, emb.num_embeddings, (batch, seq), device=device)
