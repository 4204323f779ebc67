"""Detection datasets in the Ultralytics YOLO format: a `data.yaml` with `train`, `val`, `names` and an
optional `path`, images beside `labels/` folders of `class cx cy w h` lines.

Every split is checked once, before a run writes anything, with Ultralytics' own image and label
verification: a missing folder, a label whose class id is out of range or a corrupt image is one
line naming the file. Ultralytics' label cache goes under EDGEPRUNE_CACHE (~/.cache/edgeprune), never into the dataset.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..assets import cache_home, edgeprune_home
from ..errors import EdgePruneError
from ..models.yolo import ultralytics
from ..quiet import quiet_stdout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class DetectionData:
    yaml: Path
    train: tuple[str, ...]
    val: tuple[str, ...]
    names: dict[int, str]

    @property
    def nc(self) -> int:
        return len(self.names)

    def ultralytics_dict(self) -> dict:
        """The dataset dict Ultralytics' datasets and validator read."""
        return {"names": self.names, "nc": self.nc, "channels": 3, "train": list(self.train), "val": list(self.val),
                "yaml_file": str(self.yaml)}


def is_detection_data(path: str | None) -> bool:
    return bool(path) and str(path).endswith((".yaml", ".yml"))


def _split_paths(value, root: Path, key: str, source: Path) -> tuple[str, ...]:
    if value is None:
        raise EdgePruneError(f"{source} has no {key!r} entry; a YOLO data.yaml needs train, val and names")
    items = value if isinstance(value, list) else [value]
    paths = []
    for item in items:
        p = Path(str(item))
        p = p if p.is_absolute() else root / p
        if not p.exists():
            raise EdgePruneError(f"{source}: the {key} folder {p} does not exist; fix {key!r} (or 'path') in the YAML")
        if p.is_dir() and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*")):
            raise EdgePruneError(f"{source}: the {key} folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        paths.append(str(p.resolve()))  # the run may change folders later
    return tuple(paths)


def load_detection_data(path: str | Path) -> DetectionData:
    """Read and check a data.yaml (folders and class names; the files are checked by `check_split`)."""
    source = Path(path)
    if not source.is_file() and not source.is_absolute() and (edgeprune_home() / source).is_file():
        source = edgeprune_home() / source  # a dataset kept in EDGEPRUNE_HOME, like cifar10
    if not source.is_file():
        raise EdgePruneError(f"dataset {source} does not exist; pass the data.yaml of a YOLO-format dataset")
    try:
        cfg = yaml.safe_load(source.read_text())
    except yaml.YAMLError as exc:
        raise EdgePruneError(f"{source} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise EdgePruneError(f"{source} must be a mapping with train, val and names")
    names = cfg.get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise EdgePruneError(f"{source} has no class 'names' (a list or an index: name mapping)")
    names = {int(k): str(v) for k, v in names.items()}
    if sorted(names) != list(range(len(names))):
        raise EdgePruneError(f"{source}: class indices in 'names' must be 0..{len(names) - 1}")
    root = Path(str(cfg["path"])) if cfg.get("path") else Path(".")
    root = root if root.is_absolute() else (source.parent / root)  # relative to the data.yaml's folder
    if not root.is_dir():
        raise EdgePruneError(f"{source}: the dataset root {root} ('path') does not exist")
    return DetectionData(yaml=source.resolve(), train=_split_paths(cfg.get("train"), root, "train", source),
                         val=_split_paths(cfg.get("val"), root, "val", source), names=names)


def _cache_folder() -> Path:
    folder = cache_home() / "ultralytics" / "label-caches"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def dataset(data: DetectionData, split: str, imgsz: int, train: bool = False, hyp=None):
    """Ultralytics' YOLODataset for a split: letterboxed images (train: its augmentation, `hyp`).
    Images or labels Ultralytics finds corrupt stop the run with one line."""
    ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset

    found: dict = {}

    class _Dataset(YOLODataset):
        def _load_or_scan_cache(self, cache_path, cache_hash):
            key = hashlib.sha256(str(Path(cache_path).resolve()).encode()).hexdigest()[:16]
            cache, exists = super()._load_or_scan_cache(_cache_folder() / f"{key}.cache", cache_hash)
            found.update(results=cache["results"], msgs=list(cache.get("msgs", [])))
            return cache, exists

    hyp = hyp or get_cfg(overrides={"imgsz": imgsz, "task": "detect", "mode": "val"})
    paths = list(data.train if split == "train" else data.val)
    try:
        with quiet_stdout():
            ds = _Dataset(img_path=paths if len(paths) > 1 else paths[0], imgsz=imgsz, batch_size=32, augment=train,
                          hyp=hyp, rect=False, cache=None, single_cls=False, stride=32, pad=0.0 if train else 0.5,
                          prefix=f"{split}: ", task="detect", classes=None, data=data.ultralytics_dict(),
                          fraction=1.0)
    except (RuntimeError, FileNotFoundError) as exc:  # no valid images: Ultralytics says why on its lines
        raise EdgePruneError(f"{data.yaml}: no usable {split} images ({str(exc).splitlines()[-1].strip()})") from exc
    corrupt = found.get("results", (0, 0, 0, 0, 0))[3]
    if corrupt:
        bad = [m for m in found.get("msgs", []) if "ignoring corrupt" in m or "exceeds" in m]
        first = bad[0].split(": ", 1)[-1] if bad else "see the Ultralytics scan"
        raise EdgePruneError(f"{data.yaml}: {corrupt} corrupt {split} image(s) or label(s), e.g. {first}; fix or "
                             "remove them")
    return ds


def loader(ds, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0):
    """A DataLoader with Ultralytics' collate (boxes with their batch index)."""
    import torch
    from torch.utils.data import DataLoader
    from ultralytics.data.dataset import YOLODataset

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=YOLODataset.collate_fn, generator=gen, drop_last=False)
