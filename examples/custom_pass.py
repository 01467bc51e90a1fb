"""Write a pass of your own and run it inside the compiler's pass list.

The pass below reads the analytic costs and writes its own node-meta key, `gfx_intensity`
(FLOPs per byte moved), then the script prints the most memory-bound compute nodes: the ones a
fused kernel or a recomputation policy should look at first.

    python examples/custom_pass.py
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

import galvatron_fx as gfx
from galvatron_fx.models.spec import parse_model_spec


@dataclass(frozen=True)
class Intensity:
    flops_per_byte: float
    """Forward FLOPs divided by forward bytes moved (0 for ops that move nothing)."""


INTENSITY = gfx.MetaKey("gfx_intensity", Intensity, "arithmetic intensity of a node")


@gfx.graph_pass(reads=(gfx.COST.name,), writes=(INTENSITY.name,))
def arithmetic_intensity(gm: fx.GraphModule, ctx: gfx.PassContext) -> fx.GraphModule:
    """Write FLOPs per byte on every node."""
    for node in gm.graph.nodes:
        cost = gfx.COST.get(node)
        ratio = cost.fwd_flops / cost.fwd_bytes if cost.fwd_bytes else 0.0
        INTENSITY.set(node, Intensity(ratio))
    return gm


PASSES = gfx.insert_after(gfx.FRONTEND_PASSES, "annotate_costs", arithmetic_intensity)


def main() -> None:
    spec = parse_model_spec("gpt:layers=2,hidden=256,heads=4,vocab=1024,seq=128")
    model = spec.build("meta")
    args, kwargs = spec.example_inputs(model, batch=4)
    result = gfx.analyze(model, args, kwargs, passes=PASSES)
    moving = [n for n in result.graph.nodes if gfx.COST.get(n).fwd_bytes > 0]
    moving.sort(key=lambda n: INTENSITY.get(n).flops_per_byte)
    print("passes:", ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in result.timings_s.items()))
    print("most memory-bound nodes (FLOPs per byte):")
    for node in moving[:5]:
        layer = gfx.LAYER.get(node).name
        print(f"  {node.name:28s} {layer:10s} {INTENSITY.get(node).flops_per_byte:8.2f}")


if __name__ == "__main__":
    main()
