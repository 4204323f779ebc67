import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import edgeprune.data as data_module
from edgeprune import EdgePruneError, create_model
from edgeprune.data import even_subset, load_split, resolve, shard


def make_folder(root, classes=3, per_class=4, size=32, split="val"):
    for s in ("train", split):
        for c in range(classes):
            d = root / s / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), (20 * c + i) % 256, np.uint8)).save(d / f"{i}.png")
    return root


def test_cifar10_resolves_to_the_jpeg_folder(data_dir):
    source = resolve("cifar10")
    assert source.kind == "folder" and source.root == data_dir / "cifar10-jpeg"
    spec = create_model("cifar_resnet20").edgeprune_spec
    test = load_split("cifar10", spec, train=False)
    assert len(test) == 10_000 and test.classes[0] == "airplane"
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0


def test_decoded_images_match_the_published_arrays(data_dir):
    """The in-memory decode equals the shared data's own decode of the same files."""
    spec = create_model("cifar_resnet20").edgeprune_spec
    test = load_split("cifar10", spec, train=False)
    arrays = np.load(data_dir / "cifar10_test_jpeg_uint8.npz")
    assert torch.equal(test.images[123].permute(1, 2, 0), torch.from_numpy(arrays["x"][123]))
    assert int(test.targets[9_999]) == int(arrays["y"][9_999])


def test_training_split_is_augmented_but_eval_is_not(tmp_path):
    make_folder(tmp_path, classes=10)
    spec = create_model("cifar_resnet20").edgeprune_spec
    train, val = load_split(tmp_path, spec, True), load_split(tmp_path, spec, False)
    assert torch.equal(val[0][0], val[0][0])
    torch.manual_seed(0)
    crops = {tuple(train[5][0].flatten()[:200].tolist()) for _ in range(8)}
    assert len(crops) > 1  # random crop with zero padding moves the image


