"""Pricing: from a lowered graph to time and memory, and the search step that uses them.

Between the graph and the arithmetic: every price here is read off the program
`galvatron_fx.lowering.lower` produces (the same one `compile` runs), and turned into numbers
by `cost_models` and `search`, which never see a graph.

- `unit_terms`: one unit's compute seconds, memory inputs and parameters on one rank;
- `plan_memory`: the memory terms of a unit and the rank's peak;
- `collective_list`: what a plan makes a rank communicate, per unit;
- `price`: a whole plan on one rank (`price_plan`), the peak, the measured efficiency;
- `model_terms`: the search's cost tables, one rewrite per tensor-parallel layout;
- `search_step`: an analysis, a cluster and a budget in, a `SearchResult` out;
- `layer_profile`: measured unit times under each strategy (`profile --model`).
"""
