import hashlib

import pytest

from edgeprune import assets
from edgeprune.errors import EdgePruneError


def test_known_assets_resolve_from_edgeprune_home(data_dir):
    path = assets.resolve_asset("cifar_resnet56")
    assert path == data_dir / "resnet56-4bfd9763.th"
    assert assets.sha256_of(path) == assets.ASSETS["cifar_resnet56"]["default"].sha256
    jpeg = assets.resolve_asset("cifar_resnet56", "cifar10-jpeg")
    assert assets.sha256_of(jpeg) == assets.ASSETS["cifar_resnet56"]["cifar10-jpeg"].sha256


def test_download_checks_sha256_and_writes_whole_files(tmp_path, monkeypatch):
    source = tmp_path / "src.th"
    source.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEPRUNE_HOME", str(home))
    monkeypatch.setitem(assets.ASSETS, "toy", {"default": assets.Asset("toy.th", source.as_uri(), digest)})
    assert assets.resolve_asset("toy").read_bytes() == source.read_bytes()

    monkeypatch.setitem(assets.ASSETS, "bad", {"default": assets.Asset("bad.th", source.as_uri(), "0" * 64)})
    with pytest.raises(EdgePruneError, match="sha256"):
        assets.resolve_asset("bad")
    assert sorted(p.name for p in home.iterdir()) == ["toy.th"]  # nothing half-written left


def test_unreachable_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_HOME", str(tmp_path))
    monkeypatch.setitem(assets.ASSETS, "gone", {"default": assets.Asset("gone.th", (tmp_path / "x.th").as_uri(), "0"),
                                                "local": assets.Asset("local.th", None, "0")})
    with pytest.raises(EdgePruneError, match="could not be downloaded.*EDGEPRUNE_HOME"):
        assets.resolve_asset("gone")
    with pytest.raises(EdgePruneError, match="no public download"):
        assets.resolve_asset("gone", "local")
    with pytest.raises(EdgePruneError, match="known: default, local"):
        assets.resolve_asset("gone", "imagenet")
    assert list(tmp_path.iterdir()) == []
