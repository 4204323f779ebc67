"""INT8: static post-training quantization of an exported ONNX model with ONNX Runtime.

QDQ format, per-channel INT8 weights, UINT8 activations whose ranges come from a few hundred
training images (evaluation transforms, no augmentation). `quant_pre_process` (shape inference and
graph optimization) runs first, as ONNX Runtime recommends: without it Conv+BN are quantized apart.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from .accuracy import Accuracy, evaluate_onnx_predictions
from .data import loader, unaugmented
from .environment import cpu_flags
from .errors import EdgePruneError, first_line
from .fsio import TEMP_MARK
from .measure import onnx_bytes, onnx_runner, openvino_available, time_interleaved
from .quiet import quiet_logger, quiet_stdout
from .recipe import Int8Options, LatencyOptions

INT8_NAME = "model.int8.onnx"


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a DataLoader of (images, labels)."""

    def __init__(self, input_name: str, data: DataLoader):
        self.input_name, self.data, self._it = input_name, data, None

    def get_next(self):
        if self._it is None:
            self._it = iter(self.data)
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch[0].numpy().astype(np.float32)}

    def rewind(self):
        self._it = None


def calibration_data(train_ds, spec, images: int) -> DataLoader:
    """`images` training images, evenly spread, with the evaluation transforms (no augmentation)."""
    return loader(unaugmented(train_ds, spec), 32, limit=images)


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_lacks_vnni() -> bool:
    """An x86 CPU without a VNNI dot-product instruction (AVX2 only, say). ONNX Runtime's u8s8 kernels
    there multiply-add pairs into 16 bits, which saturates on full-range 8-bit weights: on an AVX2-only
    EPYC the JPEG ResNet-56 kept 98.86% of its FP32 predictions with 7-bit weights, 95.73% with 8-bit
    ones (bench/deploy.py)."""
    flags = cpu_flags()
    return flags is not None and not flags.intersection(VNNI_FLAGS)


def reduce_range(opts: Int8Options) -> bool:
    return cpu_lacks_vnni() if opts.reduce_range is None else opts.reduce_range


def quantization_failures() -> tuple[type[Exception], ...]:
    """What ONNX Runtime's quantizer and pre-processing raise on a graph they cannot handle: its own
    ValueError/RuntimeError (NotImplementedError included) and failed asserts, KeyError from tensor-name
    lookups in calibration, ONNX checker and shape-inference errors, and the native session's errors."""
    import onnx.checker
    import onnx.shape_inference
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return (ValueError, RuntimeError, KeyError, AssertionError, onnx.checker.ValidationError,
            onnx.shape_inference.InferenceError, ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph,
            ort_state.InvalidProtobuf, ort_state.NotImplemented, ort_state.RuntimeException, ort_state.EPFail)


def _failed(fp32_path: Path, exc: Exception) -> EdgePruneError:
    return EdgePruneError(f"INT8 quantization of {fp32_path} failed ({type(exc).__name__}: {first_line(exc)})")


