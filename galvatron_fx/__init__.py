"""galvatron_fx: an automatic-parallelism compiler for PyTorch training, built on torch.fx.

`capture` a model to an ATen-level graph, `analyze` it (layers and costs on every node),
then `compile` / `parallelize` it under a `Plan` into one rank's program (tensor, sequence,
data, ZeRO-1/2/3 parallelism and recomputation per layer, pipeline stages around them) with
`train_step`, plan-independent checkpoints (`save_checkpoint` / `load_checkpoint`,
`export_state_dict`) and `galvatron-fx train` on torchrun.
See README.md for the concepts and the CLI.
"""

from galvatron_fx import search  # callable: galvatron_fx.search(model, ...) (search/__init__)
from galvatron_fx.compile import (
    FRONTEND_PASSES,
    PARALLEL_PASSES,
    Analysis,
    analyze,
    compile,
    parallelize,
)
from galvatron_fx.cost_models.comm import Collective
from galvatron_fx.meta import COST, LAYER, PLACEMENT, LayerTag, MetaKey, NodeCost, NodePlacement
from galvatron_fx.passes.capture import CaptureError, capture
from galvatron_fx.passes.collective_list import plan_collectives, switch_collectives
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
from galvatron_fx.runtime.checkpoint import CheckpointError, export_state_dict, latest_checkpoint
from galvatron_fx.runtime.compiled import CompiledModel
from galvatron_fx.runtime.pipeline import PipelinedModel
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
    "PARALLEL_PASSES",
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
    "Recompute",
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
    "model_fingerprint",
    "parallelize",
    "plan_collectives",
    "run_passes",
    "search",
    "summary",
    "switch_collectives",
    "to_dot",
    "to_json",
]

__version__ = "0.1.0"
