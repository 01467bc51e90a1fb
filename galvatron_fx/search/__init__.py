"""Strategy search: decision tree (`strategies`), dynamic programming (`dp`), the outer loop
over pipeline configurations (`planner`), baselines, explanations, and a brute force for
checking. Pure arithmetic on cost tables: never imports torch.fx, a pass or the runtime.

The package's face makes it callable too: `galvatron_fx.search(model, example_inputs,
cluster=..., memory_budget_gb=..., global_batch=...)` runs the search step end to end
(`galvatron_fx.compile.search`); see `galvatron_fx/__init__.py`.
"""
