"""Cost models: pure arithmetic on dataclasses, no torch.fx.

- `hardware`: `ClusterSpec` presets (A100, H100, H200, TITAN RTX) and JSON clusters;
- `communication`: alpha-beta collective time with nccl-tests' bus factors, overlap;
- `memory`: ZeRO model states per device;
- `compute`: training FLOPs under recomputation, roofline time;
- `comm`: the `Collective` records the compiler's rewrite produces (what is priced).

Formulas are sympy expressions compiled to numpy. The front end's analytic node costs live
in `galvatron_fx.passes.annotate_costs`.
"""
