import pytest
import torch

import edgeprune
from edgeprune import EdgePruneError, create_model
from edgeprune.models import load_checkpoint


@pytest.mark.parametrize("name,params", [("cifar_resnet20", 269_722), ("cifar_resnet56", 853_018)])
def test_cifar_checkpoints_load_with_published_param_counts(name, params):
    model = create_model(name, weights="default")
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.edgeprune_spec.input_size == (3, 32, 32)


def test_jpeg_adapted_resnet56_classifies_real_images(data_dir, cifar_test_subset):
    model = create_model("cifar_resnet56", weights=data_dir / "resnet56-cifar10jpeg.pth")
    x, y = cifar_test_subset
    with torch.no_grad():
        top1 = (model(x).argmax(1) == y).float().mean().item()
    assert top1 > 0.85  # README: 90.01% on the full test set; a wrong shortcut or key map scores ~10%


def test_prefixed_and_nested_checkpoints_load_identically(tmp_path, data_dir):
    plain = torch.load(data_dir / "resnet20-cifar10jpeg.pth", weights_only=True, map_location="cpu")
    nested = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in plain.items()}}
    torch.save(nested, tmp_path / "nested.pth")
    torch.save({"net": plain, "acc": 91.7, "epoch": 180}, tmp_path / "script.pth")  # a training script's own layout
    torch.save({"net": plain, "ema": plain, "epoch": 180}, tmp_path / "two.pth")
    with pytest.raises(EdgePruneError, match=r"several dicts of tensors \(net, ema\) among its keys \(net, ema, epoch"):
        create_model("cifar_resnet20", weights=str(tmp_path / "two.pth"))
    from safetensors.torch import save_file

    save_file(plain, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    ref = create_model("cifar_resnet20", weights=data_dir / "resnet20-cifar10jpeg.pth")(x)
    for path in (tmp_path / "nested.pth", tmp_path / "script.pth", tmp_path / "w.safetensors"):
        assert torch.equal(create_model("cifar_resnet20", weights=str(path))(x), ref)


def test_mismatched_keys_name_the_first_keys(data_dir):
    with pytest.raises(EdgePruneError, match=r"unexpected keys \['layer1.3.conv1.weight'"):
        create_model("cifar_resnet20", weights=data_dir / "resnet56-cifar10jpeg.pth")
    with pytest.raises(EdgePruneError, match="missing keys"):
        create_model("cifar_resnet56", weights=data_dir / "resnet20-cifar10jpeg.pth")


def test_shape_mismatch_points_to_num_classes(tmp_path):
    torch.save(create_model("cifar_resnet20", num_classes=100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(EdgePruneError, match=r"linear.weight has shape \(100, 64\).*--num-classes"):
        create_model("cifar_resnet20", weights=tmp_path / "c100.pth")
    assert create_model("cifar_resnet20", weights=tmp_path / "c100.pth", num_classes=100)


def test_pickled_modules_and_garbage_are_refused(tmp_path):
    torch.save(create_model("cifar_resnet20"), tmp_path / "whole_model.pth")  # a pickle, never unpickled
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    for name in ("whole_model.pth", "garbage.pth"):
        with pytest.raises(EdgePruneError, match="cannot be read safely"):
            load_checkpoint(create_model("cifar_resnet20"), tmp_path / name)
    with pytest.raises(EdgePruneError, match="does not exist"):
        create_model("cifar_resnet20", weights=tmp_path / "absent.pth")


def test_truncated_and_foreign_checkpoints_are_refused_with_their_cause(tmp_path):
    torch.save(create_model("cifar_resnet20").state_dict(), tmp_path / "good.pth")
    good = (tmp_path / "good.pth").read_bytes()  # 1.1 MB
    torch.save({"w": torch.ones(100, 100)}, tmp_path / "small.pth")
    small = (tmp_path / "small.pth").read_bytes()  # 41 kB
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pth").read_bytes()
    files = {  # what torch.load raises for each, as checked with torch 2.14
        "truncated_zip.pth": (good[: len(good) // 2], RuntimeError),  # no central directory
        "truncated_small_zip.pth": (small[: len(small) // 2], OSError),  # EINVAL: seeks before the start
        "cut_header.pth": (good[:100], RuntimeError),
        "truncated_legacy.pth": (legacy[: len(legacy) // 2], RuntimeError),
        "empty.pth": (b"", EOFError),
        "text.pth": (b"hello world\n" * 10, KeyError),
    }
    for name, (data, cause) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EdgePruneError, match=f"checkpoint .*{name} cannot be read safely") as err:
            load_checkpoint(create_model("cifar_resnet20"), tmp_path / name)
        assert type(err.value.__cause__) is cause, name
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(EdgePruneError, match="is not a readable safetensors file") as err:
        load_checkpoint(create_model("cifar_resnet20"), tmp_path / "cut.safetensors")
    assert type(err.value.__cause__).__name__ == "SafetensorError"


def test_a_machine_problem_reading_a_checkpoint_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    """An I/O error, unlike a truncated file, keeps its type and traceback."""
    torch.save(create_model("cifar_resnet20").state_dict(), tmp_path / "good.pth")

    def failing_load(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(OSError, match="Input/output error"):
        load_checkpoint(create_model("cifar_resnet20"), tmp_path / "good.pth")


def test_unknown_model_and_weights_are_clear_errors():
    with pytest.raises(EdgePruneError, match="unknown model 'resnet5o': did you mean resnet50"):
        create_model("resnet5o")
    with pytest.raises(EdgePruneError, match="unknown weights 'IMAGENET1K_V9' for resnet18.*IMAGENET1K_V1"):
        create_model("resnet18", weights="IMAGENET1K_V9")


def test_every_torchvision_classifier_is_listed():
    import torchvision

    names = edgeprune.list_models()
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    assert {"cifar_resnet20", "cifar_resnet110"} <= set(names)
    assert create_model("cifar_resnet110")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_model_spec_follows_its_weights():
    model = create_model("inception_v3")
    assert model.edgeprune_spec.input_size == (3, 299, 299)
    assert model.aux_logits is False
