"""Every runtime x precision of two pruned models, with the unpruned model beside them: `edgeprune benchmark`.

    EDGEPRUNE_HOME=../shared/data python bench/runtimes.py [--models resnet50 cifar_resnet56] [--out runs/runtimes]

- resnet50: random init, `edgeprune prune --ratio 0.7` with no other option (round_to auto), FP32 only
  (no ImageNet here to calibrate INT8 or measure accuracy on);
- cifar_resnet56: the built-in default recipe (`edgeprune run`: the JPEG-adapted ResNet-56 to half its MACs
  by sensitivity allocation, BN re-calibration, one epoch of distillation, INT8), accuracy on all 10,000
  cifar10-jpeg test images.

Each model's rows come from one `edgeprune benchmark OUT --baseline` process (every runtime's rows timed
in turns); bench/results/runtimes.json holds the rows, the exact commands, the CPU and what each run's
report.json says of its pruning (MACs reduction, the channel multiple round_to auto chose), runtimes.md the
tables.
A finished run folder is reused (re-running finds every stage done).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "runtimes.json"
MODELS = {
    "resnet50": {"run": ["prune", "--model", "resnet50", "--weights", "none", "--ratio", "0.7",
                         "--set", "latency.per_layer=false"], "data": None},
    "cifar_resnet56": {"run": ["run"], "data": "cifar10"},
}


def edgeprune(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"edgeprune {shlex.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="runs/runtimes")
    args = parser.parse_args()
    from edgeprune.environment import environment
    from edgeprune.fsio import read_json, write_json, write_text
    from edgeprune.rows import benchmark, markdown, turns

    results = read_json(RESULTS) if RESULTS.exists() else {"models": {}}
    for name in args.models:
        out = str(Path(args.out) / name)
        run = [*MODELS[name]["run"], "--out", out, "-q"]
        edgeprune(*run)
        bench = ["benchmark", out, "--baseline", "-q"] + (["--data", MODELS[name]["data"]] if MODELS[name]["data"]
                                                            else [])
        edgeprune(*bench)
        stored = read_json(Path(out) / "benchmark.json")
        stored["commands"] = [shlex.join(["edgeprune", *run]), shlex.join(["edgeprune", *bench])]
        stored["environment"] = environment()
        report = read_json(Path(out) / "report.json")
        stored["pruning"] = {"macs_reduction_x": report["baseline"]["macs"] / report["pruned"]["macs"],
                             "rounding_chosen": (report["prune"].get("rounding") or {}).get("chosen")}
        results["models"][name] = stored
        results["command"] = shlex.join(["python", "bench/runtimes.py", *sys.argv[1:]])
        write_json(RESULTS, results)
    lines = ["# Every runtime and precision, side by side (`edgeprune benchmark`)", ""]
    for name, stored in results["models"].items():
        table = benchmark(stored)
        table.title = name
        pruning = stored.get("pruning")
        cpu = stored.get("environment", {}).get("cpu")
        lines += [f"Commands: `{stored['commands'][0]}`, then `{stored['commands'][1]}`. Batch "
                  f"{stored['batch_size']}, {stored['threads']} threads"
                  + (f" on {cpu}" if cpu else "")
                  + f", median (and p90) of {stored['repeats']} runs, {turns(stored)}"
                  + (f"; {pruning['macs_reduction_x']:.2f}x fewer MACs" if pruning else "")
                  + (f", round_to auto chose {pruning['rounding_chosen']}" if pruning and pruning["rounding_chosen"]
                     else "")
                  + "; max abs diff: outputs against the same model in PyTorch on one batch.", ""]
        lines += markdown(table)
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
