"""Which torchvision classifiers (and timm/NAME or other models given with --models) edgeprune prunes at
ratio 0.5: each model runs `edgeprune prune` in its own process (random init, so no download), and the
outcome is its exit status and last error line.

    python bench/torchvision_compat.py [--models resnet18 vgg11 ...] [--timeout 900]

Writes bench/results/torchvision_compat.json and .md. Models not named in --models keep their rows
from earlier runs, so each row records the exact `edgeprune prune` subprocess command it ran
(`command`) and the bench command line that checked it (`bench_command`); the top-level `command`
is the latest run's.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torchvision

RESULTS = Path(__file__).parent / "results"


def check(name: str, timeout: int, bench_command: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "edgeprune", "prune", "--model", name, "--weights", "none",
               "--ratio", "0.5", "--out", out, "--warmup", "0", "--repeats", "1", "--quiet", "--json"]
        ran = {"command": shlex.join(cmd), "bench_command": bench_command}
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "status": "timeout", "seconds": timeout, "message": f"over {timeout} s", **ran}
        seconds = round(time.time() - t0, 1)
        if proc.returncode == 0:
            report = json.loads(proc.stdout)
            return {"model": name, "status": "ok", "seconds": seconds,
                    "macs_reduction_pct": report["reduction_pct"]["macs"],
                    "params_reduction_pct": report["reduction_pct"]["params"],
                    "max_abs_diff": report["onnx_parity"]["max_abs_diff"],
                    "unpruned_layers": len(report["prune"]["unpruned"]), **ran}
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        status = "refused" if lines and lines[-1].startswith("edgeprune: error:") and len(lines) <= 3 else "crash"
        return {"model": name, "status": status, "seconds": seconds, "message": lines[-1] if lines else "", **ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    command = ("python bench/torchvision_compat.py " + shlex.join(sys.argv[1:])).strip()
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / "torchvision_compat.json"
    by_model = {r["model"]: r for r in json.loads(previous.read_text())["rows"]} if previous.exists() else {}
    for name in names:  # re-checked models replace their earlier rows
        by_model[name] = check(name, args.timeout, command)
        print(json.dumps(by_model[name]), flush=True)
    rows = [by_model[n] for n in sorted(by_model)]
    (RESULTS / "torchvision_compat.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "refused", "timeout", "crash")}
    unchecked = sorted(set(torchvision.models.list_models(module=torchvision.models)) - set(by_model))
    lines = ["# torchvision classifiers (and timm/NAME ones named with --models) at channel ratio 0.5", "",
             f"Command: `{command}`", ""]
    earlier = sorted({r["bench_command"] for r in rows if r.get("bench_command", command) != command})
    undocumented = sum("command" not in r for r in rows)
    if earlier or undocumented:
        note = "Rows of models this command did not check are kept from earlier runs"
        if earlier:
            note += " (" + ", ".join(f"`{c}`" for c in earlier) + ")"
        if undocumented:
            note += (f"; {undocumented} rows predate the recording of per-model commands, so the exact command "
                     "behind them is not known")
        lines += [note + ". torchvision_compat.json records, per row, the `edgeprune prune` subprocess command "
                  "(`command`) and the bench command that ran it (`bench_command`).", ""]
    lines += ["Each model: random init, `edgeprune prune --ratio 0.5` (prune, ONNX export, parity, measure) in its "
              "own process on 2 CPU cores. ok: pruned, runs, exports with parity; refused: stopped with a one-line "
              "reason; timeout: not finished within the time limit here.", "",
              f"Counts: {counts['ok']} ok, {counts['refused']} refused, {counts['timeout']} timeout, "
              f"{counts['crash']} crash; not checked yet: {', '.join(unchecked) or 'none'}.", "",
              "| model | status | MACs -% | params -% | ONNX max abs diff | seconds | message |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['status']} | {r.get('macs_reduction_pct', '')} | "
                     f"{r.get('params_reduction_pct', '')} | "
                     f"{format(r['max_abs_diff'], '.1e') if 'max_abs_diff' in r else ''} | {r['seconds']} | "
                     f"{r.get('message', '').replace('|', '/')} |")
    (RESULTS / "torchvision_compat.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
