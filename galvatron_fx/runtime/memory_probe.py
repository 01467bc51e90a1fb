"""Per-rank peak memory of one training step, measured with the PyTorch profiler.

The CPU allocator keeps no peak counter, but `torch.profiler` with `profile_memory=True`
reports allocations and frees as `[memory]` events carrying the allocator's running total
`Total Allocated`. That total only counts blocks allocated while it is on (older blocks are
invisible, and so are their frees), so `measure_step_memory` runs:

1. `warmup_steps` steps unprofiled (optimizer states, buckets and shards come to exist);
2. step A under the profiler: what one step allocates and leaves behind (gradients, ZeRO
   shard gradients) is now counted, so its frees during the next step are counted too;
3. `state_storages(compiled)`: the unique storages the program keeps between steps;
4. step B under the profiler, marked with `record_function`. At every event t of B:

    alive(t) = (state bytes allocated before A) + Total Allocated(t) - Total Allocated at A's start

   and `peak_bytes` is the largest alive(t).

During both steps c10's `caffe2_report_cpu_memory_usage` flag is on, so the running total
also counts blocks allocated or freed on threads the profiler does not follow (gloo frees
an async collective's buffers on its worker thread, sometimes after the step has ended).

Guarantees and limits:
- `state_bytes` counts each storage once (tied or viewed tensors share one), walked from the
  compiled model: its module's parameters, buffers and tensor attributes, their `.grad`, the
  optimizer's states, the gradient sync's buckets and shards, the ZeRO-3 caches. Tensors the
  caller holds outside it (the original model, the inputs) are not counted.
- The peak is exact to the byte for what goes through PyTorch's CPU allocator (see
  tests/test_memory_probe.py); it includes the collectives' staging copies that gloo makes
  with PyTorch tensors. Not seen: memory gloo or NCCL allocate themselves, allocator
  fragmentation, and the peak between two events of a thread the profiler does not follow.
- `unowned_bytes` (step A's blocks alive at B's start that are not state) and `net_bytes`
  (B's allocations minus its frees) are 0 for a steady program, up to a collective's buffer
  that gloo frees on its own thread just before or after a step boundary.
- `live_at_peak` lists B's blocks without a free event before the peak (a block freed on an
  unfollowed thread stays listed until its address is reused).
- Phases come from wrapping the program's `forward_loss`, `sync.finish`, `sync.step` and
  `sync.zero_grad` on the instance for step B (restored afterwards); backward is the time
  between the end of the forward and the start of `finish`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.profiler import ProfilerActivity, profile, record_function

from galvatron_fx.runtime import collectives as C

__all__ = ["LiveAllocation", "StepMemory", "measure_step_memory", "state_storages"]

_STEP = "gfx_probe::step"
_PREFIX = "gfx_probe::"
_WRAPPED = {  # phase -> (object path on the compiled model, method name)
    "zero_grad": ("sync", "zero_grad"),
    "forward": ("", "forward_loss"),
    "grad_sync": ("sync", "finish"),
    "optimizer": ("sync", "step"),
}


@dataclass(frozen=True)
class LiveAllocation:
    """Blocks allocated during the measured step and alive at its peak, grouped by origin."""

    op: str
    """The outermost and innermost profiled ops around the allocation (`outer > inner`)."""
    phase: str
    bytes: int
    count: int


@dataclass(frozen=True)
class StepMemory:
    """One rank's memory over one training step."""

    state_bytes: int
    """Unique storages the program keeps between steps, at the start of the step."""
    peak_bytes: int
    """Most bytes alive at once during the step: the state plus the peak of what it allocated."""
    peak_phase: str
    """Where the peak happens: zero_grad, forward, backward, grad_sync, optimizer or other."""
    peak_time_fraction: float
    """When the peak happens, as a fraction of the step's duration."""
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    """Most bytes alive at once during each phase (state included)."""
    net_bytes: int = 0
    """Allocated minus freed over the step (0 in a steady state)."""
    unowned_bytes: int = 0
    """Alive at the step's start, allocated by the previous step, not in the state."""
    live_at_peak: tuple[LiveAllocation, ...] = ()
    """What the step had allocated and not freed at its peak, largest first."""

    @property
    def peak_activation_bytes(self) -> int:
        """The peak above the state: activations, gradients in flight, buckets, temporaries."""
        return self.peak_bytes - self.state_bytes