@contextlib.contextmanager
def _working_directory(path: str):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: DataLoader,
                  opts: Int8Options, exclude: list[str] | None = None, symbolic_shapes: bool = True) -> Path:
    """Write the INT8 (QDQ) version of `fp32_path` to `out_path`; the file appears only whole. The nodes
    named in `exclude` stay in float (a detector's box decoding, whose outputs mix pixels and scores).
    `symbolic_shapes=False` skips ONNX Runtime's symbolic shape inference, which cannot follow a
    detector's anchor decoding."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()
    if len(calibration.dataset) == 0:
        raise EdgePruneError("INT8 calibration has no images; check the dataset's train/ split")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[opts.method]
    try:  # the quantizer logs a note per un-quantized op
        with tempfile.TemporaryDirectory(prefix=f".{TEMP_MARK}export-int8-", dir=out_path.parent) as tmp, \
                quiet_stdout(), quiet_logger("onnxruntime"):
            pre, quantized = Path(tmp) / "pre.onnx", Path(tmp) / out_path.name
            with _working_directory(tmp):  # ORT's shape inference leaves a file in the working directory on failure
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=not symbolic_shapes)
            quantize_static(str(pre), str(quantized), _Calibration(input_name, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, reduce_range=reduce_range(opts),
                            nodes_to_exclude=exclude or [])
            os.replace(quantized, out_path)
    except quantization_failures() as exc:
        raise _failed(fp32_path, exc) from exc
    except Exception as exc:
        if type(exc) is not Exception:  # a bug of ours, a data or disk problem: keep its traceback
            raise
        # ORT's symbolic shape inference raises a bare Exception on graphs it cannot infer
        raise _failed(fp32_path, exc) from exc
    return out_path


Evaluate = Callable[[Path], tuple[Accuracy, "np.ndarray | None"]]


def top1_of(data: DataLoader, threads: int = 2, quiet: bool = True) -> Evaluate:
    """A classifier's `evaluate` for compare_int8: top-1/top-5 and per-image classes on `data`."""
    return lambda path: evaluate_onnx_predictions(path, data, threads, quiet)


def compare_int8(fp32_path: Path, int8_path: Path, evaluate: Evaluate, input_size, latency: LatencyOptions,
                 quiet: bool = True) -> dict:
    """Accuracy (top-1 / top-5, or mAP), agreement, size and ONNX Runtime CPU latency of the INT8 model
    next to its FP32 source, timed side by side in one call. `evaluate(path)` gives a file's accuracy
    and its per-image top-1 classes (None for detectors)."""
    fp32_acc, fp32_pred = evaluate(fp32_path)
    int8_acc, int8_pred = evaluate(int8_path)
    fp32, int8 = asdict(fp32_acc), asdict(int8_acc)
    agreement = float(np.mean(fp32_pred == int8_pred)) if fp32_pred is not None else None
    files = (("fp32", fp32_path), ("int8", int8_path))
    runners = {name: onnx_runner("ort_cpu", path, input_size, latency) for name, path in files}
    timed = {f"{name}/ort_cpu": t for name, t in time_interleaved(runners, latency, quiet, "INT8 latency").items()}
    if latency.openvino and openvino_available():  # OpenVINO runs the QDQ model's quantized ops in INT8 too
        runners = {name: onnx_runner("ov_cpu", path, input_size, latency) for name, path in files}
        timed.update({f"{name}/ov_cpu": t for name, t in
                      time_interleaved(runners, latency, quiet, "INT8 latency, OpenVINO").items()})

    def ms(name: str, key: str = "median_ms") -> dict[str, float]:
        return {k.split("/")[1]: getattr(t, key) for k, t in timed.items() if k.startswith(name + "/")}

    sizes = {"fp32": onnx_bytes(fp32_path), "int8": onnx_bytes(int8_path)}
    metrics = ("top1", "top5", "map50_95", "map50")

    def drop(key: str) -> float | None:
        return None if fp32[key] is None else round(fp32[key] - int8[key], 3)

    return {
        **{k: int8[k] for k in metrics}, "images": int8["images"], "top1_agreement": agreement,
        "onnx_bytes": sizes["int8"],
        "latency_ms": ms("int8"), "latency_p90_ms": ms("int8", "p90_ms"),
        "fp32": {**{k: fp32[k] for k in metrics}, "onnx_bytes": sizes["fp32"],
                 "latency_ms": ms("fp32"), "latency_p90_ms": ms("fp32", "p90_ms")},
        "speedup_vs_fp32": round(timed["fp32/ort_cpu"].median_ms / timed["int8/ort_cpu"].median_ms, 3),
        "size_reduction_x": round(sizes["fp32"] / sizes["int8"], 3),
        "top1_drop_pts": drop("top1"), "map50_95_drop_pts": drop("map50_95"), "map50_drop_pts": drop("map50"),
    }
