"""Structural pruning on Torch-Pruning (DepGraph): importance criteria (`importance`), which layers may
be pruned (`rules`), the ratio, MACs and latency target searches (`search`), latency probes (`probe`),
a memory and time limit on tracing (`guard`), and `prune` itself (`core`)."""
from .core import LayerWidth, PruneResult, check_runs, prune, prune_copy
from .guard import TracingLimitExceeded, trace_guard
from .importance import HessianImportance, calibration_grads, make_importance
from .probe import LatencyProbe, OnnxLatencyProbe
from .rules import (
    HEAD_REASON,
    PAD_REASON,
    SELECT_REASON,
    TORCH_PRUNING_FAILURES,
    build_graph,
    find_coupled,
    find_heads,
    out_channels,
    prunable_layers,
    resolve_unpruned,
)
from .search import Trial

__all__ = [
    "HEAD_REASON", "PAD_REASON", "SELECT_REASON", "TORCH_PRUNING_FAILURES", "HessianImportance", "LatencyProbe",
    "LayerWidth", "OnnxLatencyProbe", "PruneResult", "TracingLimitExceeded", "Trial", "build_graph",
    "calibration_grads", "check_runs", "find_heads", "find_coupled", "make_importance", "out_channels",
    "prunable_layers", "prune", "prune_copy", "resolve_unpruned", "trace_guard",
]
