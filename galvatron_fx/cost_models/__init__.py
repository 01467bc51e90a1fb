"""Cost models: pure arithmetic on dataclasses, no torch.fx.

- `hardware`: `ClusterSpec` presets (A100, H100, H100 at 500 W, H200, TITAN RTX) and JSON
  clusters;
- `efficiency`: what a kernel of each class achieves (GEMM tiles and waves, fused
  attention, memory-bound kernels, the launch floor), `KernelWork` at any batch;
- `communication`: alpha-beta collective time with nccl-tests' bus factors, overlap bounded
  by the compute beside it;
- `memory`, `peak_memory`: ZeRO model states per device, a step's peak;
- `compute`: training FLOPs under recomputation, roofline time, the Adam step;
- `traffic`: the `Collective` records the compiler's rewrite produces (what is priced);
- `pipeline`, `layer_times`: schedule bubbles, profiled layer times.

Formulas are sympy expressions compiled to numpy. The front end's analytic node costs live
in `galvatron_fx.passes.annotate_costs`.
"""
