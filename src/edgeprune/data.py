"""Datasets a user has: an ImageFolder tree (train/ + val/ or test/) or CIFAR-10, with the transforms
the model expects (its input size and mean/std come from its ModelSpec).

Small images (CIFAR-sized) are decoded once into memory and augmented as tensors: on two cores,
decoding every JPEG every epoch would cost more than the fine-tuning step of a pruned model. The decoded
array is kept in EDGEPRUNE_CACHE/decoded/ (default ~/.cache/edgeprune), keyed by every file's path, size
and modification time, so the next run loads it instead of decoding again (CIFAR-10's 60,000 JPEGs: ~12 s here).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from .assets import NETWORK_ERRORS, cache_home, edgeprune_home, unwritable
from .errors import EdgePruneError
from .fsio import atomic_path
from .models import ModelSpec

EVAL_SPLITS = ("val", "test")
SMALL_IMAGE = 64  # images up to this size are decoded once into memory


@dataclass
class DataSource:
    kind: str  # "folder" or "cifar10"
    root: Path


def resolve(data: str | os.PathLike) -> DataSource:
    """`cifar10` (the JPEG ImageFolder copy or torchvision's files in EDGEPRUNE_HOME, else a download)
    or the path of an ImageFolder root."""
    if str(data).lower() == "cifar10":
        home = edgeprune_home()
        if (home / "cifar10-jpeg" / "train").is_dir():
            return DataSource("folder", home / "cifar10-jpeg")
        return DataSource("cifar10", home / "cifar10")
    root = Path(data)
    if not root.is_dir():
        raise EdgePruneError(f"dataset folder {root} does not exist; pass an ImageFolder root or cifar10")
    return DataSource("folder", root)


def _eval_dir(root: Path) -> Path:
    for split in EVAL_SPLITS:
        if (root / split).is_dir():
            return root / split
    raise EdgePruneError(f"{root} has no val/ or test/ folder; an ImageFolder root holds train/ and val/ (or test/)")


def _folder(path: Path) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(str(path))
    except FileNotFoundError as exc:
        raise EdgePruneError(f"{path} holds no images ({str(exc).splitlines()[0]}); it needs one sub-folder "
                             "of images per class") from None


def _check_same_classes(root: Path) -> list[str]:
    """train/ and val/ must name the same classes, or labels would mean different things in each; the classes."""
    if not (root / "train").is_dir():
        raise EdgePruneError(f"{root} has no train/ folder; an ImageFolder root holds train/ and val/ (or test/)")
    train = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    held_out = _eval_dir(root)
    other = sorted(d.name for d in held_out.iterdir() if d.is_dir())
    if train != other:
        diff = sorted(set(train) ^ set(other))[:3]
        raise EdgePruneError(f"{root}/train and {held_out} have different class folders (e.g. {diff}); labels "
                             "would not match between them")
    return train


def check_classification_data(data: str | os.PathLike, spec: ModelSpec) -> None:
    """What can be checked of a classifier's dataset without reading an image, before a run prunes: the folder,
    its train/ and val/ (or test/) splits naming the same classes, as many as the model outputs."""
    source = resolve(data)
    if source.kind == "folder":  # torchvision's CIFAR-10 files are checked (or downloaded) when first read
        _check_class_count(len(_check_same_classes(source.root)), spec)


def _check_class_count(classes: int, spec: ModelSpec) -> None:
    if classes != spec.num_classes:
        raise EdgePruneError(f"the dataset has {classes} classes but {spec.name} outputs {spec.num_classes}; "
                             "pass --num-classes or the matching dataset")


class DecodedImages(Dataset):
    """Every image decoded once into a uint8 tensor; transforms run on tensors."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str], transform):
        self.images, self.targets, self.classes, self.transform = images, targets, classes, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.targets[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A DataLoader's batch (Subset passes its batches on here): with `SmallImageTransform`, transformed
        as one batch, equal to its images transformed one by one."""
        if not isinstance(self.transform, SmallImageTransform):
            return [self[i] for i in indices]
        return list(zip(self.transform.batch(self.images[indices]), self.targets[indices].tolist(), strict=True))


class SmallImageTransform:
    """The transforms of decoded CIFAR-sized uint8 images: torchvision's pad-and-crop (zero padding of size // 8)
    and horizontal flip when augmenting, then scaling to [0, 1] and normalizing. `batch` transforms a whole batch:
    the padding, the scaling and the normalizing run once on it, and each image is cropped and flipped by slicing
    (the rate bench's loader: 22,537 img/s against 7,379 image by image on 2 cores, bench/results/allocation.md;
    about 2% of a pruned ResNet-56's FP32 fine-tuning step, and of every evaluation's time). Each image's crop and
    flip are drawn from torch's generator as torchvision draws them for one image, in the same order, so a batch
    is bit-identical to its images transformed one by one (tests/test_data.py), and a fine-tune under a seed is
    what it was when the DataLoader fetched images singly."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], augment: bool):
        self.size, self.padding = size, size // 8
        self.crop = T.RandomCrop(size, padding=self.padding) if augment else None
        self.flip = T.RandomHorizontalFlip() if augment else None
        self.tail = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.crop is not None and self.flip is not None:
            image = self.flip(self.crop(image))
        return self.tail(image)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, C, size, size) float32."""
        if self.crop is not None and self.flip is not None:
            padded = TF.pad(images, [self.padding], fill=0)
            out = images.new_empty((len(images), images.shape[1], self.size, self.size))
            for i, image in enumerate(images):
                params = self.crop.make_params([image])  # draws top, then left, as RandomCrop does
                top, left = params["top"], params["left"]
                crop = padded[i, :, top:top + self.size, left:left + self.size]
                # RandomHorizontalFlip's draw: it leaves the image as it is when torch.rand(1) >= p
                out[i] = TF.horizontal_flip(crop) if torch.rand(1) < self.flip.p else crop
            images = out
        return self.tail(images)


_DECODED: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, list[str]]] = {}


def _decode_folder(folder: torchvision.datasets.ImageFolder, size: int, quiet: bool):
    key = (str(Path(folder.root).resolve()), size)
    if key not in _DECODED:
        cached = _decoded_cache(folder, size)
        images = _load_decoded(cached, len(folder.samples), size)
        if images is None:
            images = _decode(folder, size, quiet)
            _save_decoded(cached, images)
        _DECODED[key] = (images, torch.tensor(folder.targets), folder.classes)
    return _DECODED[key]


def _decode(folder: torchvision.datasets.ImageFolder, size: int, quiet: bool) -> torch.Tensor:
    """Every image as (N, 3, size, size) uint8: an image of another size (or shape) is resized, its shorter side
    to `size`, and centre-cropped, as the evaluation transform of larger models does."""
    arrays = []
    for path, _ in tqdm(folder.samples, desc=f"decoding {Path(folder.root).name}", disable=quiet, leave=False):
        image = _open_rgb(path)
        if image.size != (size, size):
            image = TF.center_crop(TF.resize(image, size, antialias=True), size)
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decoded_cache(folder: torchvision.datasets.ImageFolder, size: int) -> Path:
    """The cache file of `folder`'s images decoded at `size`: named by the folder's real path and every file's
    path in it, class, size and mtime, so any image added, removed, replaced or touched makes a new entry, and the
    same folder reached through a relative path or a link finds the same one."""
    digest = hashlib.sha256(f"{Path(folder.root).resolve()}\0{size}".encode())
    for path, target in folder.samples:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder.root)}\0{target}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cache_home() / "decoded" / f"{Path(folder.root).name}-{digest.hexdigest()[:32]}.npy"


def _load_decoded(path: Path, count: int, size: int) -> torch.Tensor | None:
    """The cached images (N, 3, size, size uint8), or None when absent or unreadable (decoded again, then)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # absent, empty or truncated (a crash, a full disk), or not an array
        return None
    if array.dtype != np.uint8 or array.shape != (count, 3, size, size):
        return None
    return torch.from_numpy(array)


def _save_decoded(path: Path, images: torch.Tensor) -> None:
    """Keep the decoded images for the next run; a cache that cannot be written only costs that run time."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, images.numpy(), allow_pickle=False)
    except OSError:
        pass


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise EdgePruneError(f"cannot read image {path} ({exc}); remove or replace it") from None


def _transforms(spec: ModelSpec, train: bool, decoded: bool):
    size = spec.input_size[-1]
    if size <= SMALL_IMAGE and decoded:  # CIFAR style: no resize; pad-and-crop + flip for training
        return SmallImageTransform(size, spec.mean, spec.std, augment=train)
    tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)]
    head = [] if decoded else [T.PILToTensor()]
    if size <= SMALL_IMAGE:
        aug = [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()] if train else []
        return T.Compose([*head, *aug, *tail])
    if train:  # ImageNet style
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *head, *tail])
    return T.Compose([T.Resize(int(round(size / 0.875))), T.CenterCrop(size), *head, *tail])


class _PILFolder(Dataset):
    def __init__(self, folder: torchvision.datasets.ImageFolder, transform):
        self.folder, self.transform, self.classes = folder, transform, folder.classes

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i):
        path, target = self.folder.samples[i]
        return self.transform(_open_rgb(path)), target


def load_split(data: str | os.PathLike, spec: ModelSpec, train: bool, quiet: bool = True) -> Dataset:
    """The train split (augmented) or the evaluation split (val/ or test/) for a model."""
    source = resolve(data)
    if source.kind == "cifar10":
        try:
            raw = torchvision.datasets.CIFAR10(str(source.root), train=train, download=True)
        except (*NETWORK_ERRORS, RuntimeError) as exc:  # RuntimeError: torchvision found it corrupted
            raise EdgePruneError(f"CIFAR-10 is not in {source.root} and could not be downloaded ({exc}); "
                                 "set EDGEPRUNE_HOME to a folder holding it") from None
        except PermissionError as exc:
            raise unwritable("CIFAR-10", source.root, exc) from None
        images = torch.from_numpy(raw.data).permute(0, 3, 1, 2).contiguous()
        ds = DecodedImages(images, torch.tensor(raw.targets), raw.classes, _transforms(spec, train, True))
    else:
        _check_same_classes(source.root)
        folder = _folder(source.root / "train" if train else _eval_dir(source.root))
        if len(folder.samples) == 0:
            raise EdgePruneError(f"{folder.root} holds no images")
        if spec.input_size[-1] <= SMALL_IMAGE:
            images, targets, classes = _decode_folder(folder, spec.input_size[-1], quiet)
            ds = DecodedImages(images, targets, classes, _transforms(spec, train, True))
        else:
            ds = _PILFolder(folder, _transforms(spec, train, False))
    _check_class_count(len(ds.classes), spec)
    return ds


def unaugmented(ds: Dataset, spec: ModelSpec) -> Dataset:
    """The same images with the evaluation transforms (INT8 calibration on training images)."""
    if isinstance(ds, DecodedImages):
        return DecodedImages(ds.images, ds.targets, ds.classes, _transforms(spec, False, True))
    return _PILFolder(ds.folder, _transforms(spec, False, False))


def _even(indices: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None or limit >= len(indices):
        return indices
    return indices[np.linspace(0, len(indices) - 1, limit).round().astype(int)]


def even_subset(ds: Dataset, limit: int | None, besides: int | None = None) -> Dataset:
    """`limit` samples spread evenly over `ds` (every class, for class-sorted folders). `besides`: none of
    the samples `even_subset(ds, besides)` picks (held-out images next to a calibration subset)."""
    if besides is None and (limit is None or limit >= len(ds)):
        return ds
    indices = np.arange(len(ds))
    if besides is not None:
        indices = np.setdiff1d(indices, _even(indices, besides))
    return Subset(ds, _even(indices, limit).tolist())


def shard(ds: Dataset, rank: int, world_size: int) -> Dataset:
    """This process's share of `ds` under torchrun (every world_size-th sample, no padding)."""
    return Subset(ds, list(range(rank, len(ds), world_size))) if world_size > 1 else ds


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, limit: int | None = None,
           seed: int = 0) -> DataLoader:
    """A DataLoader; `limit` keeps an evenly spread subset (for calibration and quick runs)."""
    ds = even_subset(ds, limit)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=generator, drop_last=False,
                      persistent_workers=workers > 0)
