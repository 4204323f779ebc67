"""A spread of torchvision families through prune -> export -> parity (the full sweep is in bench/)."""
import pytest
import torch

from edgeprune import create_model, prune
from edgeprune.export import check_parity, export_onnx
from edgeprune.recipe import ExportOptions, PruneOptions


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                  "squeezenet1_0", "googlenet", "regnet_x_400mf", "densenet121", "vgg11"])
def test_family_prunes_runs_and_exports_with_parity(name, tmp_path):
    model = create_model(name)
    size = (3, 96, 96)
    pruned, result = prune(model, PruneOptions(ratio=0.5), example=torch.randn(1, *size))
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    path = export_onnx(pruned, size, tmp_path / "m.onnx", ExportOptions())
    parity = check_parity(pruned, path, size, ExportOptions(parity_batch=2))
    assert parity.passed and parity.top1_agreement == 1.0
