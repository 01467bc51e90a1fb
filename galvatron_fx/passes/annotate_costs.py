"""Costs (analytic part): FLOPs, bytes, parameters and saved activations of every node.

Reads: `val` and `gfx_layer` (the unit and its fingerprint).
Writes: `gfx_cost` (a `NodeCost`) on every node.
Guarantees:
- FLOPs come from the formulas registered in `torch.utils.flop_counter`, observed while each
  unit runs forward and backward on fake CPU tensors; backward FLOPs, and the bytes and ops
  (kernels) of the backward, are attributed to the fx node whose autograd nodes ran them;
- saved-activation bytes are what autograd really saves (saved-tensor hooks during that fake
  forward), each storage counted once, parameters and buffers excluded;
- a parameter's elements are counted once, on the first `get_attr` of it (tied weights), so
  `params` sums to `sum(p.numel() for p in model.parameters())`;
- units with equal fingerprints (and equal requires-grad inputs) are run once and share costs.

Nothing is allocated: everything runs under `FakeTensorMode`, also for meta-device models.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from galvatron_fx.meta import COST, LAYER, NodeCost
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.unit_graph.kernels import launches_kernel
from galvatron_fx.unit_graph.units import unit_nodes

__all__ = ["annotate_costs", "requires_grad_nodes"]


# FlopCounterMode's custom_mapping hands formulas shapes, not tensors.
def _cpu_sdpa_fwd(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    return int(flop_counter.sdpa_flop_count(q, k, v))


def _cpu_sdpa_bwd(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    return int(flop_counter.sdpa_backward_flop_count(grad_out, q, k, v))


# torch registers attention formulas for the CUDA kernels only; on CPU, sdpa runs the
# `_for_cpu` flash kernels, which would count as zero. Same formulas, bound to the CPU kernels.
_CPU_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_bwd,
}


@graph_pass(reads=("val", LAYER.name), writes=(COST.name,))
def annotate_costs(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Put a `NodeCost` on every node; run each distinct unit once on fake tensors."""
    needs_grad = requires_grad_nodes(gm)
    params = _param_counts(gm)
    cache: dict[tuple[object, ...], list[_Observed]] = {}
    counted: set[fx.Node] = set()  # producers whose saved storage is already counted
    for nodes in unit_nodes(gm).values():
        # the fingerprint leaves out `contiguous` (a meta capture keeps some a CPU one does
        # not), so the node count tells such units apart
        key = (LAYER.get(nodes[0]).fingerprint, len(nodes), *_boundary_grads(nodes, needs_grad))
        if key not in cache:
            cache[key] = _UnitRun(gm, nodes, needs_grad).run()
        externals = _external_inputs(nodes)
        for node, obs in zip(nodes, cache[key], strict=True):
            numel, nbytes = params.get(node, (0, 0))
            saved = _saved_once(obs, nodes, externals, counted)
            cost = NodeCost(
                fwd_flops=obs.fwd_flops,
                bwd_flops=obs.bwd_flops,
                fwd_bytes=_io_bytes(node),
                bwd_bytes=obs.bwd_bytes,
                bwd_kernels=obs.bwd_kernels,
                param_bytes=nbytes,
                params=numel,
                saved_bytes=sum(b for _, b, _ in saved),
                saved=saved,
            )
            COST.set(node, cost)
    return gm


def _saved_once(
    obs: _Observed, nodes: list[fx.Node], externals: list[fx.Node], counted: set[fx.Node]
) -> tuple[tuple[str, int, bool], ...]:
    """What one node saves, skipping storages another unit already saved: layers that
    all save one shared tensor (rotary cos/sin, a mask) hold it once in a real run."""
    out = []
    for producer, nbytes, shared in obs.saves:
        name = ""
        if producer is not None:
            kind, i = producer
            src = externals[i] if kind == "ext" else nodes[i]
            if src in counted:
                continue
            counted.add(src)
            name = src.name
        out.append((name, nbytes, shared))
    return tuple(out)


