import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeprune import EdgePruneError, create_model, prune
from edgeprune import export as export_mod
from edgeprune.export import check_parity, export_onnx, file_opset
from edgeprune.measure import onnx_bytes
from edgeprune.recipe import ExportOptions, PruneOptions


@pytest.fixture(scope="module")
def pruned20():
    model, _ = prune(create_model("cifar_resnet20", weights="default"), PruneOptions(ratio=0.5))
    return model


def test_export_checks_and_matches_pytorch(pruned20, tmp_path):
    path = export_onnx(pruned20, (3, 32, 32), tmp_path / "m.onnx", ExportOptions())
    onnx.checker.check_model(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary files left
    parity = check_parity(pruned20, path, (3, 32, 32), ExportOptions())
    assert parity.passed and parity.max_abs_diff < 1e-4 and parity.top1_agreement == 1.0
    assert parity.batch == 8


@pytest.mark.parametrize("opset", [13, 18])
def test_opset_is_configurable(pruned20, tmp_path, opset):
    path = export_onnx(pruned20, (3, 32, 32), tmp_path / "m.onnx", ExportOptions(opset=opset))
    assert onnx.load(str(path)).opset_import[0].version == opset


def test_dynamo_exporter_also_has_parity(pruned20, tmp_path):
    opts = ExportOptions(dynamo=True)
    path = export_onnx(pruned20, (3, 32, 32), tmp_path / "m.onnx", opts)
    assert check_parity(pruned20, path, (3, 32, 32), opts).passed


def test_parity_failure_is_an_error(pruned20, tmp_path):
    path = export_onnx(pruned20, (3, 32, 32), tmp_path / "m.onnx", ExportOptions())
    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    tampered = numpy_helper.to_array(init) * 1.5
    init.CopyFrom(numpy_helper.from_array(tampered.astype(np.float32), init.name))
    onnx.save(proto, str(path))
    with pytest.raises(EdgePruneError, match="ONNX parity failed"):
        check_parity(pruned20, path, (3, 32, 32), ExportOptions())


def test_large_models_keep_weights_in_external_data(pruned20, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "_PROTOBUF_LIMIT", 10_000)
    path = export_onnx(pruned20, (3, 32, 32), tmp_path / "m.onnx", ExportOptions())
    data = tmp_path / "m.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    assert onnx_bytes(path) == path.stat().st_size + data.stat().st_size
    assert check_parity(pruned20, path, (3, 32, 32), ExportOptions()).passed


def test_a_fallback_to_the_dynamo_exporter_is_reported(tmp_path):
    """Adaptive pooling to a size that does not divide its input (6 -> 5) is beyond the TorchScript
    exporter; the dynamo exporter takes over and the caller hears why."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(5), torch.nn.Flatten(),
                                torch.nn.Linear(100, 10)).eval()
    reasons: list[str] = []
    path = export_onnx(model, (3, 8, 8), tmp_path / "m.onnx", ExportOptions(), on_fallback=reasons.append)
    assert len(reasons) == 1 and "adaptive" in reasons[0].lower(), reasons
    assert check_parity(model, path, (3, 8, 8), ExportOptions(parity_batch=2)).passed
    fine: list[str] = []
    export_onnx(model, (3, 12, 12), tmp_path / "n.onnx", ExportOptions(), on_fallback=fine.append)  # 10 -> 5
    assert fine == []


def test_an_error_of_our_own_is_not_turned_into_advice(tmp_path):
    """Only the exporter's errors become 'try another --opset'; anything else keeps its traceback."""
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        export_onnx(Broken(), (3, 8, 8), tmp_path / "m.onnx", ExportOptions())


class _GridSample(torch.nn.Module):  # GridSample exists from opset 16
    def forward(self, x):
        grid = torch.zeros(x.shape[0], 4, 4, 2)
        return torch.nn.functional.grid_sample(x, grid, align_corners=False).flatten(1)


class _Eigenvalues(torch.nn.Module):  # no ONNX operator at any opset
    def forward(self, x):
        return torch.linalg.eigvals(x[:, 0]).real.flatten(1)


def test_the_files_opset_is_read_back_where_the_exporter_keeps_another(tmp_path):
    """GridSample has no opset-13 form: the TorchScript exporter fails, and the dynamo exporter writes opset 18
    and keeps it when it cannot convert down; file_opset is what the report records (tests/test_pipeline.py)."""
    reasons: list[str] = []
    path = export_onnx(_GridSample(), (3, 8, 8), tmp_path / "m.onnx", ExportOptions(opset=13),
                       on_fallback=reasons.append)
    assert len(reasons) == 1 and file_opset(path) == 18
    assert file_opset(export_onnx(_GridSample(), (3, 8, 8), tmp_path / "n.onnx", ExportOptions(opset=16))) == 16


def test_an_operator_without_an_onnx_form_is_named(tmp_path):
    """The dynamo exporter's first line is generic advice; the error names the operator it could not convert."""
    with pytest.raises(EdgePruneError, match=r"DispatchError: No ONNX function found for .*aten\.linalg_eig"):
        export_onnx(_Eigenvalues(), (3, 8, 8), tmp_path / "m.onnx", ExportOptions())
    assert list(tmp_path.iterdir()) == []
