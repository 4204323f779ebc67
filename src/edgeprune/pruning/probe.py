"""Measuring candidate models for a latency target: the real exported model on the real runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch.nn as nn

from ..export import export_onnx
from ..measure import ort_runner, ort_waiting, ov_runner, time_interleaved, torch_runner
from ..recipe import ExportOptions, LatencyOptions

PROBE_MIN_REPEATS = 50  # the baseline's first reading, which every candidate is scaled by, takes at least these


class LatencyProbe(Protocol):
    """Measures a candidate model's latency (ms) on the target runtime; knows the baseline's.

    Any object with these attributes and a `__call__` will do; it need not subclass this.
    """

    runtime: str
    baseline_ms: float

    def compare(self, models: dict[str, nn.Module]) -> dict[str, float]:
        """Several candidates timed round-robin with the baseline in one call (ms, drift-scaled as above)."""
        runners = {"baseline": self._baseline, **{k: self._runner(m, f"candidate-{i}")
                                                  for i, (k, m) in enumerate(models.items())}}
        timed = time_interleaved(runners, self._more_repeats())
        drift = self.baseline_ms / timed["baseline"].median_ms
        return {k: timed[k].median_ms * drift for k in models}

    def __call__(self, model: nn.Module) -> float: ...


class OnnxLatencyProbe:
    """Exports each candidate to ONNX (as the pipeline will) and times it on `runtime`
    (`ort_cpu`, `ov_cpu` or `torch_cpu`) next to the unpruned model.

    Each reading is scaled by how the baseline measured in that same call compares with its first
    reading, so load on a shared machine that slows both does not move the candidate's figure.
    """

    def __init__(self, baseline: nn.Module, runtime: str, latency: LatencyOptions, export: ExportOptions,
                 workdir: str | Path, baseline_onnx: Path | None = None):
        self.runtime, self.latency, self.export = runtime, latency, export
        self.workdir = Path(workdir)
        self.input_size = baseline.edgeprune_spec.input_size
        self._baseline = self._runner(baseline, "baseline", baseline_onnx)
        first = time_interleaved({"baseline": self._baseline}, self._more_repeats())
        self.baseline_ms = first["baseline"].median_ms

    def _more_repeats(self) -> LatencyOptions:
        return self.latency.model_copy(update={"repeats": max(self.latency.repeats, PROBE_MIN_REPEATS)})

    def _runner(self, model: nn.Module, name: str, exported: Path | None = None):
        return runner(model, self.input_size, self.runtime, self.latency, self.export,
                      exported or self.workdir / f"{name}.onnx", exported=exported is not None)

    def __call__(self, model: nn.Module) -> float:
        timed = time_interleaved({"baseline": self._baseline, "candidate": self._runner(model, "candidate")},
                                 self.latency)
        drift = self.baseline_ms / timed["baseline"].median_ms
        return timed["candidate"].median_ms * drift


def runner(model: nn.Module, input_size, runtime: str, latency: LatencyOptions, export: ExportOptions, path: Path,
           exported: bool = False):
    """One run of `model` on `runtime` (`ort_cpu`, `ov_cpu`: exported to `path` first, unless `exported`
    says it is there; `torch_cpu`: eager) with `latency`'s batch size and threads."""
    if runtime == "torch_cpu":
        return torch_runner(model, input_size, latency.batch_size)
    if not exported:
        path = export_onnx(model, input_size, path, export)
    if runtime == "ov_cpu":
        return ov_runner(path, input_size, latency.batch_size, latency.threads)
    return ort_runner(path, input_size, latency.batch_size, latency.threads, **ort_waiting(latency))
