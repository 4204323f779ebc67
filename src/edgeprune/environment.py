"""What a measurement ran on: CPU, GPU and library versions, recorded in every report."""
from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    env = {"cpu": cpu_name(), "torch": torch.__version__, "torch_pruning": _version("torch-pruning"),
           "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env
