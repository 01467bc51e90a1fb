"""Model specs: one string names a model for the CLI, the benchmarks and the tests.

- `gpt:layers=12,hidden=768,heads=12,vocab=50257,seq=1024` (also `dropout=0.1`, `tied=1`)
- `hf:gpt2`, `hf:llama:hidden_size=256,num_hidden_layers=4` (a family's config class with
  overrides, random weights, no download)
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
from galvatron_fx.models.hf import build_hf, hf_inputs, hf_max_seq

__all__ = ["ModelSpec", "parse_model_spec"]

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


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: how to build the model and matching example inputs."""

    text: str
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[nn.Module, int, int, torch.device], Inputs]
    max_seq_fn: Callable[[nn.Module], int]

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model, built directly on `device` (`meta` allocates nothing)."""
        with torch.device(device):
            model = self.build_fn()
        return model.train()

    def example_inputs(self, model: nn.Module, batch: int, seq: int | None = None) -> Inputs:
        """`(args, kwargs)` for one training step, with targets/labels, on the model's device."""
        device = next(iter(model.parameters()), torch.empty(0)).device
        seq = seq if seq is not None else self.max_seq_fn(model)
        return self.inputs_fn(model, batch, seq, device)

    def max_seq(self, model: nn.Module) -> int:
        return self.max_seq_fn(model)


def parse_model_spec(text: str) -> ModelSpec:
    """Parse `gpt:...`, `hf:family[:k=v,...]` or `file.py:factory`; ValueError names the part."""
    head, _, rest = text.partition(":")
    if head == "gpt":
        return _gpt_spec(text, rest)
    if head == "hf":
        return _hf_spec(text, rest)
    if head.endswith(".py"):
        return _file_spec(text, Path(head), rest)
    raise ValueError(
        f"model spec {text!r}: expected 'gpt:k=v,...', 'hf:family[:k=v,...]' or "
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


def _gpt_spec(text: str, rest: str) -> ModelSpec:
    kwargs: dict[str, Any] = {}
    for key, value in _pairs(rest, text).items():
        if key not in _GPT_FIELDS:
            raise ValueError(
                f"model spec {text!r}: unknown gpt field {key!r} (known: {', '.join(_GPT_FIELDS)})"
            )
        field, conv = _GPT_FIELDS[key]
        try:
            kwargs[field] = conv(value)
        except ValueError:
            raise ValueError(f"model spec {text!r}: {key}={value!r} is not a number") from None
    config = GPTConfig(**kwargs)

    def inputs(model: nn.Module, batch: int, seq: int, device: torch.device) -> Inputs:
        idx = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        tgt = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        return (idx,), {"targets": tgt}

    return ModelSpec(text, lambda: GPT(config), inputs, lambda m: config.max_seq)


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

    return ModelSpec(text, lambda: build_hf(family, fields), inputs, hf_max_seq)


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

    return ModelSpec(text, fn, inputs, lambda m: 128)


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
