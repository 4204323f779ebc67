"""Shared fixtures: real data and weights from ../shared/data (or $EDGEPRUNE_TEST_DATA), never copies.

Missing data is a failure, not a skip: CI must not pass by testing nothing.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDGEPRUNE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()
REQUIRED = ["resnet20-12fca82f.th", "resnet56-4bfd9763.th", "resnet20-cifar10jpeg.pth",
            "resnet56-cifar10jpeg.pth", "cifar10_test_jpeg_uint8.npz", "yolov8n-cifar10det.safetensors",
            "yolov8n-cifar10det.pt", "cifar10-det/data.yaml"]

missing = [f for f in REQUIRED if not (DATA / f).exists()]
if missing:
    raise pytest.UsageError(f"test data missing in {DATA}: {missing}; set EDGEPRUNE_TEST_DATA to the shared "
                            "data folder")
os.environ["EDGEPRUNE_HOME"] = str(DATA)
# What edgeprune caches for itself (decoded images, Ultralytics' label caches): fresh for each session, so that
# the first run decodes for real, and shared by every test and CLI process after it
_CACHE = tempfile.mkdtemp(prefix="edgeprune-test-cache-")
os.environ["EDGEPRUNE_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def cifar_test_subset():
    """500 real CIFAR-10 test images (50 a class), normalized as the CIFAR checkpoints expect."""
    arrays = np.load(DATA / "cifar10_test_jpeg_uint8.npz")
    x = torch.from_numpy(arrays["x"][::20]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(arrays["y"][::20]).long()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `edgeprune` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "EDGEPRUNE_HOME": str(DATA)})


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`edgeprune ARGS` run by the console script's own `main()` in this process: the same parsing, checks and
    error printing as `run_cli` without starting an interpreter (about 9 s of imports here). For commands that
    stop on a mistake; whole runs, kills, torchrun and `--debug` use real subprocesses."""
    from edgeprune.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, here = sys.argv, Path.cwd()
    sys.argv = ["edgeprune", *args]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["edgeprune", *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("edgeprune: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
