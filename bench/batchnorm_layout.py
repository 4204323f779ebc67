"""Why fine-tuning trains some BatchNorm layers through edgeprune's own batch norm: PyTorch's CPU batch norm (forward
and backward, training mode) in the channels-last layout, the same in the contiguous layout with the copies there
and back (what fine-tuning did until 2026-12-01 below 16 channels), and `batchnorm.packed_batch_norm` (what it
does now on AVX-512 CPUs at every width not a multiple of 16: `recover.packed_batchnorms`), at the widths of the
CIFAR ResNet-56 and of its pruned versions.

    python bench/batchnorm_layout.py [--widths 4 5 8 11 16 23 24 32 33 45 48 64] [--repeats 10]

Batch 128 at 32x32, 2 threads, FP32 and bf16 input (FP32 affine parameters, as under autocast); the median of
`--repeats` runs after 3 warm-ups, the three timed in turns (one run of each per turn). Writes
bench/results/batchnorm_layout.json and .md with the command.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from edgeprune.batchnorm import packed_batch_norm
from edgeprune.environment import environment
from edgeprune.fsio import write_json, write_text

RESULTS = Path(__file__).parent / "results" / "batchnorm_layout.json"


WAYS = ("channels_last", "contiguous_with_copies", "packed")


def step_ms(width: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """One forward and backward of a training-mode BatchNorm2d on a channels-last batch, each way: as it stands,
    copied to contiguous and back around it, and through packed_batch_norm; median ms of each."""
    bn = torch.nn.BatchNorm2d(width).train()
    x = torch.randn(128, width, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)
    forwards = {"channels_last": bn, "contiguous_with_copies":
                lambda t: bn(t.contiguous()).contiguous(memory_format=torch.channels_last),
                "packed": lambda t: packed_batch_norm(bn, t)}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for turn in range(3 + repeats):
        for way in WAYS:
            t0 = time.perf_counter()
            forwards[way](x).backward(grad)
            if turn >= 3:
                times[way].append((time.perf_counter() - t0) * 1e3)
    return {way: statistics.median(t) for way, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 5, 8, 11, 16, 23, 24, 32, 33, 45, 48, 64])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for width in args.widths:
            ms = step_ms(width, dtype, args.repeats)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "width": width,
                         **{f"{way}_ms": round(ms[way], 2) for way in WAYS},
                         "ratio": round(ms["channels_last"] / ms["contiguous_with_copies"], 2),
                         "packed_speedup": round(ms["channels_last"] / ms["packed"], 2)})
            print(rows[-1], flush=True)
    command = "python " + shlex.join(["bench/batchnorm_layout.py", *sys.argv[1:]])
    results = {"command": command, "environment": environment(),
               "capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
    write_json(RESULTS, results)
    lines = ["# BatchNorm on the CPU: channels-last, contiguous (with the copies) and packed", "", f"`{command}`", "",
             f"{results['environment']['cpu']} ({results['capability']}), 2 threads, batch 128 at 32x32, forward and "
             "backward in training mode, median ms.", "",
             "| dtype | width | channels-last ms | contiguous + copies ms | packed ms | channels-last / contiguous | "
             "channels-last / packed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['width']} | {r['channels_last_ms']:.2f} | {r['contiguous_with_copies_ms']:.2f} | "
              f"{r['packed_ms']:.2f} | {r['ratio']:.2f}x | {r['packed_speedup']:.2f}x |" for r in rows]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
