"""galvatron_fx: an automatic-parallelism compiler for PyTorch training, built on torch.fx.

Front end (this release): `capture` a model to an ATen-level graph, `analyze` it (layers and
costs on every node) and print its `summary`. See README.md for the concepts and the CLI.
"""

from galvatron_fx.compile import FRONTEND_PASSES, Analysis, analyze
from galvatron_fx.meta import COST, LAYER, LayerTag, MetaKey, NodeCost
from galvatron_fx.passes.capture import CaptureError, capture
from galvatron_fx.passes.manager import (
    Pass,
    PassContext,
    PassError,
    format_graph,
    graph_pass,
    insert_after,
    run_passes,
)
from galvatron_fx.plan import DPMode, LayerStrategy, PipelineConfig, Plan, PlanError, Recompute
from galvatron_fx.summary import (
    LayerSummary,
    layer_shapes,
    layer_table,
    model_fingerprint,
    summary,
    to_dot,
    to_json,
)

__all__ = [
    "COST",
    "FRONTEND_PASSES",
    "LAYER",
    "Analysis",
    "CaptureError",
    "DPMode",
    "LayerStrategy",
    "LayerSummary",
    "LayerTag",
    "MetaKey",
    "NodeCost",
    "Pass",
    "PassContext",
    "PassError",
    "PipelineConfig",
    "Plan",
    "PlanError",
    "Recompute",
    "analyze",
    "capture",
    "format_graph",
    "graph_pass",
    "insert_after",
    "layer_shapes",
    "layer_table",
    "model_fingerprint",
    "run_passes",
    "summary",
    "to_dot",
    "to_json",
]

__version__ = "0.1.0"
