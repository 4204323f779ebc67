"""Measurements of a model: parameters, MACs, sizes on disk and latency (PyTorch and ONNX Runtime).

MACs follow Torch-Pruning's counter (`tp.utils.count_ops_and_params`, ptflops convention): one
multiply-accumulate per weight use in conv/linear layers, plus BatchNorm, activation and pooling
element operations; functional ops (`torch.add`, `F.pad`) are not counted.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from tqdm.auto import tqdm

from .errors import EdgePruneError
from .recipe import LatencyOptions


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    with _quiet_stdout():
        macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights serialized as safetensors (what a checkpoint costs on disk)."""
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def onnx_bytes(path: str | Path) -> int:
    """Size of an ONNX model including the external data files it references (`*.onnx.data`)."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in proto.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _summarize(times_s: list[float]) -> Latency:
    ms = np.asarray(times_s) * 1e3
    return Latency(median_ms=float(statistics.median(ms)), p90_ms=float(np.percentile(ms, 90)), runs=len(ms))


@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _quiet_stdout():
    import io
    import sys

    saved, sys.stdout = sys.stdout, io.StringIO()
    try:
        yield
    finally:
        sys.stdout = saved


def _timed_loop(fn, opts: LatencyOptions, label: str, quiet: bool) -> Latency:
    for _ in range(opts.warmup):
        fn()
    times = []
    for _ in tqdm(range(opts.repeats), desc=label, leave=False, disable=quiet):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _summarize(times)


@torch.inference_mode()
def torch_latency(model: nn.Module, input_size, opts: LatencyOptions, device: str = "cpu",
                  quiet: bool = True) -> Latency:
    """Eager PyTorch latency of one forward pass, in eval mode, on `device`."""
    x = torch.randn(opts.batch_size, *input_size, device=device)
    model = model.eval().to(device)
    if device.startswith("cuda"):
        def run():
            model(x)
            torch.cuda.synchronize()
        try:
            return _timed_loop(run, opts, f"torch {device}", quiet)
        finally:
            model.to("cpu")
    with torch_threads(opts.threads):
        return _timed_loop(lambda: model(x), opts, "torch cpu", quiet)


def ort_session(path: str | Path, threads: int, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if provider not in ort.get_available_providers():
        raise EdgePruneError(f"ONNX Runtime provider {provider} is not available here")
    return ort.InferenceSession(str(path), so, providers=[provider])


def ort_latency(path: str | Path, input_size, opts: LatencyOptions,
                provider: str = "CPUExecutionProvider", quiet: bool = True) -> Latency:
    """ONNX Runtime latency of one run of the model at `path`, same thread count as PyTorch."""
    sess = ort_session(path, opts.threads, provider)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((opts.batch_size, *input_size)).astype(np.float32)
    return _timed_loop(lambda: sess.run(None, {name: x}), opts, f"onnxruntime {provider[:-17].lower()}", quiet)


def cuda_available() -> bool:
    return torch.cuda.is_available()


@dataclass
class Measurement:
    """Everything `measure` reports about one model. Latencies are medians (p90 alongside)."""

    params: int
    macs: int
    state_dict_bytes: int
    onnx_bytes: int
    latency_ms: dict[str, float]
    latency_p90_ms: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def measure(model: nn.Module, input_size, onnx_path: str | Path, opts: LatencyOptions,
            quiet: bool = True) -> Measurement:
    """Params, MACs, sizes and latency of `model` and its exported ONNX file at `onnx_path`."""
    example = torch.randn(1, *input_size)
    runs: dict[str, Latency] = {
        "torch_cpu": torch_latency(model, input_size, opts, "cpu", quiet),
        "ort_cpu": ort_latency(onnx_path, input_size, opts, quiet=quiet),
    }
    if opts.cuda and cuda_available():
        runs["torch_cuda"] = torch_latency(model, input_size, opts, "cuda", quiet)
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            runs["ort_cuda"] = ort_latency(onnx_path, input_size, opts, "CUDAExecutionProvider", quiet)
    return Measurement(
        params=count_params(model),
        macs=count_macs(model, example),
        state_dict_bytes=state_dict_bytes(model),
        onnx_bytes=onnx_bytes(onnx_path),
        latency_ms={k: v.median_ms for k, v in runs.items()},
        latency_p90_ms={k: v.p90_ms for k, v in runs.items()},
    )
