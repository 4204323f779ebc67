import torch

from edgeprune import create_model
from edgeprune.data import load_split, loader
from edgeprune.evaluate import _topk_correct, evaluate, evaluate_onnx
from edgeprune.export import export_onnx
from edgeprune.recipe import ExportOptions


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0, 0.0, -1.0]])
    assert _topk_correct(logits, torch.tensor([1, 5]), 5) == (1, 1)


def test_jpeg_resnet20_accuracy_matches_its_readme_on_a_subset(tmp_path):
    model = create_model("cifar_resnet20", weights="cifar10-jpeg")
    data = loader(load_split("cifar10", model.edgeprune_spec, train=False), 500, limit=2000)
    acc = evaluate(model, data)
    assert acc["images"] == 2000 and 85 < acc["top1"] < 92 and acc["top5"] > 99  # README: 88.27 / 99.61 on 10k
    path = export_onnx(model, (3, 32, 32), tmp_path / "m.onnx", ExportOptions())
    onnx_acc = evaluate_onnx(path, data)
    assert abs(onnx_acc["top1"] - acc["top1"]) <= 0.1 and onnx_acc["images"] == 2000
