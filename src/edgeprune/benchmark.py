"""`edgeprune benchmark OUT`: a run's pruned model on every runtime and precision available here.

One table, one process: PyTorch (FP32), ONNX Runtime and OpenVINO (FP32 model.onnx, INT8 model.int8.onnx
when the run wrote one), each row's file and size, latency (median and p90, the rows of one runtime timed
round-robin so that load on a shared machine hits them alike), its outputs against PyTorch's on the same
batch, and, with data, its accuracy (top-1/top-5, or mAP for detectors). With `baseline`, the unpruned
model (rebuilt from the run's recipe and exported here) gets FP32 rows beside it.
"""
from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import artifact
from .errors import EdgePruneError
from .export import comparable
from .fsio import read_json, write_json
from .measure import (
    ONNX_RUNTIMES,
    Latency,
    onnx_bytes,
    onnx_predictor,
    onnx_runner,
    openvino_available,
    state_dict_bytes,
    time_interleaved,
    torch_runner,
    torch_threads,
)
from .recipe import LatencyOptions, Recipe, apply_overrides
from .stages import INT8_NAME, ONNX_NAME

RUNTIME_LABELS = {"torch_cpu": "PyTorch", "torch_cuda": "PyTorch (CUDA)", **ONNX_RUNTIMES}
PARITY_BATCH = 8


@dataclass
class BenchmarkRow:
    model: str  # "pruned", or "unpruned" (with baseline)
    runtime: str  # torch_cpu, ort_cpu, ov_cpu, torch_cuda
    precision: str  # fp32 or int8
    file: str  # relative to the run folder (the unpruned model's files live in a temporary folder)
    bytes: int
    latency_ms: float
    latency_p90_ms: float
    max_abs_diff: float | None  # outputs against the same model in PyTorch (FP32), on the same batch
    top1_agreement: float | None  # classifiers: share of that batch whose top-1 class is PyTorch's
    top1: float | None = None
    top5: float | None = None
    map50_95: float | None = None
    map50: float | None = None
    images: int | None = None


@dataclass
class _Entry:
    model: str
    runtime: str
    precision: str
    file: str
    bytes: int
    runner: Callable[[], None]
    predict: Callable[[np.ndarray], np.ndarray]  # a float32 batch -> the first output
    reference: nn.Module  # the PyTorch model its outputs are compared with


