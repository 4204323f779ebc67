"""What a measurement ran on: CPU, GPU and library versions, recorded in every report."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
from pathlib import Path

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The x86 feature flags, or None where /proc/cpuinfo lists none (ARM says "Features")."""
    flags = _cpuinfo().get("flags")
    return None if flags is None else set(flags.split())


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """An x86 CPU with bfloat16 dot-product instructions (AVX512-BF16, or AMX tiles), where oneDNN runs bf16
    convolutions natively; elsewhere it emulates them, slower than FP32."""
    return bool((cpu_flags() or set()).intersection(BF16_FLAGS))


# The instructions that decide how fast edgeprune's CPU work runs: FP32 vector width, INT8 dot products (ONNX
# Runtime's u8s8 kernels, see quantize.cpu_lacks_vnni) and bf16 (fine-tuning under recover.amp).
CPU_FEATURES = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def environment() -> dict[str, str]:
    flags = cpu_flags()
    env = {"cpu": cpu_name(),
           **({} if flags is None else {"cpu_features": " ".join(f for f in CPU_FEATURES if f in flags) or "none"}),
           "torch": torch.__version__, "torch_pruning": _version("torch-pruning"),
           "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"), "openvino": _version("openvino")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env
