"""Capture: an unmodified model and example inputs -> the ATen-level training GraphModule.

Reads: the model and example inputs (plain modules, `symbolic_trace`d GraphModules,
HuggingFace models, meta-device models and inputs).
Writes: a GraphModule from `torch.export.export(..., strict=False).module()`; PyTorch puts
`val` (a FakeTensor) and `nn_module_stack` on every computed node.
Guarantees: parameters are `get_attr` nodes named by their original FQN; the graph is in
the canonical forms of `passes/canonical.py` (`x @ w.T (+ b)` is one `aten.linear`, batched
matmuls over merged (batch, heads) dims run 4-D); nothing is allocated for a meta-device
model; a model that cannot be captured raises one `CaptureError`
naming the model class, the failing line of the user's source and what to do.
"""

from __future__ import annotations

import os
import traceback
import warnings
from typing import Any

import torch
from torch import fx, nn

from galvatron_fx.passes.canonical import linears, merged_matmuls

__all__ = ["CaptureError", "capture"]


class CaptureError(RuntimeError):
    """The model could not be traced to a graph. `original` keeps the exception from export."""

    def __init__(self, message: str, original: BaseException) -> None:
        super().__init__(message)
        self.original = original


def capture(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | list[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace `model(*example_inputs, **example_kwargs)` to an ATen-level GraphModule.

    The model keeps its mode (train mode captures dropout). HuggingFace models are captured
    with `use_cache=False`, since a KV cache is not a tensor export can return."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs)
    kwargs = _without_cache(model, dict(example_kwargs or {}))
    try:
        with warnings.catch_warnings():
            # export warns about internals the user cannot act on (e.g. deprecated HF paths)
            warnings.simplefilter("ignore")
            program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:
        raise _explain(model, err) from None
    # Input-shape guards are dropped: later passes change local shapes on purpose.
    gm = program.module(check_guards=False)
    assert isinstance(gm, fx.GraphModule)
    if linears(gm) + merged_matmuls(gm):
        gm.recompile()
    return gm


def _without_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn HuggingFace's KV cache off in every config the model holds (T5's stacks keep
    copies of their own), so the captured signature stays the user's."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    cached = [c for c in configs.values() if getattr(c, "use_cache", False) is True]
    if cached and kwargs.get("use_cache") is not False:
        warnings.warn(
            f"{type(model).__name__}: turning use_cache off for capture (a KV cache is for "
            "generation and cannot be a graph output)",
            stacklevel=3,
        )
        for config in cached:
            config.use_cache = False
    return kwargs


_ADVICE = [
    (
        ("data-dependent", "GuardOnDataDependentSymNode", "Could not guard on"),
        "the model branches on a tensor's value in Python; express it with torch.where or "
        "torch.cond, or move the decision out of forward()",
    ),
    (
        ("in output, which is not a known type", "pytree"),
        "forward() returns an object export cannot flatten; return tensors (for HuggingFace "
        "models pass use_cache=False) or register the type with torch.utils._pytree",
    ),
    (
        ("Unsupported", "not supported"),
        "an operation in forward() is not traceable; move it out of forward() or wrap it in a "
        "torch custom op (torch.library.custom_op)",
    ),
]


def _explain(model: nn.Module, err: Exception) -> CaptureError:
    name = type(model).__qualname__
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = _user_frame(err)
    advice = next(
        (tip for keys, tip in _ADVICE if any(k in str(err) for k in keys)),
        "check that forward() runs eagerly on the example inputs and returns tensors",
    )
    message = (
        f"cannot capture model {name}: {type(err).__name__}: {reason[:300]}\n"
        f"  at {where}\n"
        f"  what to do: {advice}"
    )
    return CaptureError(message, err)


def _user_frame(err: BaseException) -> str:
    """The innermost traceback frame outside torch, transformers internals and this package."""
    skip = (
        os.path.dirname(torch.__file__),
        os.path.dirname(os.path.dirname(__file__)),
        "<string>",
        os.sep + "contextlib.py",
        os.sep + "functools.py",
    )
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if not f.filename.startswith(skip) and not f.filename.endswith(skip)]
    if not user:
        return "<no user frame found: the failure is inside torch>"
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