class _Observed:
    __slots__ = ("bwd_bytes", "bwd_flops", "bwd_kernels", "fwd_flops", "saves")

    def __init__(self) -> None:
        self.fwd_flops = 0
        self.bwd_flops = 0
        self.bwd_bytes = 0
        self.bwd_kernels = 0
        self.saves: list[tuple[tuple[str, int] | None, int, bool]] = []
        """(producer, bytes, saved by another node too) per storage saved: producer is
        ("ext", i) for the unit's i-th external input, ("int", j) for its j-th node, None
        for op-internal tensors."""


def requires_grad_nodes(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Which nodes carry a gradient: export's `val`s all say False, so propagate from the
    trainable parameters through differentiable (floating-point) values."""
    out: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attr = _attr(gm, node)
            out[node] = isinstance(attr, torch.nn.Parameter) and attr.requires_grad
        elif node.op == "placeholder":
            out[node] = False
        else:
            from_inputs = any(out.get(a, False) for a in node.all_input_nodes)
            out[node] = from_inputs and _is_float(node.meta.get("val"))
    return out


def _is_float(val: object) -> bool:
    if isinstance(val, torch.Tensor):
        return val.is_floating_point() or val.is_complex()
    if isinstance(val, (list, tuple)):
        return any(_is_float(v) for v in val)
    return False


def _attr(gm: fx.GraphModule, node: fx.Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _param_counts(gm: fx.GraphModule) -> dict[fx.Node, tuple[int, int]]:
    """(elements, bytes) on the first `get_attr` of each distinct parameter."""
    seen: set[int] = set()
    out: dict[fx.Node, tuple[int, int]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        attr = _attr(gm, node)
        if isinstance(attr, torch.nn.Parameter) and id(attr) not in seen:
            seen.add(id(attr))
            out[node] = (attr.numel(), attr.numel() * attr.element_size())
    return out


def _external_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """Nodes outside the unit that it reads, in order of first use."""
    inside = set(nodes)
    return list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))


def _boundary_grads(nodes: list[fx.Node], needs_grad: dict[fx.Node, bool]) -> list[bool]:
    outside = _external_inputs(nodes)
    return [needs_grad[a] for a in outside] + [needs_grad[n] for n in nodes if n.op == "get_attr"]


def _io_bytes(node: fx.Node) -> int:
    """Bytes a node reads and writes; views and checks move nothing."""
    if not launches_kernel(node):
        return 0
    tensors = [a.meta.get("val") for a in node.all_input_nodes] + [node.meta.get("val")]
    return sum(_nbytes(v) for v in tensors)


def _nbytes(val: object) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_nbytes(v) for v in val)
    return 0


class _UnitRun:
    """Runs one unit forward and backward on fake CPU tensors and records, per fx node, the
    FLOPs of its forward and backward and the activation bytes autograd saves."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node], needs_grad: dict) -> None:
        self.gm, self.nodes, self.needs_grad = gm, nodes, needs_grad
        self.obs = {n: _Observed() for n in nodes}
        self.counter = FlopCounterMode(display=False, custom_mapping=_CPU_FORMULAS)
        self.traffic = _TrafficCounter()
        self.current: fx.Node | None = None
        self.seen_storages: dict[int, object] = {}  # kept alive so ids are not reused
        self.saved: dict[fx.Node, list[tuple[int, int]]] = {n: [] for n in nodes}
        self.producer: dict[int, tuple[str, int]] = {}
        self.savers: dict[int, set[fx.Node]] = defaultdict(set)
        self.grad_owner: dict[object, fx.Node] = {}
        self.bwd_mark: tuple[fx.Node | None, tuple[int, int, int]] = (None, (0, 0, 0))

    def run(self) -> list[_Observed]:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            self.mode = mode
            env: dict[fx.Node, Any] = {}
            for i, node in enumerate(_external_inputs(self.nodes)):
                env[node] = self._leaf(node)
                self._produced(env[node], ("ext", i))
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            with self.counter, self.traffic, hooks:
                for j, node in enumerate(self.nodes):
                    env[node] = self._forward(node, env)
                    self._produced(env[node], ("int", j))
                self._backward(env)
        for node in self.nodes:
            self.obs[node].saves = [
                (self.producer.get(s), b, len(self.savers[s]) > 1) for s, b in self.saved[node]
            ]
        return [self.obs[n] for n in self.nodes]

    def _produced(self, value: Any, key: tuple[str, int]) -> None:
        for t in _tensors(value):
            self.producer.setdefault(_storage_id(t), key)

    def _leaf(self, node: fx.Node) -> Any:
        if node.op == "get_attr" and isinstance(_attr(self.gm, node), torch.nn.Module):
            return _cpu_copy(_attr(self.gm, node))
        leaf = _fake_like(node.meta.get("val"), self.needs_grad[node])
        if node.op == "get_attr":
            for t in _tensors(leaf):
                self.seen_storages[_storage_id(t)] = t  # parameters are not activations
        return leaf

    def _forward(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return self._leaf(node)
        if node.op != "call_function":
            return None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        args, kwargs = fx.node.map_aggregate((args, kwargs), _on_cpu)
        self.current = node
        before = self.counter.get_total_flops()
        out = node.target(*args, **kwargs)  # type: ignore[operator]
        self.obs[node].fwd_flops = self.counter.get_total_flops() - before
        self.current = None
        self._own_grad_fns(node, out)
        return out

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        sid = _storage_id(t)
        if self.current is not None:
            self.savers[sid].add(self.current)
        if sid not in self.seen_storages and self.current is not None:
            self.seen_storages[sid] = t
            self.saved[self.current].append((sid, t.untyped_storage().nbytes()))
        return t

    def _own_grad_fns(self, node: fx.Node, out: Any) -> None:
        stack: list[Any] = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        while stack:
            fn = stack.pop()
            if fn is None or fn in self.grad_owner:
                continue
            self.grad_owner[fn] = node
            fn.register_prehook(partial(self._mark_backward, node))
            stack.extend(nxt for nxt, _ in fn.next_functions)

    def _mark_backward(self, node: fx.Node, grad_outputs: Any) -> None:
        prev, since = self.bwd_mark
        now = (self.counter.get_total_flops(), self.traffic.bytes, self.traffic.kernels)
        if prev is not None:
            obs = self.obs[prev]
            obs.bwd_flops += now[0] - since[0]
            obs.bwd_bytes += now[1] - since[1]
            obs.bwd_kernels += now[2] - since[2]
        self.bwd_mark = (node, now)

    def _backward(self, env: dict[fx.Node, Any]) -> None:
        inside = set(self.nodes)
        outs = [  # what leaves the unit: read by another unit, or the graph's output
            t
            for n in self.nodes
            if any(u not in inside or u.op == "output" for u in n.users) or not n.users
            for t in _tensors(env.get(n))
            if t.requires_grad
        ]
        if not outs:
            return
        now = (self.counter.get_total_flops(), self.traffic.bytes, self.traffic.kernels)
        self.bwd_mark = (None, now)
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        self._mark_backward(None, None)  # type: ignore[arg-type]


class _TrafficCounter(TorchDispatchMode):
    """Bytes read and written, and kernels launched, by the ATen ops that run: every op
    but views (which move nothing) and those that make no tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.kernels = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False) and _tensors(out):
            self.kernels += 1
            moved = [
                *_tensors(list(args)),
                *_tensors(list((kwargs or {}).values())),
                *_tensors(out),
            ]
            self.bytes += sum(t.numel() * t.element_size() for t in moved)
        return out


def _fake_like(val: Any, requires_grad: bool) -> Any:
    """A fresh fake CPU tensor shaped like `val` (a FakeTensor of export's own mode, on CPU or
    meta): CPU so kernel choice, and thus what autograd saves, matches a real CPU run."""
    if isinstance(val, torch.Tensor):
        t = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="cpu")
        return t.requires_grad_(requires_grad and _is_float(val))
    if isinstance(val, (list, tuple)):
        return type(val)(_fake_like(v, requires_grad) for v in val)
    return val


def _on_cpu(arg: Any) -> Any:
    """Devices baked into the graph (`arange(..., device=meta)`) follow the fake CPU run."""
    return torch.device("cpu") if isinstance(arg, torch.device) else arg


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A subgraph of a higher-order op (e.g. a no-grad region) with its devices on CPU."""
    if not isinstance(module, fx.GraphModule):
        return module
    module = copy.deepcopy(module)
    for node in module.graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), _on_cpu)
    module.recompile()
    return module


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _storage_id(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
