"""Models from elsewhere: the user's own architecture (a file or an importable module, with arguments)
and timm models prune, export with parity and reload through edgeprune.load; mistakes are one line."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import assert_one_line_error, cli, run_cli

import edgeprune

NET = textwrap.dedent('''
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, width: float = 1.0, num_classes: int = 10):
            super().__init__()
            c = int(32 * width)
            self.features = nn.Sequential(
                nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(2 * c, num_classes)

        def forward(self, x):
            return self.head(self.features(x))


    class Fixed(nn.Module):  # a CIFAR-style classifier whose head takes 32x32 inputs only
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 32 * 32, 10)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))


    def build(width=1.0):
        return Net(width, num_classes=7)


    def not_a_model():
        return 3
''')
FAST = ("--weights", "none", "--ratio", "0.5", "--round-to", "1", "--warmup", "1", "--repeats", "3",
        "--set", "latency.per_layer=false", "--set", "latency.openvino=false", "-q")


def test_a_model_from_the_users_file_prunes_exports_and_reloads(tmp_path):
    (tmp_path / "nets.py").write_text(NET)
    out = tmp_path / "run"
    proc = run_cli("prune", "--model", "nets.py:Net", "--model-args", '{"width": 0.5}', "--input-size", "3,32,32",
                   "--num-classes", "4", *FAST, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_parity"]["passed"] and report["pruned"]["macs"] < report["baseline"]["macs"] / 2
    spec = json.loads((out / "model.json").read_text())["spec"]
    assert spec["name"] == f"{tmp_path / 'nets.py'}:Net" and spec["builder_kwargs"] == {"width": 0.5}
    assert spec["num_classes"] == 4 and spec["input_size"] == [3, 32, 32]
    model = edgeprune.load(out)  # rebuilt from the recorded file and arguments, from another directory
    assert model.features[0].out_channels == 8 and model.head.out_features == 4
    saved = edgeprune.load(out / "stages" / "prune")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), saved(x))


def test_a_model_from_an_importable_module(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(NET)
    out = tmp_path / "run"
    proc = run_cli("prune", "--model", "mynets:build", "--input-size", "3,32,32", *FAST, "--out", str(out),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    model = edgeprune.load(out)
    assert model.edgeprune_spec.name == "mynets:build" and model.edgeprune_spec.num_classes == 7


@pytest.mark.parametrize("args, needles", [
    (("--model", "missing.py:Net"), ("model file missing.py does not exist",)),
    (("--model", "nets.py:Nte"), ("has no class or function 'Nte'", "Net")),
    (("--model", "nets.py:Net", "--model-args", "{width: 1}"), ("--model-args must be a JSON object",)),
    (("--model", "nets.py:Net", "--model-args", '{"depth": 3}'), ("--model-args do not fit Net",)),
    (("--model", "nets.py:not_a_model"), ("returned a int, not a torch.nn.Module",)),
    (("--model", "nets.py:Net", "--input-size", "3,32"), ("must be C,H,W",)),
    (("--model", "nets.py:Fixed"), ("cannot run a (1, 3, 224, 224) input (mat1 and mat2", "pass --input-size")),
    (("--model", "nets.py:Fixed", "--input-size", "3,64,64"), ("cannot run a (1, 3, 64, 64)", "check --input-size")),
    (("--model", "no_such_pkg.nets:Net"), ("cannot import 'no_such_pkg.nets'",)),
    (("--model", "cifar_resnet20", "--model-args", '{"width": 1}'), ("--model-args is for custom models",)),
    (("--model", "timm/resnet5od"), ("unknown timm model 'resnet5od'", "timm/resnet50d")),
])
def test_custom_and_timm_mistakes_are_one_line(tmp_path, args, needles):
    (tmp_path / "nets.py").write_text(NET)
    proc = cli("prune", *args, "--weights", "none", "--out", str(tmp_path / "run"), "-q", cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()


def test_a_timm_model_prunes_exports_and_reloads(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("prune", "--model", "timm/mobilenetv3_large_100", "--input-size", "3,96,96", *FAST,
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_parity"]["passed"] and report["pruned"]["macs"] < report["baseline"]["macs"] / 2
    assert list(report["prune"]["unpruned"]) == ["classifier"]
    model, saved = edgeprune.load(out), edgeprune.load(out / "stages" / "prune")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), saved(x)) and model(x).shape == (2, 1000)
