import torch

from edgeprune import create_model
from edgeprune.accuracy import evaluate_model, evaluate_onnx, topk_correct
from edgeprune.data import load_split, loader
from edgeprune.export import export_onnx
from edgeprune.recipe import ExportOptions

R20_TOP1_2000, R20_TOP5_2000 = 88.05, 99.6  # the JPEG ResNet-20 on an even 2,000-image subset


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0, 0.0, -1.0]])
    assert topk_correct(logits, torch.tensor([1, 5]), 5) == (1, 1)


def test_jpeg_resnet20_accuracy_matches_its_readme_on_a_subset(tmp_path):
    model = create_model("cifar_resnet20", weights="cifar10-jpeg")
    data = loader(load_split("cifar10", model.edgeprune_spec, train=False), 500, limit=2000)
    acc = evaluate_model(model, data)
    assert (acc.images, acc.top1, acc.top5) == (2000, R20_TOP1_2000, R20_TOP5_2000)  # README: 88.27 / 99.61 on 10k
    path = export_onnx(model, (3, 32, 32), tmp_path / "m.onnx", ExportOptions())
    onnx_acc = evaluate_onnx(path, data)
    assert abs(onnx_acc.top1 - acc.top1) <= 0.1 and onnx_acc.images == 2000
