"""Typed results of the run stages; each round-trips through its stage's JSON file unchanged.

Units are in the field names (`_ms`, `_bytes`); percentages are derived by the report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from pydantic import TypeAdapter

from .accuracy import Accuracy
from .export import Parity
from .measure import Measurement
from .pruning.core import PruneResult
from .recover import FinetuneResult

T = TypeVar("T")


def to_json(result: Any) -> dict:
    return asdict(result)


def from_json(cls: type[T], data: dict) -> T:
    """Rebuild a (nested) result dataclass from its JSON form, checking every field's type."""
    return TypeAdapter(cls).validate_python(data)


@dataclass
class Recalibration:
    accuracy: Accuracy
    bn_layers: int


@dataclass
class Finetuning:
    accuracy: Accuracy
    training: FinetuneResult


@dataclass
class PruneStep:
    """One step of an iterative schedule but the last (whose model the prune stage ends with)."""

    step: int
    macs: int
    params: int
    epochs: int
    pruned: Accuracy
    recalibrated: Accuracy
    finetuned: Accuracy | None
    seconds: float


@dataclass
class Schedule:
    """prune.steps > 1: the one-shot plan (its target resolved into layer widths) and the steps before the
    last, each pruned, BN re-calibrated and fine-tuned for its share of the epochs."""

    plan: PruneResult
    widths: dict[str, int]  # every conv/linear layer's width after the last step
    epochs: list[int]  # fine-tuning epochs after each step, the last one's in the finetuned stage
    steps: list[PruneStep]
    history: list = field(repr=False)  # the pruning history of the steps done here


@dataclass
class ExportResult:
    """The exported model.onnx: which exporter wrote it, why it fell back, and its parity check."""

    parity: Parity
    opset: int
    exporter: str  # "torchscript" or "dynamo"
    onnx_bytes: int
    fallback_reason: str | None = None  # set when the TorchScript exporter failed and dynamo took over
    openvino_parity: Parity | None = None  # the same check run by OpenVINO, when it is installed


@dataclass
class OnnxFigures:
    top1: float | None
    top5: float | None
    onnx_bytes: int
    latency_ms: dict[str, float]
    latency_p90_ms: dict[str, float]
    map50_95: float | None = None  # detectors
    map50: float | None = None


@dataclass
class Int8Result:
    """The INT8 model next to its FP32 source, timed side by side."""

    top1: float | None
    top5: float | None
    images: int
    top1_agreement: float | None  # classifiers: share of images whose top-1 class is FP32's
    onnx_bytes: int
    latency_ms: dict[str, float]
    latency_p90_ms: dict[str, float]
    fp32: OnnxFigures
    speedup_vs_fp32: float
    size_reduction_x: float
    top1_drop_pts: float | None
    calibration_images: int
    method: str
    per_channel: bool
    reduce_range: bool  # 7-bit weights (for CPUs without VNNI)
    map50_95: float | None = None  # detectors
    map50: float | None = None
    map50_95_drop_pts: float | None = None
    map50_drop_pts: float | None = None


@dataclass
class Measured:
    """The unpruned and the pruned model measured side by side."""

    baseline: Measurement
    pruned: Measurement


@dataclass
class LayerProfile:
    name: str
    kind: str
    channels_before: int
    channels_after: int
    aligned: bool
    macs_before: int
    macs_after: int
    ort_ms_before: float
    ort_ms_after: float
    torch_ms_before: float
    torch_ms_after: float


@dataclass
class Diagnosis:
    """Per-layer MACs and measured time before/after, and the findings drawn from them."""

    runs: int
    threads: int
    batch_size: int
    align: int
    layers: list[LayerProfile]
    totals: dict[str, float]
    ort_other_ms: dict[str, dict[str, float]]
    findings: list[str] = field(default_factory=list)
    # ONNX Runtime ms of each model ("before"/"after") on 1 thread and on `threads`, timed side by side
    thread_scaling: dict[str, dict[str, float]] | None = None
