"""Hardware descriptions: what a cluster computes, stores and communicates, as plain data.

A `ClusterSpec` holds the devices (peak FLOP/s per dtype, memory, memory bandwidth) and, per
collective kind, a latency and a *bus* bandwidth inside a node and across nodes (nccl-tests'
convention: the time of a collective of `size` bytes on n devices is
`latency + size * factor(n) / bus_bandwidth`, so one bandwidth per link describes every kind;
see `communication.py`). Bandwidths may be given per group size where they differ.

Presets come from vendor figures, each citing its source; `local` is what the profiler
measured on this machine. From the command line: `a100-80gb-sxm:nodes=8` or a JSON file.
Pure data: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from galvatron_fx.cost_models.efficiency import KernelEfficiency
from galvatron_fx.jsonio import fields_of, read_json

__all__ = [
    "COLLECTIVE_KINDS",
    "PRESETS",
    "ClusterSpec",
    "CollectiveKindName",
    "Link",
    "load_cluster",
]

CollectiveKindName = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"]
COLLECTIVE_KINDS: tuple[str, ...] = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "p2p",
)
GB = 1e9


@dataclass(frozen=True)
class Link:
    """One collective kind's alpha-beta parameters in one scope (and group size)."""

    kind: str
    """A collective kind from `COLLECTIVE_KINDS`."""
    scope: Literal["intra", "inter"]
    """Inside one node, or spanning nodes."""
    latency_s: float
    bus_bandwidth_bytes_per_s: float
    group_size: int = 0
    """The group size these figures were measured for; 0: any size without its own entry."""


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: int
    devices_per_node: int
    peak_flops: Mapping[str, float]
    """Dense peak FLOP/s per dtype (`fp32`, `tf32`, `bf16`, `fp16`)."""
    memory_bytes: int
    """Memory of one device."""
    memory_bandwidth_bytes_per_s: float
    links: tuple[Link, ...]
    overlap: float = 1.0
    """Of an overlappable collective's time that fits under the compute beside it, the
    fraction really hidden (0: none; the profiler measures it on `local`)."""
    op_overhead_s: float = 0.0
    """Fixed cost of launching one op (kernel launch, or Python dispatch on CPU ranks)."""
    source: str = ""
    """Where the figures come from."""
    efficiency: KernelEfficiency = field(default_factory=KernelEfficiency)
    """Achievable fractions of the peaks per kernel class (`efficiency.py`)."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node", "memory_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClusterSpec {self.name!r}: {name} must be >= 1")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"ClusterSpec {self.name!r}: overlap must be in [0, 1]")
        for link in self.links:
            if link.kind not in COLLECTIVE_KINDS:
                raise ValueError(
                    f"ClusterSpec {self.name!r}: unknown collective kind {link.kind!r} "
                    f"(known: {', '.join(COLLECTIVE_KINDS)})"
                )

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def link(self, kind: str, group_size: int, spans_nodes: bool) -> Link:
        """The figures for `kind` on a group of `group_size` devices: the entry for that size
        if measured, else the scope's default; an all-to-all or p2p without figures falls
        back to the all-gather link (same bus factor)."""
        scope = "inter" if spans_nodes else "intra"
        for want_kind in (kind, "all_gather"):
            found = [lk for lk in self.links if lk.kind == want_kind and lk.scope == scope]
            exact = [lk for lk in found if lk.group_size == group_size]
            default = [lk for lk in found if lk.group_size == 0]
            if exact or default:
                return (exact or default)[0]
        raise ValueError(f"cluster {self.name!r} has no {scope}-node figures for {kind}")

    @property
    def gloo(self) -> bool:
        """The profiled local cluster: CPU ranks on gloo, where the runtime waits for ZeRO-3's
        collectives at once (`runtime.collectives._overlapped`), so nothing hides them."""
        return self.name == "local"

    def with_nodes(self, nodes: int) -> ClusterSpec:
        return replace(self, nodes=nodes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak_flops"] = dict(self.peak_flops)
        data["links"] = [asdict(lk) for lk in self.links]
        data["efficiency"] = asdict(self.efficiency)
        return data

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically: a crash leaves the previous file whole."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def from_json(cls, data: Any, *, source: str = "cluster") -> ClusterSpec:
        """Checked field by field: a ValueError names the field path (`links[3].latency_s`)."""
        return cls(**fields_of(cls, data, source))


def _links(
    intra_gbps: float, inter_gbps: float, intra_lat_s: float, inter_lat_s: float
) -> tuple[Link, ...]:
    """Every kind with one bus bandwidth per scope (GB/s)."""
    scopes: tuple[tuple[Literal["intra", "inter"], float, float], ...] = (
        ("intra", intra_lat_s, intra_gbps),
        ("inter", inter_lat_s, inter_gbps),
    )
    return tuple(
        Link(kind, scope, lat, bw * GB) for kind in COLLECTIVE_KINDS for scope, lat, bw in scopes
    )


KERNEL_FLOOR_S = 4e-6
"""Shortest time of one GPU kernel: launch latency plus ramp-up and tail, a few microseconds
(NVIDIA CUDA C++ Best Practices Guide, "kernel launch overhead"; the per-op floor torch's
profiler shows for tiny elementwise kernels on A100 and H100)."""

A100_EFFICIENCY = KernelEfficiency(
    gemm=268 / 312,
    attention_fwd=0.70,
    attention_bwd=0.55,
    memory=0.85,
    kernel_floor_s=KERNEL_FLOOR_S,
    tile=128,
    sms=108,
    source="GEMM: stas00/ml-engineering 'maximum achievable matmul FLOPS' (A100 SXM: 268 of "
    "312 TFLOP/s bf16); attention: FlashAttention-2 (Dao 2023), 50-73% of peak on A100, "
    "its backward below its forward; memory-bound kernels 80-90% of HBM bandwidth; 108 SMs, "
    "128 x 128 output tiles (NVIDIA Matrix Multiplication Background guide)",
)
H100_EFFICIENCY = KernelEfficiency(
    gemm=792 / 989,
    attention_fwd=0.35,
    attention_bwd=0.30,
    memory=0.85,
    kernel_floor_s=KERNEL_FLOOR_S,
    tile=128,
    sms=132,
    source="GEMM: stas00/ml-engineering 'maximum achievable matmul FLOPS' (H100 SXM: ~792 of "
    "989 TFLOP/s bf16); attention: PyTorch's SDPA runs FlashAttention-2 kernels, 'only 35% "
    "utilization on H100' (FlashAttention-3, Shah et al. 2024), backward lower; "
    "memory-bound kernels 80-90% of HBM bandwidth; 132 SMs, 128 x 128 output tiles",
)

PRESETS: dict[str, ClusterSpec] = {
    "a100-80gb-sxm": ClusterSpec(
        "a100-80gb-sxm",
        nodes=1,
        devices_per_node=8,
        peak_flops={"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
        memory_bytes=80 * 2**30,
        memory_bandwidth_bytes_per_s=2039 * GB,
        # NVLink 3 through NVSwitch: 300 GB/s per direction per GPU; nccl-tests all-reduce
        # bus bandwidth on DGX A100 reaches ~230 GB/s. 8 x 200 Gb/s HDR InfiniBand per node:
        # 25 GB/s per GPU, ~23 GB/s bus bandwidth across nodes.
        links=_links(230, 23, 10e-6, 20e-6),
        source="NVIDIA A100 datasheet (2021); NVIDIA DGX A100 system architecture "
        "whitepaper; nccl-tests PERFORMANCE.md (bus bandwidth)",
        efficiency=A100_EFFICIENCY,
    ),
    "h100-80gb-sxm": ClusterSpec(
        "h100-80gb-sxm",
        nodes=1,
        devices_per_node=8,
        peak_flops={"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
        memory_bytes=80 * 2**30,
        memory_bandwidth_bytes_per_s=3350 * GB,
        # NVLink 4: 450 GB/s per direction per GPU, ~360 GB/s all-reduce bus bandwidth in
        # nccl-tests on DGX H100; 8 x 400 Gb/s NDR InfiniBand: 50 GB/s per GPU, ~45 GB/s.
        links=_links(360, 45, 8e-6, 15e-6),
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM5, 2023); NVIDIA DGX H100 user "
        "guide; nccl-tests PERFORMANCE.md",
        efficiency=H100_EFFICIENCY,
    ),
    "rtx-titan-24gb-pcie": ClusterSpec(
        "rtx-titan-24gb-pcie",
        nodes=1,
        devices_per_node=8,
        peak_flops={"fp32": 16.3e12, "fp16": 130e12, "bf16": 16.3e12},
        memory_bytes=24 * 2**30,
        memory_bandwidth_bytes_per_s=672 * GB,
        # PCIe 3.0 x16: 15.75 GB/s per direction, ~10 GB/s all-reduce bus bandwidth through
        # the host's PCIe switches; 100 Gb/s Ethernet across nodes (~10 GB/s).
        links=_links(10, 10, 15e-6, 30e-6),
        source="NVIDIA TITAN RTX datasheet (2018); PCI-SIG PCIe 3.0 specification; the "
        "Galvatron paper's testbed (8 x TITAN RTX on PCIe 3.0 per node)",
        # no published matmul or attention benchmark for this card: the A100's fractions
        # (same generation of tensor-core GEMM libraries), its 72 SMs
        efficiency=replace(A100_EFFICIENCY, sms=72, source="A100's fractions, 72 SMs"),
    ),
}
"""Vendor presets, one node each: scale with `a100-80gb-sxm:nodes=N`."""

PRESETS["h200-141gb"] = replace(
    PRESETS["h100-80gb-sxm"],
    name="h200-141gb",
    memory_bytes=141 * 10**9,
    memory_bandwidth_bytes_per_s=4800 * GB,
    source="NVIDIA H200 Tensor Core GPU datasheet (SXM, 2024): H100 compute, 141 GB "
    "HBM3e at 4.8 TB/s; interconnect as HGX H100 (NVLink 4, 8 x 400 Gb/s)",
)
POWER_CAPPED_THROUGHPUT = 0.65
"""Sustained tensor-core throughput of an H100 held at 500 W, as a fraction of what the
700 W SXM part sustains (GEMMs and attention slow with the clock; memory-bound kernels do
not). No datasheet gives it; calibrated on the one published run on such parts whose
configuration this project runs exactly - torchtitan's Llama 3.1 70B, FSDP 32 x TP 8,
full recomputation, torch.compile, 597 tokens/s/GPU (asyncTP_llama3_h100_2025-06) - and
held out on torchtitan's 8B rows (eager and compiled, 8 and 128 GPUs, FSDP and 2D):
`bench/calibration.py`."""

PRESETS["h100-96gb-500w"] = replace(
    PRESETS["h100-80gb-sxm"],
    name="h100-96gb-500w",
    memory_bytes=96 * 2**30,
    memory_bandwidth_bytes_per_s=2400 * GB,
    source="pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md (Grand Teton: "
    "8 H100 per host fully connected by NVLink, 96 GB HBM2e at 2.4 TB/s, 500 W limit, "
    "400 Gb/s RDMA per GPU); peak FLOP/s: the same GH100 as the SXM5 (torchtitan's MFU "
    "uses it), throughput under the power limit in `efficiency`",
    efficiency=replace(
        H100_EFFICIENCY.scaled(POWER_CAPPED_THROUGHPUT),
        source=H100_EFFICIENCY.source + f"; GEMMs and attention x {POWER_CAPPED_THROUGHPUT} "
        "under a 500 W limit (POWER_CAPPED_THROUGHPUT: calibrated, see bench/calibration.py)",
    ),
)


def load_cluster(text: str, *, local_profile: str | Path | None = None) -> ClusterSpec:
    """A preset (`name` or `name:nodes=N,devices_per_node=D,overlap=F`), `local` (the
    profiler's result), or a JSON file path."""
    name, _, options = text.partition(":")
    if name == "local":
        path = Path(local_profile or Path.home() / ".cache" / "galvatron_fx" / "local.json")
        if not path.exists():
            raise ValueError(f"cluster 'local': no profile at {path}; run `galvatron-fx profile`")
        spec = ClusterSpec.from_json(read_json(path), source=str(path))
    elif name in PRESETS:
        spec = PRESETS[name]
    elif Path(text).suffix == ".json" or Path(text).exists():
        path = Path(text)
        if not path.exists():
            raise ValueError(f"cluster file {path} does not exist")
        return ClusterSpec.from_json(read_json(path), source=str(path))
    else:
        known = ", ".join([*PRESETS, "local"])
        raise ValueError(f"unknown cluster {name!r}: give one of {known}, or a JSON file")
    return _with_options(spec, options, text)


def _with_options(spec: ClusterSpec, options: str, text: str) -> ClusterSpec:
    changes: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key in ("nodes", "devices_per_node"):
            changes[key] = _number(int, key, value, text)
        elif key == "overlap":
            changes[key] = _number(float, key, value, text)
        else:
            raise ValueError(
                f"cluster {text!r}: unknown option {key!r} (nodes, devices_per_node, overlap)"
            )
    return replace(spec, **changes)


def _number(kind: type, key: str, value: str, text: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"cluster {text!r}: {key}={value!r} is not a number") from None
