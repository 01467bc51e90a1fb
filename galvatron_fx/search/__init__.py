"""Strategy search: decision tree (`strategies`), dynamic programming (`dp`), the outer loop
over pipeline configurations (`planner`), baselines, explanations, and a brute force for
checking. Pure arithmetic on cost tables: never imports torch.fx or the runtime.

The package is also callable: `galvatron_fx.search(model, example_inputs, cluster=...,
memory_budget_gb=..., global_batch=...)` runs `galvatron_fx.compile.search`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """`galvatron_fx.search(...)` is the API the design promises, and `galvatron_fx.search`
    is also this package: a module whose call runs the search keeps both."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from galvatron_fx.compile import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
