"""Per-layer check on one device: predicted against measured forward + backward time and
activation memory of Llama-shaped layers in bf16.

The model (torchtitan's Llama 3 block, `galvatron_fx/models/llama.py`) runs forward and
backward on the device in bf16; the same shapes, captured on the meta device, are priced by
the cost model for one device of `--cluster` (a preset, or the file `galvatron-fx profile
--device cuda` wrote). Printed per shape: the step's forward + backward seconds measured
(best of `--repeats`, synchronised) and predicted (`price_plan`: every unit's forward and
backward), and the activation memory measured (peak allocated during the step over what
the parameters hold) and predicted (the units' saved activations).

    python bench/gpu_layers.py --cluster h100.json             # on cuda
    python bench/gpu_layers.py --device cpu --smoke            # tiny shapes, any machine
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

from galvatron_fx.cost_models.hardware import load_cluster
from galvatron_fx.lowering import analyze
from galvatron_fx.models.spec import parse_model_spec
from galvatron_fx.plan import LayerStrategy
from galvatron_fx.planning.price import price_plan

SHAPES = (
    (
        "8B block x2, seq 4096",
        "llama:layers=2,hidden=4096,heads=32,kv_heads=8,ffn=14336,vocab=32000",
        1,
        4096,
    ),
    (
        "8B block x2, seq 8192",
        "llama:layers=2,hidden=4096,heads=32,kv_heads=8,ffn=14336,vocab=32000",
        1,
        8192,
    ),
    (
        "70B block x1, seq 4096",
        "llama:layers=1,hidden=8192,heads=64,kv_heads=8,ffn=28672,vocab=32000",
        1,
        4096,
    ),
)
SMOKE = (("tiny", "llama:layers=2,hidden=128,heads=4,kv_heads=2,ffn=256,vocab=256", 2, 64),)


def _inputs(text: str, batch: int, seq: int, device: str) -> tuple[Any, Any, Any]:
    spec = parse_model_spec(f"{text},seq={seq}")
    model = spec.build(device).to(torch.bfloat16)
    args, kwargs = spec.example_inputs(model, batch, seq)
    return model, args, kwargs


def measure(text: str, batch: int, seq: int, device: str, repeats: int) -> tuple[float, float]:
    """(forward + backward seconds, activation bytes) of one step on `device`."""
    model, args, kwargs = _inputs(text, batch, seq, device)
    dev = torch.device(device)
    args = tuple(a.to(dev) for a in args)
    kwargs = {k: v.to(dev) for k, v in kwargs.items()}

    def step() -> None:
        model(*args, **kwargs).backward()
        model.zero_grad(set_to_none=True)

    step()
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - start)
    activations = 0.0
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        loss = model(*args, **kwargs)
        activations = torch.cuda.max_memory_allocated(dev) - base
        loss.backward()
    return best, float(activations)


def predict(text: str, batch: int, seq: int, cluster: str) -> tuple[float, float]:
    """(forward + backward seconds, saved activation bytes) the cost model gives."""
    model, args, kwargs = _inputs(text, batch, seq, "meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(model, args, kwargs)
        plan = analysis.plan(LayerStrategy(), world_size=1)
        costs = price_plan(analysis, plan, load_cluster(cluster), dtype="bf16", precision="mixed")
    return sum(c.fwd_s + c.bwd_s for c in costs), sum(c.activation_bytes for c in costs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cluster", default="h100-80gb-sxm", help="preset or measured JSON")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    opts = p.parse_args()
    print("| shape | measured s | predicted s | ratio | measured act GiB | predicted act GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, text, batch, seq in SMOKE if opts.smoke else SHAPES:
        got_s, got_bytes = measure(text, batch, seq, opts.device, opts.repeats)
        want_s, want_bytes = predict(text, batch, seq, opts.cluster)
        print(
            f"| {name} | {got_s:.4f} | {want_s:.4f} | {want_s / got_s:.2f} | "
            f"{got_bytes / 2**30:.2f} | {want_bytes / 2**30:.2f} |"
        )


if __name__ == "__main__":
    main()
