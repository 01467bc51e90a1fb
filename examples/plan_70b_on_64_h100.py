"""Plan Llama-2-70B training on 64 H100s (8 nodes of 8) from a laptop: the model is built on
the meta device (no memory, no GPU), captured at the global batch, and searched.

    python examples/plan_70b_on_64_h100.py [--global-batch 256] [--memory-gb 80] [--json F]

Prints the plan (pipeline, per-layer strategies), the predicted step time, throughput and
per-stage memory, and the baselines (Megatron-style 3D, ZeRO-3, ...) priced by the same cost
model. The same as `galvatron-fx plan hf:llama:... --cluster h100-80gb-sxm:nodes=8 ...`.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import galvatron_fx as gfx
from galvatron_fx.cli import format_result
from galvatron_fx.models.spec import parse_model_spec

LLAMA2_70B = (
    "hf:llama:hidden_size=8192,num_hidden_layers=80,num_attention_heads=64,"
    "num_key_value_heads=8,intermediate_size=28672,vocab_size=32000,"
    "max_position_embeddings=4096"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--memory-gb", type=float, default=80.0)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()

    began = time.perf_counter()
    spec = parse_model_spec(LLAMA2_70B)
    model = spec.build("meta")
    inputs, kwargs = spec.example_inputs(model, args.global_batch, args.seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_cache is turned off for capture
        analysis = gfx.analyze(model, inputs, kwargs)
    captured = time.perf_counter() - began
    result = gfx.search(
        analysis,
        cluster="h100-80gb-sxm:nodes=8",
        memory_budget_gb=args.memory_gb,
        global_batch=args.global_batch,
    )
    print(f"Llama-2-70B, 64 x H100 80GB, batch {args.global_batch} x {args.seq} tokens")
    print(f"capture on meta {captured:.1f} s, search {result.search_time_s:.1f} s\n")
    print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
