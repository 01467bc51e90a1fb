"""Cost models: pure arithmetic on dataclasses (hardware, compute, communication, memory).

Filled by the cost-model issue; the front end's analytic node costs live in
`galvatron_fx.passes.annotate_costs`.
"""
