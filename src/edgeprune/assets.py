"""Known downloadable assets (pretrained weights), resolved from the cache folder EDGEPRUNE_HOME."""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgePruneError
from .fsio import atomic_path

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


@dataclass(frozen=True)
class Asset:
    filename: str
    url: str | None  # None: not published; it must already be in EDGEPRUNE_HOME
    sha256: str  # full digest, or a prefix where only the prefix is published (in the file name)


def _akamaster(filename: str, sha256: str) -> Asset:
    return Asset(filename, _AKAMASTER + filename, sha256)


# {model: {weights tag: asset}}. "default" is what `--weights default` loads.
# akamaster checkpoints: BSD-2-Clause, Copyright (c) 2018, Yerlan Idelbayev.
# "cifar10-jpeg": the same checkpoints fine-tuned on the JPEG copy of CIFAR-10 (shared data README).
ASSETS: dict[str, dict[str, Asset]] = {
    "cifar_resnet20": {
        "default": _akamaster(
            "resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
        "cifar10-jpeg": Asset("resnet20-cifar10jpeg.pth", None,
                              "ab3d71bb5cc022e59044a98d2a39497fa8e2c4f84280cb35b9a0ea8ec593058a"),
    },
    "cifar_resnet32": {
        "default": _akamaster(
            "resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    },
    "cifar_resnet44": {
        "default": _akamaster(
            "resnet44-014dd654.th", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    },
    "cifar_resnet56": {
        "default": _akamaster(
            "resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
        "cifar10-jpeg": Asset("resnet56-cifar10jpeg.pth", None,
                              "e9328ee872642418f7333697c41c4c1ef54d77b8fffa6f79bd567d2088f53d8b"),
    },
    # A YOLOv8n trained on cifar10-det (shared data README); a safetensors state dict, no pickle.
    "yolov8n.yaml": {
        "cifar10-det": Asset("yolov8n-cifar10det.safetensors", None,
                             "c9710fd65ab6bedbeff09aee8613098d69666f80899b730c8977afe3e3bacb44"),
    },
    "cifar_resnet110": {"default": _akamaster(
            "resnet110-1d1ed7c2.th", "1d1ed7c2")},
}


def edgeprune_home() -> Path:
    return Path(os.environ.get("EDGEPRUNE_HOME", Path.home() / ".cache" / "edgeprune")).expanduser()


def cache_home() -> Path:
    """Where edgeprune keeps what it writes for itself (Ultralytics' settings and label caches):
    EDGEPRUNE_CACHE, else ~/.cache/edgeprune. Not EDGEPRUNE_HOME, which may be a read-only data folder."""
    return Path(os.environ.get("EDGEPRUNE_CACHE", Path.home() / ".cache" / "edgeprune")).expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_asset(name: str, tag: str = "default") -> Path:
    """Path of a known asset in EDGEPRUNE_HOME, downloading it (checked by sha256) when missing."""
    asset = ASSETS.get(name, {}).get(tag)
    if asset is None:
        known = ", ".join(ASSETS.get(name, {})) or "none"
        raise EdgePruneError(f"no weights {tag!r} are known for {name} (known: {known}); pass --weights PATH or none")
    home = edgeprune_home()
    path = home / asset.filename
    if not path.exists():
        if asset.url is None:
            raise EdgePruneError(f"{asset.filename} is not in {home} and has no public download; set "
                                 "EDGEPRUNE_HOME to the folder holding it")
        _download(asset, path)
    return path


# what a failed download raises; other OSErrors (a full disk) are not a download problem and keep their traceback
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _download(asset: Asset, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            with urllib.request.urlopen(asset.url, timeout=60) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            got = sha256_of(tmp)
            if not got.startswith(asset.sha256):
                raise EdgePruneError(
                    f"download of {asset.url} has sha256 {got[:16]}..., expected {asset.sha256[:16]}...; "
                    "retry, or place the right file in EDGEPRUNE_HOME"
                )
    except NETWORK_ERRORS as exc:
        raise EdgePruneError(
            f"{asset.filename} is not in {path.parent} and could not be downloaded from {asset.url} ({exc}); "
            "download it by hand into EDGEPRUNE_HOME"
        ) from None
    except PermissionError as exc:
        raise unwritable(asset.filename, path.parent, exc) from None


def unwritable(what: str, folder: Path, exc: PermissionError) -> EdgePruneError:
    """A download that cannot be written where edgeprune keeps it."""
    return EdgePruneError(f"cannot write {what} into {folder} ({exc.strerror}); set EDGEPRUNE_HOME to a folder you "
                          "can write")
