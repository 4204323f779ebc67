"""Why fine-tuning runs some BatchNorm layers contiguous: PyTorch's CPU batch norm (forward and backward, training
mode) in the channels-last layout against the contiguous one with the two copies edgeprune's hooks add
(`recover._contiguous_batchnorms`), at the widths of the CIFAR ResNet-56 and of its pruned versions.

    python bench/batchnorm_layout.py [--widths 4 5 8 11 16 23 32 45 64] [--repeats 10]

Batch 128 at 32x32, 2 threads, FP32 and bf16 input (FP32 affine parameters, as under autocast); the median of
`--repeats` runs after 3 warm-ups, the two layouts timed in turn. Writes bench/results/batchnorm_layout.json and .md
with the command.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from edgeprune.environment import environment
from edgeprune.fsio import write_json, write_text

RESULTS = Path(__file__).parent / "results" / "batchnorm_layout.json"


def step_ms(width: int, dtype: torch.dtype, copies: bool, repeats: int) -> float:
    """One forward and backward of a training-mode BatchNorm2d on a channels-last batch, as it stands
    (copies False) or copied to contiguous and back around it (copies True), in ms (median)."""
    bn = torch.nn.BatchNorm2d(width).train()
    x = torch.randn(128, width, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)

    def run():
        y = bn(x.contiguous()).contiguous(memory_format=torch.channels_last) if copies else bn(x)
        y.backward(grad)

    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 5, 8, 11, 16, 23, 32, 45, 64])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for width in args.widths:
            cl, contiguous = (step_ms(width, dtype, copies, args.repeats) for copies in (False, True))
            rows.append({"dtype": str(dtype).removeprefix("torch."), "width": width, "channels_last_ms": round(cl, 2),
                         "contiguous_with_copies_ms": round(contiguous, 2), "ratio": round(cl / contiguous, 2)})
            print(rows[-1], flush=True)
    command = "python " + shlex.join(["bench/batchnorm_layout.py", *sys.argv[1:]])
    results = {"command": command, "environment": environment(),
               "capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
    write_json(RESULTS, results)
    lines = ["# BatchNorm on the CPU: channels-last against contiguous (with the copies)", "", f"`{command}`", "",
             f"{results['environment']['cpu']} ({results['capability']}), 2 threads, batch 128 at 32x32, forward and "
             "backward in training mode, median ms.", "",
             "| dtype | width | channels-last ms | contiguous + copies ms | channels-last / contiguous |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['width']} | {r['channels_last_ms']:.2f} | {r['contiguous_with_copies_ms']:.2f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
