"""ONNX export with a checker pass, simplification, and a parity check against PyTorch."""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from .errors import EdgePruneError, first_line
from .fsio import TEMP_MARK
from .measure import ONNX_RUNTIMES, onnx_predictor
from .models.yolo import export_form
from .quiet import quiet_logger, quiet_stdout
from .recipe import ExportOptions


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    batch: int
    tolerance: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


_PROTOBUF_LIMIT = 2_000_000_000 - 50_000_000  # margin under protobuf's 2 GiB message limit


def _torch_export(model: nn.Module, x: torch.Tensor, path: Path, opts: ExportOptions,
                  on_fallback: Callable[[str], None] | None) -> None:
    """The TorchScript exporter (fast, one file, node names carrying module scopes), falling back to
    the dynamo exporter for the ops it lacks (such as adaptive pooling to a size that does not divide
    the input); `on_fallback` hears why."""
    with warnings.catch_warnings(), quiet_stdout():
        warnings.simplefilter("ignore")
        if not opts.dynamo:
            try:
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opts.opset,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
                return
            except RuntimeError as exc:  # every exporter error (OnnxExporterError, tracing) is one
                path.unlink(missing_ok=True)
                if on_fallback is not None:
                    on_fallback(f"{type(exc).__name__}: {first_line(exc)}")
        # Below opset 18 it warns that it will convert down, and logs a traceback when it cannot: the caller
        # reads the file's opset (file_opset) and says so in one line.
        with quiet_logger("torch.onnx._internal.exporter._compat"), quiet_logger("onnxscript.version_converter"):
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opts.opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))


def _innermost(exc: torch.onnx.OnnxExporterError) -> BaseException:
    """The exporter's own innermost error: the dynamo exporter wraps "No ONNX function found for aten.X" (a
    DispatchError) in a ConversionError whose first line is generic advice."""
    while isinstance(exc.__cause__, torch.onnx.OnnxExporterError):
        exc = exc.__cause__
    return exc


def file_opset(path: str | os.PathLike) -> int:
    """The version of the default ONNX operator set that the file at `path` uses. It can differ from the opset
    asked for: the dynamo exporter writes opset 18 and keeps it when it cannot convert the model down (with
    onnx 1.23, a model holding a Pad or a ReduceMean: most CNNs)."""
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(model: nn.Module, input_size, path: str | os.PathLike, opts: ExportOptions,
                on_fallback: Callable[[str], None] | None = None) -> Path:
    """Export `model` (batch dimension dynamic), check it and simplify it; files appear only whole.

    Models over 2 GB keep their weights in `<name>.data` beside the `.onnx` file. When the
    TorchScript exporter fails and the dynamo exporter is used instead, `on_fallback` is called with
    the reason (dynamo's node names carry no module scopes, so per-layer diagnostics lose them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    x = torch.randn(1, *input_size)
    with tempfile.TemporaryDirectory(prefix=f".{TEMP_MARK}export-", dir=path.parent) as tmp_dir:
        raw, final = Path(tmp_dir) / "raw.onnx", Path(tmp_dir) / path.name
        try:
            with export_form(model):  # a detector's box decoding in the form ONNX Runtime runs fast
                _torch_export(model, x, raw, opts, on_fallback)
            proto = onnx.load(str(raw))
            large = proto.ByteSize() > _PROTOBUF_LIMIT
            if opts.simplify and not large:
                import onnxslim

                with quiet_stdout():
                    proto = onnxslim.slim(proto)
            onnx.save(proto, str(final), save_as_external_data=large, all_tensors_to_one_file=True,
                      location=f"{path.name}.data")
            onnx.checker.check_model(str(final), full_check=True)
        except torch.onnx.OnnxExporterError as exc:  # the dynamo exporter's: its innermost cause names the op
            cause = _innermost(exc)
            raise EdgePruneError(f"ONNX export failed ({type(cause).__name__}: {first_line(cause)}); a higher "
                                 "--opset may convert it, otherwise change that part of the model (--debug shows "
                                 "the whole trace)") from exc
        except onnx.checker.ValidationError as exc:  # an invalid graph
            raise EdgePruneError(f"the exported ONNX file is invalid ({first_line(exc)}); try another --opset "
                                 "(--debug shows the whole trace)") from exc
        data = final.parent / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.parent / data.name)
        else:
            (path.parent / data.name).unlink(missing_ok=True)
        os.replace(final, path)
    return path


def comparable(ref: np.ndarray, got: np.ndarray, detector: bool, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two outputs of one model in units one tolerance serves: a detector's boxes (its first four rows,
    in pixels) divided by the image size, like its scores in [0, 1]; a classifier's logits as they are."""
    if not detector:
        return ref, got
    scale = np.ones((1, ref.shape[1], 1), dtype=ref.dtype)
    scale[:, :4] = 1 / image_size
    return ref * scale, got * scale


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: str | os.PathLike, input_size, opts: ExportOptions,
                 inputs: torch.Tensor | None = None, runtime: str = "ort_cpu") -> Parity:
    """Run PyTorch and the exported file on `runtime` (ONNX Runtime, or OpenVINO with `ov_cpu`) on the
    same batch; a mismatch raises EdgePruneError.

    A detector's boxes are compared in units of the image size (so that one tolerance serves boxes and
    scores alike) and its agreement is that of the top class at every anchor."""
    detector = getattr(getattr(model, "edgeprune_spec", None), "task", "classify") == "detect"
    if inputs is None:
        gen = torch.Generator().manual_seed(0)
        shape = (opts.parity_batch, *input_size)
        inputs = torch.rand(shape, generator=gen) if detector else torch.randn(shape, generator=gen)
    ref = model.eval().cpu()(inputs).numpy()
    got = onnx_predictor(onnx_path, runtime, threads=torch.get_num_threads())(inputs.numpy())
    ref, got = comparable(ref, got, detector, input_size[-1])
    diff = float(np.max(np.abs(ref - got)))
    tol = opts.parity_atol + opts.parity_rtol * float(np.max(np.abs(ref)))
    if detector:  # the top class at every anchor whose two best scores are further apart than the tolerance
        scores = np.sort(ref[:, 4:], axis=1)
        decisive = (scores[:, -1] - scores[:, -2]) > tol
        same = ref[:, 4:].argmax(1) == got[:, 4:].argmax(1)
        agree = float(same[decisive].mean()) if decisive.any() else 1.0
    else:
        agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    parity = Parity(max_abs_diff=diff, top1_agreement=agree, batch=len(inputs), tolerance=tol,
                    passed=diff <= tol and agree == 1.0)
    if not parity.passed:
        raise EdgePruneError(f"ONNX parity failed for {onnx_path} on {ONNX_RUNTIMES[runtime]}: max abs diff "
                             f"{diff:.3g} (tolerance {tol:.3g}), "
                             f"top-1 agreement {agree:.1%}; the exported model does not compute the same thing")
    return parity