def measure_step_memory(
    compiled: Any, *args: Any, warmup_steps: int = 1, top: int = 12, **kwargs: Any
) -> StepMemory:
    """Peak memory of `compiled.train_step(*args, **kwargs)` on this rank (runs
    `warmup_steps + 2` steps: they train the model)."""
    if warmup_steps < 1:
        raise ValueError("warmup_steps must be >= 1: the first step creates optimizer states")
    for _ in range(warmup_steps):
        compiled.train_step(*args, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        with (
            _all_threads(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            compiled.train_step(*args, **kwargs)  # step A: its leftovers become tracked
            state = state_storages(compiled)
            with _phases(compiled), record_function(_STEP):
                compiled.train_step(*args, **kwargs)
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return _analyse(events, state, top)


# -- frees on other threads ---------------------------------------------------------------


@contextlib.contextmanager
def _all_threads() -> Iterator[None]:
    """Make the CPU allocator's running total count blocks on every thread.

    The profiler follows only the threads it was started on: a block freed on a collectives
    library's worker thread (gloo drops the last reference to an async collective's buffer
    there) would stay counted. With c10's `caffe2_report_cpu_memory_usage` flag the
    allocator keeps its size table for every thread, so `Total Allocated` is right again
    (the free itself still has no event). The flag has no Python binding: set it by symbol.
    """
    flag = _report_flag()
    old = flag.value if flag is not None else False
    if flag is not None:
        flag.value = True
    try:
        yield
    finally:
        if flag is not None:
            flag.value = old


def _report_flag() -> ctypes.c_bool | None:
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libc10.so", "libc10.dylib", "c10.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.c_bool.in_dll(
                    ctypes.CDLL(path), "FLAGS_caffe2_report_cpu_memory_usage"
                )
            except (OSError, ValueError):
                return None
    return None


# -- the state: storages reachable from the compiled program ---------------------------------


def state_storages(compiled: Any) -> dict[int, int]:
    """data_ptr -> bytes of every distinct real storage reachable from `compiled` (and the
    runtime's ZeRO-3 caches), not descending into graphs, functions or modules of code."""
    roots = [compiled, *C.zero3_buffers()]
    out: dict[int, int] = {}
    seen: set[int] = set()
    stack: list[Any] = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            _add_storage(obj, out)
            stack.append(obj.grad)
        elif isinstance(obj, nn.Module):
            stack.extend(obj._parameters.values())
            stack.extend(obj._buffers.values())
            stack.extend(obj._modules.values())
            stack.extend(v for v in vars(obj).values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, _SKIP) or callable(obj):
            continue
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return out


_SKIP = (str, bytes, int, float, bool, type, fx.Graph, fx.Node, type(os))
"""Not walked into: scalars, classes, graphs, modules of code (and any callable)."""


def _add_storage(t: torch.Tensor, out: dict[int, int]) -> None:
    if t.device.type == "meta" or _is_fake(t):
        return
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    if ptr:
        out[ptr] = storage.nbytes()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# -- phases ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _phases(compiled: Any) -> Iterator[None]:
    """Wrap the step's phases in `record_function` ranges, on the instances only."""
    patched: list[tuple[Any, str]] = []
    try:
        for phase, (owner_name, method) in _WRAPPED.items():
            owner = getattr(compiled, owner_name, None) if owner_name else compiled
            if owner is None or not callable(getattr(owner, method, None)):
                continue
            setattr(owner, method, _marked(getattr(owner, method), _PREFIX + phase))
            patched.append((owner, method))
        yield
    finally:
        for owner, method in patched:
            delattr(owner, method)  # the class's method shows through again


def _marked(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return run


# -- the trace -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Alloc:
    ts_us: float
    addr: int
    nbytes: int
    total: int
    tid: Any


def _analyse(events: list[dict[str, Any]], state: dict[int, int], top: int) -> StepMemory:
    """Bytes alive at t in B = the state's blocks older than A + Total Allocated(t) - Total
    Allocated at A's start (the flag makes that total count every thread's blocks)."""
    spans = {e["name"]: e for e in events if e.get("ph") == "X" and e["name"].startswith(_PREFIX)}
    step = spans[_STEP]
    start, end = step["ts"], step["ts"] + step["dur"]
    allocs = sorted(
        (
            _Alloc(
                e["ts"],
                e["args"]["Addr"],
                e["args"]["Bytes"],
                e["args"]["Total Allocated"],
                e["tid"],
            )
            for e in events
            if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
        ),
        key=lambda a: a.ts_us,
    )
    before = [a for a in allocs if a.ts_us < start]
    inside = [a for a in allocs if start <= a.ts_us <= end]
    state_bytes = sum(state.values())
    if not before or not inside:
        raise RuntimeError("the profiler reported no CPU allocations: is profile_memory supported?")
    origin = before[0].total - before[0].nbytes  # Total Allocated at A's start
    from_a = sum(state[addr] for addr in _alive(before) if addr in state)
    older = state_bytes - from_a  # parameters, optimizer states: allocated before A

    def live(a: _Alloc) -> int:
        return older + a.total - origin

    phase_of = _phase_classifier(spans)
    peak_i = max(range(len(inside)), key=lambda i: inside[i].total)
    phase_peak: dict[str, int] = {}
    for a in inside:
        phase = phase_of(a.ts_us)
        phase_peak[phase] = max(phase_peak.get(phase, 0), live(a))
    peak = inside[peak_i]
    at_start = live(inside[0]) - inside[0].nbytes
    return StepMemory(
        state_bytes=state_bytes,
        peak_bytes=live(peak),
        peak_phase=phase_of(peak.ts_us),
        peak_time_fraction=(peak.ts_us - start) / max(end - start, 1e-9),
        phase_peak_bytes=phase_peak,
        net_bytes=live(inside[-1]) - at_start,
        unowned_bytes=at_start - state_bytes,
        live_at_peak=_live_at(inside[: peak_i + 1], events, phase_of, top),
    )


def _alive(allocs: list[_Alloc]) -> dict[int, int]:
    """addr -> bytes of the blocks these events allocated and did not free."""
    live: dict[int, int] = {}
    for a in allocs:
        if a.nbytes > 0:
            live[a.addr] = a.nbytes
        else:
            live.pop(a.addr, None)
    return live


def _phase_classifier(spans: dict[str, dict[str, Any]]) -> Callable[[float], str]:
    ranges = [
        (name[len(_PREFIX) :], e["ts"], e["ts"] + e["dur"])
        for name, e in spans.items()
        if name != _STEP
    ]
    fwd = spans.get(_PREFIX + "forward")
    sync = spans.get(_PREFIX + "grad_sync")
    bwd = (fwd["ts"] + fwd["dur"], sync["ts"]) if fwd and sync else None

    def classify(ts: float) -> str:
        for name, a, b in ranges:
            if a <= ts <= b:
                return name
        if bwd is not None and bwd[0] < ts < bwd[1]:
            return "backward"
        return "other"

    return classify


def _live_at(
    allocs: list[_Alloc], events: list[dict[str, Any]], phase_of: Callable[[float], str], top: int
) -> tuple[LiveAllocation, ...]:
    """The blocks allocated in `allocs` and alive after the last of them, grouped by origin."""
    live: dict[int, _Alloc] = {}
    for a in allocs:
        if a.nbytes > 0:
            live[a.addr] = a
        else:
            live.pop(a.addr, None)
    kept = list(live.values())
    origin = _origins(kept, events)
    groups: dict[tuple[str, str], list[int]] = {}
    for a in kept:
        groups.setdefault((origin[id(a)], phase_of(a.ts_us)), []).append(a.nbytes)
    rows = [LiveAllocation(op, ph, sum(b), len(b)) for (op, ph), b in groups.items()]
    return tuple(sorted(rows, key=lambda r: -r.bytes)[:top])


def _origins(allocs: list[_Alloc], events: list[dict[str, Any]]) -> dict[int, str]:
    """id(alloc) -> `outer > inner`: the profiled ops on its thread enclosing it."""
    ops = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
        key=lambda e: (e["ts"], -e["dur"]),
    )
    out: dict[int, str] = {}
    stacks: dict[Any, list[dict[str, Any]]] = {}
    i = 0
    for a in sorted(allocs, key=lambda a: a.ts_us):
        while i < len(ops) and ops[i]["ts"] <= a.ts_us:
            op = ops[i]
            stack = stacks.setdefault(op["tid"], [])
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < op["ts"]:
                stack.pop()
            stack.append(op)
            i += 1
        stack = stacks.get(a.tid, [])
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < a.ts_us:
            stack.pop()
        inner = [s for s in stack if s["ts"] + s["dur"] >= a.ts_us]
        if not inner:
            out[id(a)] = "(python)"
        elif inner[0] is inner[-1]:
            out[id(a)] = inner[0]["name"]
        else:
            out[id(a)] = f"{inner[0]['name']} > {inner[-1]['name']}"
    return out
