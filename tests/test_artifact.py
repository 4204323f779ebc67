import json

import pytest
import torch
from safetensors.torch import load_file

import edgeprune
from edgeprune import EdgePruneError, create_model, prune
from edgeprune.recipe import PruneOptions


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = create_model("cifar_resnet56", weights="default")
    pruned, result = prune(model, PruneOptions(macs_reduction=0.5))
    out = tmp_path_factory.mktemp("artifact")
    edgeprune.save(pruned, result.history, out)
    return pruned, out


def test_reload_is_exact(saved):
    pruned, out = saved
    loaded = edgeprune.load(out)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert loaded.edgeprune_spec.name == "cifar_resnet56"
    assert not loaded.training


def test_artifact_is_safetensors_and_json_only(saved):
    _, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["spec"]["name"] == "cifar_resnet56" and meta["pruning_history"]
    assert load_file(str(out / "model.safetensors"))["layer1.0.conv1.weight"].shape[0] < 16


def test_damaged_artifacts_are_clear_errors(saved, tmp_path):
    _, out = saved
    with pytest.raises(EdgePruneError, match="holds no pruned model"):
        edgeprune.load(tmp_path)
    (tmp_path / "model.json").write_text((out / "model.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EdgePruneError, match="model.safetensors is corrupt"):
        edgeprune.load(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(EdgePruneError, match="model.json is corrupt"):
        edgeprune.load(tmp_path)


def test_modules_that_check_their_version_reload(tmp_path):
    """MNASNet refuses a state dict without module versions, which safetensors does not store."""
    model = create_model("mnasnet0_5")
    pruned, result = prune(model, PruneOptions(ratio=0.5), example=torch.randn(1, 3, 64, 64))
    edgeprune.save(pruned, result.history, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # loading inside no_grad works too, though DepGraph needs autograd
        assert torch.equal(edgeprune.load(tmp_path)(x), pruned(x))
