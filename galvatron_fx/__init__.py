"""galvatron_fx: an automatic-parallelism compiler for PyTorch training, built on torch.fx.

`capture` a model to an ATen-level graph, `analyze` it (layers and costs on every node),
`search` a `Plan` for a cluster, `price` a whole plan as the search does (pipeline bubble,
point-to-point sends and per-stage memory included), `lower` it to one rank's program (tensor,
sequence, data, ZeRO-1/2/3 parallelism and recomputation per layer, pipeline stages around
them) and `price_plan` that program, or `compile` / `parallelize` it into a trainable model with
`train_step`, plan-independent checkpoints (`save_checkpoint` / `load_checkpoint`,
`export_state_dict`) and `galvatron-fx train` on torchrun.
See README.md for the concepts and the CLI.
"""

import types

from galvatron_fx import search as _search_package
from galvatron_fx.compile import compile, parallelize
from galvatron_fx.compile import search as _search
from galvatron_fx.cost_models.traffic import Collective
from galvatron_fx.lowering import (
    FRONTEND_PASSES,
    PARALLEL_PASSES,
    PIPELINE_PASSES,
    Analysis,
    analyze,
    lower,
)
from galvatron_fx.meta import COST, LAYER, PLACEMENT, LayerTag, MetaKey, NodeCost, NodePlacement
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
from galvatron_fx.planning.lowered import plan_collectives, switch_collectives
from galvatron_fx.planning.plan_price import PlanPrice, price
from galvatron_fx.planning.price import UnitCost, price_plan
from galvatron_fx.planning.search_step import SearchResult
from galvatron_fx.runtime.checkpoint import CheckpointError, export_state_dict, latest_checkpoint
from galvatron_fx.runtime.compiled import CompiledModel
from galvatron_fx.runtime.pipeline import PipelinedModel
from galvatron_fx.runtime.program import RankProgram
from galvatron_fx.summary import summary, to_dot, to_json
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import LayerSummary, layer_table, model_fingerprint

__all__ = [
    "COST",
    "FRONTEND_PASSES",
    "LAYER",
    "PARALLEL_PASSES",
    "PIPELINE_PASSES",
    "PLACEMENT",
    "Analysis",
    "CaptureError",
    "CheckpointError",
    "Collective",
    "CompiledModel",
    "DPMode",
    "LayerStrategy",
    "LayerSummary",
    "LayerTag",
    "MetaKey",
    "NodeCost",
    "NodePlacement",
    "Pass",
    "PassContext",
    "PassError",
    "PipelineConfig",
    "PipelinedModel",
    "Plan",
    "PlanError",
    "PlanPrice",
    "RankProgram",
    "Recompute",
    "SearchResult",
    "UnitCost",
    "analyze",
    "capture",
    "compile",
    "export_state_dict",
    "format_graph",
    "graph_pass",
    "insert_after",
    "latest_checkpoint",
    "layer_shapes",
    "layer_table",
    "lower",
    "model_fingerprint",
    "parallelize",
    "plan_collectives",
    "price",
    "price_plan",
    "run_passes",
    "search",
    "summary",
    "switch_collectives",
    "to_dot",
    "to_json",
]

__version__ = "0.1.0"


class _SearchPackage(types.ModuleType):
    """`galvatron_fx.search` is the search package (its files are the search's parts) and,
    called, the search itself: `galvatron_fx.search(model, ...)` is `compile.search`, the API
    the design promises. The face installs the call so the package imports nothing above it."""

    __call__ = staticmethod(_search)


_search_package.__class__ = _SearchPackage
search = _search_package
