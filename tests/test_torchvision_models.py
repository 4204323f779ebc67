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


def test_shufflenet_blocks_are_rewritten_to_the_same_function():
    import torchvision

    stock = torchvision.models.shufflenet_v2_x0_5().eval()
    ours = create_model("shufflenet_v2_x0_5")
    ours.load_state_dict(stock.state_dict())  # the same keys: only forward changed
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), stock(x))
    assert type(ours.stage2[0]).__name__ == "IndexedShuffleBlock"


def test_shufflenet_v2_prunes_inside_its_branches_exports_and_reloads(tmp_path):
    """The issue's bar: shufflenet_v2_x1_0 at ratio 0.5, fewer MACs, parity, 1000 outputs after reload."""
    import json

    from conftest import run_cli

    import edgeprune
    from edgeprune.pruning import SELECT_REASON

    out = tmp_path / "shufflenet"
    proc = run_cli("prune", "--model", "shufflenet_v2_x1_0", "--weights", "none", "--ratio", "0.5", "--out", str(out),
                   "--warmup", "1", "--repeats", "5", "--set", "latency.per_layer=false",
                   "--set", "latency.openvino=false", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["macs"] < 0.75 * report["baseline"]["macs"] and report["onnx_parity"]["passed"]
    unpruned = report["prune"]["unpruned"]
    assert unpruned["stage2.1.branch2.5"] == SELECT_REASON and "stage2.1.branch2.0" not in unpruned
    layers = {la["name"]: la for la in report["prune"]["layers"]}
    inner = layers["stage3.2.branch2.0"]  # a branch's first 1x1 conv: pruned, its depthwise conv with it
    assert inner["channels_after"] < inner["channels_before"]
    assert layers["stage3.2.branch2.3"]["channels_after"] == inner["channels_after"]
    model = edgeprune.load(out)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
        assert torch.equal(model(x), edgeprune.load(out / "stages" / "prune")(x))
