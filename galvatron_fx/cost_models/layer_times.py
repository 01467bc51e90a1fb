"""Measured unit times: the table `galvatron-fx profile --model` writes and pricing reads.

One entry per unit fingerprint and strategy (`timing_key`): forward, backward, recomputation
and optimizer-step seconds of one rank's piece of the unit. Pure data: the measuring lives in
`galvatron_fx.planning.layer_profile` (it lowers and runs plans), the timing of one program in
`galvatron_fx.runtime.layer_timer`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from galvatron_fx.jsonio import fields_of, read_json
from galvatron_fx.plan import DPMode, LayerStrategy, Recompute

__all__ = [
    "DEFAULT_LAYERS",
    "LayerTime",
    "LayerTimes",
    "default_strategies",
    "load_layer_times",
    "median_time",
    "timing_key",
]

DEFAULT_LAYERS = Path.home() / ".cache" / "galvatron_fx" / "layers.json"


@dataclass(frozen=True)
class LayerTime:
    """One unit on one rank for one training step, in seconds."""

    fwd_s: float
    bwd_s: float
    """Backward without the recomputation."""
    recompute_s: float
    step_s: float
    """Optimizer step."""

    @property
    def time_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.recompute_s + self.step_s

    def scaled(self, step: float) -> LayerTime:
        """The same unit with its optimizer step scaled (ZeRO-1/2 step 1/dp of it)."""
        return LayerTime(self.fwd_s, self.bwd_s, self.recompute_s, self.step_s * step)


def median_time(times: Iterable[LayerTime]) -> LayerTime:
    """Field by field."""
    ts = list(times)
    return LayerTime(
        *(statistics.median(getattr(t, f) for t in ts) for f in LayerTime.__dataclass_fields__)
    )


def timing_key(fingerprint: str, s: LayerStrategy) -> tuple[str, float]:
    """The table key of a unit under `s`, and the factor on the measured step time.

    ZeRO-1 and -2 compute what plain DP computes and step 1/dp of the elements, so they share
    its entry; ZeRO-3 gathers and frees parameters around each use and has its own."""
    step = 1.0
    if s.dp_mode in (DPMode.ZERO1, DPMode.ZERO2):
        s, step = replace(s, dp_mode=DPMode.ALLREDUCE), 1.0 / s.dp
    if s.dp == 1:
        s = replace(s, dp_mode=DPMode.ALLREDUCE)
    return f"{fingerprint}/{s.short()}", step


@dataclass
class LayerTimes:
    """Measured unit times, by `timing_key`."""

    concurrency: int
    """Ranks that computed at once on this machine while measuring."""
    entries: dict[str, LayerTime] = field(default_factory=dict)
    source: str = ""

    def lookup(self, fingerprint: str, s: LayerStrategy) -> LayerTime | None:
        key, step = timing_key(fingerprint, s)
        found = self.entries.get(key)
        return found.scaled(step) if found is not None else None

    def to_json(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "source": self.source,
            "entries": {k: asdict(v) for k, v in sorted(self.entries.items())},
        }

    @classmethod
    def from_json(cls, data: object, *, source: str = "layer timings") -> LayerTimes:
        """Checked field by field: a ValueError names the path (`entries['k'].fwd_s`)."""
        return cls(**fields_of(cls, data, source))

    def save(self, path: Path) -> None:
        """Merge into `path` (same concurrency) or replace it; written atomically."""
        merged = self
        if path.exists():
            old = load_layer_times(path)
            if old is not None and old.concurrency == self.concurrency:
                merged = LayerTimes(self.concurrency, {**old.entries, **self.entries}, self.source)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(merged.to_json(), indent=1) + "\n")
        tmp.replace(path)


def load_layer_times(path: Path) -> LayerTimes | None:
    """The table at `path`, or None when there is none."""
    if not path.exists():
        return None
    try:
        return LayerTimes.from_json(read_json(path), source=str(path))
    except ValueError as err:
        raise ValueError(f"{err}; fix it, or delete it and profile again") from None


def default_strategies(world: int) -> list[LayerStrategy]:
    """Every tp x dp split of `world` with and without sp, plain DP or ZeRO-3, and each
    recomputation: the shapes a search over `world` devices can ask about."""
    out = []
    for tp in (d for d in range(1, world + 1) if world % d == 0):
        dp = world // tp
        for sp in (False, True) if tp > 1 else (False,):
            modes = (DPMode.ALLREDUCE, DPMode.ZERO3) if dp > 1 else (DPMode.ALLREDUCE,)
            for mode in modes:
                for rc in Recompute:
                    out.append(LayerStrategy(tp=tp, sp=sp, dp=dp, dp_mode=mode, recompute=rc))
    return out