def test_a_loader_batch_equals_torchvisions_transforms_image_by_image(data_dir):
    """The DataLoader fetches a batch through DecodedImages.__getitems__ (through Subset too), transformed as one
    batch: bit-identical, under one seed, to torchvision's own pad-crop-flip-normalize pipeline run image by image
    as the DataLoader ran it before, so seeded fine-tunes draw the same crops and flips."""
    from torchvision.transforms import v2 as T

    from edgeprune.data import DecodedImages, loader
    spec = create_model("cifar_resnet56").edgeprune_spec
    train = load_split("cifar10", spec, train=True)
    normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)])
    reference = DecodedImages(train.images, train.targets, train.classes,
                              T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), normalize]))

    def first_batches(ds):
        torch.manual_seed(7)
        return list(zip(range(2), loader(even_subset(ds, 300), 128, shuffle=True, seed=3), strict=False))
    batches, expected = first_batches(train), first_batches(reference)
    for (_, (x, y)), (_, (x_ref, y_ref)) in zip(batches, expected, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    plain = first_batches(DecodedImages(train.images, train.targets, train.classes, normalize))[0][1]
    assert torch.equal(plain[1], batches[0][1][1])  # the same images in the same order, not augmented
    moved = sum(not torch.equal(a, b) for a, b in zip(batches[0][1][0], plain[0], strict=True))
    assert moved > 100  # of 128: the batch was augmented, nearly every image moved by its crop or flip
    test = load_split("cifar10", spec, train=False)
    batch = torch.stack([x for x, _ in test.__getitems__([0, 1, 9_999])])
    assert torch.equal(batch, torch.stack([test[0][0], test[1][0], test[9_999][0]]))


def test_a_small_model_gets_its_size_from_images_of_any_size(tmp_path, monkeypatch):
    """A 32-pixel model on a folder of 48x40 and 32x32 images: each decoded once at 32x32 (shorter side, then
    centre crop), for training and evaluation alike."""
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", classes=10, per_class=1)
    odd = root / "val" / "class3" / "0.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # H 40, W 48
    Image.fromarray(pixels).save(odd)
    spec = create_model("cifar_resnet20").edgeprune_spec
    val, train = load_split(root, spec, train=False), load_split(root, spec, train=True)
    assert val.images.shape == (10, 3, 32, 32) and train[0][0].shape == (3, 32, 32)
    expected = TF.center_crop(TF.resize(Image.fromarray(pixels), 32, antialias=True), 32)
    assert torch.equal(val.images[3], torch.from_numpy(np.asarray(expected)).permute(2, 0, 1))
    assert torch.equal(val.images[4], torch.full((3, 32, 32), 20 * 4, dtype=torch.uint8))  # a 32x32 image as it is
    assert len(list((tmp_path / "cache" / "decoded").glob("val-*.npy"))) == 1


def test_imagenet_style_folders_resize_and_crop(tmp_path):
    make_folder(tmp_path, classes=2, per_class=2, size=300, split="test")
    spec = create_model("resnet18", num_classes=2).edgeprune_spec
    x, _ = load_split(tmp_path, spec, train=False)[0]
    assert x.shape == (3, 224, 224)


@pytest.mark.parametrize("setup,message", [
    (lambda root: None, "does not exist"),
    (lambda root: (root / "train").mkdir(parents=True), "no val/ or test/"),
    (lambda root: (root / "val").mkdir(parents=True), "no train/"),
    (lambda root: [(root / s).mkdir(parents=True) for s in ("train", "val")], "holds no images"),
    (lambda root: make_folder(root, classes=3), "has 3 classes but cifar_resnet20 outputs 10"),
])
def test_bad_datasets_are_clear_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(EdgePruneError, match=message):
        load_split(root, create_model("cifar_resnet20").edgeprune_spec, train=False)


def test_train_and_val_must_name_the_same_classes(tmp_path):
    make_folder(tmp_path, classes=10)
    (tmp_path / "val" / "class3").rename(tmp_path / "val" / "kitten")
    with pytest.raises(EdgePruneError, match="different class folders"):
        load_split(tmp_path, create_model("cifar_resnet20").edgeprune_spec, train=False)


def test_unreadable_image_is_named(tmp_path):
    make_folder(tmp_path, classes=10)
    (tmp_path / "val" / "class3" / "2.png").write_bytes(b"not a png")
    with pytest.raises(EdgePruneError, match=r"cannot read image .*class3/2.png"):
        load_split(tmp_path, create_model("cifar_resnet20").edgeprune_spec, train=False)


def test_an_error_raised_in_a_loader_worker_is_still_one_line():
    """With data.workers > 0 a worker's error reaches the main process through PyTorch's ExceptionWrapper, which
    rebuilds it with the worker's whole traceback as its message; the command prints the original line
    (errors.user_message). The wrapper is built here as a worker builds it: with a worker forked inside the test
    process (shut down only when garbage-collected) the full suite crashed with SIGSEGV in a later test."""
    from torch._utils import ExceptionWrapper

    from edgeprune.errors import user_message

    try:
        data_module._open_rgb("/nonexistent/class1/0.png")
    except EdgePruneError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(EdgePruneError) as info:
        wrapped.reraise()
    assert "Original Traceback" in str(info.value)
    line = user_message(info.value)
    assert "\n" not in line and line.startswith("cannot read image /nonexistent/class1/0.png")


def test_subsets_and_shards_cover_the_data_once():
    ds = list(range(100))
    assert [ds[i] for i in even_subset(ds, 10).indices] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    parts = [list(shard(ds, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == ds


def test_a_held_out_subset_shares_no_sample_with_the_calibration_one():
    ds = list(range(1000))
    calibration = set(even_subset(ds, 256).indices)
    held_out = even_subset(ds, 500, besides=256).indices
    assert len(held_out) == 500 and not calibration.intersection(held_out)
    assert held_out[0] < 10 and held_out[-1] > 990  # still spread over every class of a sorted folder
    assert len(even_subset(ds, None, besides=256)) == 744


def test_decoded_images_are_kept_on_disk_for_the_next_run_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", classes=10)
    spec = create_model("cifar_resnet20").edgeprune_spec
    first = load_split(root, spec, train=False)
    kept = list((tmp_path / "cache" / "decoded").glob("val-*.npy"))
    assert len(kept) == 1 and torch.equal(torch.from_numpy(np.load(kept[0])), first.images)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(data_module, "_DECODED", {})  # a new process: nothing in memory
    monkeypatch.setattr(data_module, "_open_rgb", no_decoding)
    again = load_split(root, spec, train=False)
    assert torch.equal(again.images, first.images) and torch.equal(again.targets, first.targets)
    (tmp_path / "link").symlink_to(root)  # the same folder by another path: the same entry
    monkeypatch.setattr(data_module, "_DECODED", {})
    monkeypatch.chdir(tmp_path)
    assert torch.equal(load_split("link", spec, train=False).images, first.images)
    assert len(list((tmp_path / "cache" / "decoded").glob("val-*.npy"))) == 1
    monkeypatch.undo()

    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    changed = root / "val" / "class3" / "2.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(changed)  # a replaced image: a new entry
    monkeypatch.setattr(data_module, "_DECODED", {})
    fresh = load_split(root, spec, train=False)
    assert len(list((tmp_path / "cache" / "decoded").glob("val-*.npy"))) == 2
    assert int(fresh.images[3 * 4 + 2].max()) == 7 and not torch.equal(fresh.images, first.images)

    for i, entry in enumerate((tmp_path / "cache" / "decoded").glob("val-*.npy")):
        entry.write_bytes(b"truncated" if i else b"")  # a damaged or empty entry is decoded again, and rewritten
    monkeypatch.setattr(data_module, "_DECODED", {})
    assert torch.equal(load_split(root, spec, train=False).images, fresh.images)
    entries = (tmp_path / "cache" / "decoded").glob("val-*.npy")
    assert sum(e.read_bytes() not in (b"", b"truncated") for e in entries) == 1  # the current entry, rewritten
