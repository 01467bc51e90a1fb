"""Capture: an unmodified model and example inputs -> the ATen-level training GraphModule.

Reads: the model and example inputs (plain modules, `symbolic_trace`d GraphModules,
HuggingFace models, meta-device models and inputs).
Writes: a GraphModule from `torch.export.export(..., strict=False).module()`; PyTorch puts
`val` (a FakeTensor) and `nn_module_stack` on every computed node.
Guarantees: parameters are `get_attr` nodes named by their original FQN; a linear written
as `x @ w.T (+ b)` (a matmul with a parameter's transpose, a bias parameter added) is one
`aten.linear` node, as `nn.Linear` gives, so it has one sharding rule and one cost; batched matmuls over merged
(batch, heads) dims run 4-D (`passes/canonical.py`); nothing is
allocated for a meta-device model; a model that cannot be captured raises one `CaptureError`
naming the model class, the failing line of the user's source and what to do.
"""

from __future__ import annotations

import os
import traceback
import warnings
from typing import Any

import torch
from torch import fx, nn

from galvatron_fx.passes.canonical import merged_matmuls

__all__ = ["CaptureError", "capture"]

aten = torch.ops.aten


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
    if _linears(gm) + merged_matmuls(gm):
        gm.recompile()
    return gm


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def _linears(gm: fx.GraphModule) -> int:
    """Rewrite `matmul(x, T(w))`, `w` a 2-D parameter and `T` its transpose, into
    `linear(x, w)`: the same arithmetic (`aten.linear` is defined as it), but the op tensor
    parallelism splits as Megatron does. Returns the number of matmuls rewritten."""
    count = 0
    for node in gm.graph.nodes:
        if node.target is not aten.matmul.default or len(node.args) != 2:
            continue
        x, wt = node.args
        if not (isinstance(wt, fx.Node) and wt.target in _TRANSPOSES):
            continue
        w = wt.args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and _is_2d_transpose(wt)):
            continue
        node.target, node.args = aten.linear.default, (x, w)
        if not wt.users:
            gm.graph.erase_node(wt)
        _fold_bias(gm, node)
        count += 1
    return count


def _fold_bias(gm: fx.GraphModule, linear: fx.Node) -> None:
    """`linear(x, w) + b`, `b` a 1-D parameter as wide as the output, becomes
    `linear(x, w, b)`: a row-parallel split then adds the bias once, after the reduction."""
    (user,) = linear.users if len(linear.users) == 1 else (None,)
    if user is None or user.target is not aten.add.Tensor or user.kwargs:
        return
    bias = next((a for a in user.args if a is not linear), None)
    val = bias.meta.get("val") if isinstance(bias, fx.Node) else None
    width = linear.meta["val"].shape[-1]
    if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and isinstance(val, torch.Tensor)):
        return
    if (
        val.dim() != 1
        or val.shape[0] != width
        or user.meta["val"].shape != linear.meta["val"].shape
    ):
        return
    linear.args = (*linear.args, bias)
    user.replace_all_uses_with(linear)
    gm.graph.erase_node(user)


def _is_2d_transpose(node: fx.Node) -> bool:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return False
    args: Any = node.args  # the op's own signature: permute(x, dims), transpose(x, a, b)
    if node.target is aten.permute.default:
        return [d % 2 for d in args[1]] == [1, 0]
    if node.target is aten.transpose.int:
        return {d % 2 for d in args[1:3]} == {0, 1}
    return True


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
