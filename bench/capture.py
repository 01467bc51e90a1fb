"""Front-end speed: capture + annotation of a Llama-2-7B-shaped model on the meta device.

Baseline measured in the same run: `torch.export.export` alone on the same model (the floor
any torch.export-based front end pays). Target: capture + layers + costs under 5 s.

    python bench/capture.py            # Llama-2-7B shape: 32 layers, hidden 4096, 6.7B params
    python bench/capture.py --smoke    # a tiny model, for the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import galvatron_fx as gfx
from galvatron_fx.models.spec import parse_model_spec

LLAMA2_7B = "hf:llama:hidden_size=4096,intermediate_size=11008,num_hidden_layers=32,num_attention_heads=32,num_key_value_heads=32,vocab_size=32000"
SMOKE = "hf:llama:hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=4,vocab_size=128"
TARGET_S = 5.0


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(spec_text: str, batch: int, seq: int, repeats: int) -> dict[str, object]:
    spec = parse_model_spec(spec_text)
    model = spec.build("meta")
    args, kwargs = spec.example_inputs(model, batch, seq)
    warnings.simplefilter("ignore")
    gfx.capture(model, args, kwargs)  # warm-up; also turns the KV cache off for the baseline
    export_s = _time(lambda: torch.export.export(model, args, kwargs, strict=False), repeats)
    passes: dict[str, list[float]] = {}

    def front_end() -> None:
        for name, t in gfx.analyze(model, args, kwargs).timings_s.items():
            passes.setdefault(name, []).append(t)

    total_s = _time(front_end, repeats)
    return {
        "model": spec_text,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "seq": seq,
        "export_only_s": statistics.median(export_s),
        "front_end_s": statistics.median(total_s),
        "per_pass_s": {k: statistics.median(v) for k, v in passes.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    opts = parser.parse_args()
    spec, repeats = (SMOKE, 1) if opts.smoke else (LLAMA2_7B, opts.repeats)
    r = run(spec, batch=1, seq=2048 if not opts.smoke else 16, repeats=repeats)
    print(f"model: {r['model']}  ({r['params'] / 1e9:.2f}B params, meta device)")
    print(f"torch.export alone (baseline):  {r['export_only_s']:.2f} s (median of {repeats})")
    print(f"capture + layers + costs:       {r['front_end_s']:.2f} s")
    print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in r["per_pass_s"].items()))  # type: ignore[union-attr]
    print(f"ratio to export alone:          {r['front_end_s'] / r['export_only_s']:.2f}x")  # type: ignore[operator]
    verdict = "met" if r["front_end_s"] < TARGET_S else "MISSED"  # type: ignore[operator]
    print(f"target < {TARGET_S:.0f} s:                   {verdict}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
