"""ONNX export with a checker pass, simplification, and a parity check against PyTorch."""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from .errors import EdgePruneError
from .fsio import atomic_path
from .measure import _quiet_stdout, ort_session
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


def export_onnx(model: nn.Module, input_size, path: str | os.PathLike, opts: ExportOptions) -> Path:
    """Export `model` (batch dimension dynamic), check it and simplify it; the file appears whole."""
    path = Path(path)
    model = model.eval().cpu()
    x = torch.randn(1, *input_size)
    with atomic_path(path) as tmp:
        tmp_onnx = tmp.with_suffix(".onnx")
        try:
            with warnings.catch_warnings(), _quiet_stdout():
                warnings.simplefilter("ignore")
                if opts.dynamo:
                    torch.onnx.export(model, (x,), str(tmp_onnx), dynamo=True, opset_version=opts.opset,
                                      input_names=["input"], output_names=["logits"], external_data=False,
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
                else:
                    torch.onnx.export(model, (x,), str(tmp_onnx), dynamo=False, opset_version=opts.opset,
                                      input_names=["input"], output_names=["logits"],
                                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            proto = onnx.load(str(tmp_onnx))
            onnx.checker.check_model(proto, full_check=True)
            if opts.simplify:
                import onnxslim

                with _quiet_stdout():
                    proto = onnxslim.slim(proto)
                onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(tmp))
        except EdgePruneError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EdgePruneError(f"ONNX export failed ({type(exc).__name__}: {first}); try another --opset") from None
        finally:
            tmp_onnx.unlink(missing_ok=True)
    return path


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: str | os.PathLike, input_size, opts: ExportOptions,
                 inputs: torch.Tensor | None = None) -> Parity:
    """Run PyTorch and ONNX Runtime on the same batch; a mismatch raises EdgePruneError."""
    if inputs is None:
        inputs = torch.randn(opts.parity_batch, *input_size, generator=torch.Generator().manual_seed(0))
    ref = model.eval().cpu()(inputs).numpy()
    sess = ort_session(onnx_path, threads=torch.get_num_threads())
    got = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})[0]
    diff = float(np.max(np.abs(ref - got)))
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    tol = opts.parity_atol + opts.parity_rtol * float(np.max(np.abs(ref)))
    parity = Parity(max_abs_diff=diff, top1_agreement=agree, batch=len(inputs), tolerance=tol,
                    passed=diff <= tol and agree == 1.0)
    if not parity.passed:
        raise EdgePruneError(f"ONNX parity failed for {onnx_path}: max abs diff {diff:.3g} (tolerance {tol:.3g}), "
                             f"top-1 agreement {agree:.1%}; the exported model does not compute the same thing")
    return parity