def _torch_predict(model: nn.Module, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()
    return predict


def _entries(label: str, model: nn.Module, weights: str, files: dict[str, Path], root: Path, opts: LatencyOptions,
             openvino: bool) -> list[_Entry]:
    """The rows of one model: PyTorch (its weights file named `weights`), then each ONNX file of `files`
    (by precision) on each ONNX runtime."""
    size = model.edgeprune_spec.input_size
    entries = [_Entry(label, "torch_cpu", "fp32", weights, state_dict_bytes(model),
                      torch_runner(model, size, opts.batch_size), _torch_predict(model), model)]
    if opts.cuda and torch.cuda.is_available():
        import copy

        gpu = copy.deepcopy(model).cuda().eval()
        entries.append(_Entry(label, "torch_cuda", "fp32", entries[0].file, entries[0].bytes,
                              torch_runner(gpu, size, opts.batch_size, "cuda"), _torch_predict(gpu, "cuda"), model))
    runtimes = ["ort_cpu"] + (["ov_cpu"] if openvino else [])
    for runtime in runtimes:
        for precision in ("fp32", "int8"):
            path = files.get(precision)
            if path is None:
                continue
            runner = onnx_runner(runtime, path, size, opts)
            name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
            entries.append(_Entry(label, runtime, precision, name, onnx_bytes(path), runner,
                                  onnx_predictor(path, runtime, opts.threads), model))
    return entries


def _compare(ref: np.ndarray, got: np.ndarray, detector: bool, image_size: int) -> tuple[float, float | None]:
    """Max abs difference (a detector's boxes in units of the image size) and, for classifiers, top-1 agreement."""
    ref, got = comparable(ref, got, detector, image_size)
    agree = None if detector else float(np.mean(ref.argmax(1) == got.argmax(1)))
    return float(np.max(np.abs(ref - got))), agree


class _Accuracy:
    """Evaluates a row's predictor on the evaluation split of `data` (the same batches for every row)."""

    def __init__(self, spec, data: str, limit: int | None, threads: int, quiet: bool):
        self.detector, self.threads, self.quiet, self.limit = spec.task == "detect", threads, quiet, limit
        self.imgsz = spec.input_size[-1]
        from .pipeline import check_data_kind

        self.det = check_data_kind(str(data), spec)
        if not self.detector:
            from .data import load_split, loader

            self.batches = loader(load_split(data, spec, train=False, quiet=quiet), 250, limit=limit)

    def first_batch(self) -> np.ndarray:
        if self.detector:
            from .detection.data import dataset, loader

            batch = next(iter(loader(dataset(self.det, "val", self.imgsz), PARITY_BATCH)))
            return (batch["img"].float() / 255).numpy()
        return next(iter(self.batches))[0][:PARITY_BATCH].numpy()

    def __call__(self, entry: _Entry) -> dict:
        desc = f"{entry.model} {entry.runtime} {entry.precision}"
        if self.detector:
            from .detection import metrics

            acc = metrics.evaluate(lambda x: torch.from_numpy(entry.predict(x.numpy())), self.det, self.imgsz,
                                   limit=self.limit, quiet=self.quiet, desc=desc)
        else:
            from .accuracy import evaluate_predictor

            acc = evaluate_predictor(entry.predict, self.batches, self.quiet, desc)[0]
        return {k: v for k, v in asdict(acc).items() if k in ("top1", "top5", "map50_95", "map50", "images")}


def _unpruned_files(recipe: Recipe, tmp: Path) -> tuple[nn.Module, dict[str, Path]]:
    from .export import export_onnx
    from .models import create_model

    model = create_model(**recipe.model.model_dump()).eval()
    path = export_onnx(model, model.edgeprune_spec.input_size, tmp / "unpruned.onnx", recipe.export)
    return model, {"fp32": path}


def benchmark(out: str | os.PathLike, data: str | None = None, limit: int | None = None,
              latency_overrides: dict | None = None, baseline: bool = False, quiet: bool = True,
              command: str | None = None) -> dict:
    """Benchmark the pruned model of the run folder `out` on every runtime x precision available; returns
    {"rows": [...], ...} and writes it to out/benchmark.json, and into report.json/.md/.html as "benchmark".
    `latency_overrides` replaces fields of the run's latency options (threads, warmup, repeats, ...)."""
    from .pipeline import read_run, write_report

    root = Path(out)
    recipe = read_run(root)
    opts = apply_overrides(recipe, {f"latency.{k}": v for k, v in (latency_overrides or {}).items()}).latency
    openvino = openvino_available()
    pruned = artifact.load(root)
    spec = pruned.edgeprune_spec
    if not (root / ONNX_NAME).is_file():
        raise EdgePruneError(f"{root / ONNX_NAME} is missing; run edgeprune export {root}")
    files = {"fp32": root / ONNX_NAME}
    if (root / INT8_NAME).is_file():
        files["int8"] = root / INT8_NAME
    scorer = _Accuracy(spec, data, limit, opts.threads, quiet) if data else None
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as tmp, torch_threads(opts.threads):
        entries = _entries("pruned", pruned, artifact.WEIGHTS, files, root, opts, openvino)
        if baseline:
            unpruned, unpruned_files = _unpruned_files(recipe, Path(tmp))
            entries += _entries("unpruned", unpruned, f"{recipe.model.name} ({recipe.model.weights})",
                                unpruned_files, Path(tmp), opts, openvino)
        timed: dict[int, Latency] = {}
        for runtime in dict.fromkeys(e.runtime for e in entries):  # one runtime at a time, its rows round-robin
            group = {i: e.runner for i, e in enumerate(entries) if e.runtime == runtime}
            timed.update(time_interleaved(group, opts, quiet, f"latency {RUNTIME_LABELS[runtime]}"))
        if scorer is not None:
            inputs = scorer.first_batch()
        else:
            gen = torch.Generator().manual_seed(0)
            shape = (PARITY_BATCH, *spec.input_size)
            inputs = (torch.rand(shape, generator=gen) if spec.task == "detect" else
                      torch.randn(shape, generator=gen)).numpy()
        references = {id(e.reference): _torch_predict(e.reference)(inputs) for e in entries}
        rows = []
        for i, e in enumerate(entries):
            diff = agree = None
            if e.runtime != "torch_cpu":
                diff, agree = _compare(references[id(e.reference)], e.predict(inputs), spec.task == "detect",
                                       spec.input_size[-1])
            row = BenchmarkRow(e.model, e.runtime, e.precision, e.file, e.bytes, timed[i].median_ms,
                               timed[i].p90_ms, diff, agree, **(scorer(e) if scorer is not None else {}))
            rows.append(asdict(row))
    result = {"rows": rows, "threads": opts.threads, "batch_size": opts.batch_size, "repeats": opts.repeats,
              "ort_spinning": opts.ort_spinning, "ort_spin_us": opts.ort_spin_us, "turn_runs": opts.turn_runs,
              "settle_runs": opts.settle_runs,
              "data": data, "limit": limit, "openvino": openvino,
              "command": command or shlex.join(["edgeprune", *sys.argv[1:]])}
    write_json(root / "benchmark.json", result)
    if (root / "report.json").is_file():
        report = read_json(root / "report.json")
        report["benchmark"] = result
        write_report(root, report)
    return result
