"""YOLOv8n on cifar10-det: edgeprune's recovery against plain Ultralytics fine-tuning, and the control.

    EDGEPRUNE_HOME=../shared/data python bench/detection.py [--variants ours-1.5x plain-1.5x control ours-2x
        plain-2x ours-1.8x-r8 plain-1.8x-r8] [--epochs 10]

Variants (same data, seed, epoch budget, batch 32, imgsz 256, 2 CPU threads):
- ours-<f>x:  `edgeprune run` of the shipped recipe (src/edgeprune/recipes/yolov8n-cifar10det.yaml) at
  <f>x fewer MACs (channel ratio 0.2: 1.58x, 0.3: 2.08x; 1.8x-r8: ratio 0.2 with widths rounded down to
  multiples of 8, 1.82x): prune, BN re-calibration, fine-tuning with
  distillation, ONNX, INT8, latency; ours-1.5x-fp32 fine-tunes in FP32 (no bf16 autocast, channels-last or
  packed batch norm), as every detector did before 2026-12-01;
- plain-<f>x: the same pruned model (edgeprune.prune, same options) fine-tuned by Ultralytics' own
  DetectionTrainer with its defaults (bench/yolo_plain.py), no re-calibration and no distillation;
- control:    the unpruned detector fine-tuned with the shipped recipe and budget (it is not trained to
  convergence, so extra epochs help any model).
Each variant is appended to bench/results/detection.json (and .md) as soon as it finishes, with the
exact command and the machine (a variant measured again on the same CPU replaces its row, one from another CPU
stays); mAP is Ultralytics' validator on all 500 val images at 256.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from detection_train_rate import SETTINGS as TRAIN_SETTINGS  # a sibling bench

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "detection.json"
RECIPE = HERE.parent / "src" / "edgeprune" / "recipes" / "yolov8n-cifar10det.yaml"
# the pruning of each variant suffix: 1.58x, 2.08x, and 1.82x fewer MACs with widths rounded down to multiples
# of 8 (ONNX Runtime's blocked CPU layout then serves every conv); 2x-auto: ratio 0.3 with round_to auto (each
# width rounded to a multiple of 1, 8, 16 or 32 keeping the ratio's MACs within 5%, the fastest on ONNX Runtime kept)
# 1.5x-fp32: 1.5x fine-tuned as detectors were before recover.amp, channels_last and packed_batchnorm applied to
# them (FP32, contiguous, PyTorch's batch norm: the rate bench's first setting); a plain- variant ignores them
FP32 = {f"recover.{k}": v for k, v in TRAIN_SETTINGS["fp32 contiguous"].items()}
PRUNING = {"1.5x": {"prune.ratio": 0.2}, "1.5x-fp32": {"prune.ratio": 0.2, **FP32}, "2x": {"prune.ratio": 0.3},
           "1.8x-r8": {"prune.ratio": 0.2, "prune.round_to": 8},
           "2x-auto": {"prune.ratio": 0.3, "prune.round_to": "auto"}}


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"variants": []}


def _save(results: dict) -> None:
    from edgeprune.fsio import write_json, write_text

    write_json(RESULTS, results)
    commands = list(dict.fromkeys(v.get("command", results["command"]) for v in results["variants"]))
    lines = ["# YOLOv8n on cifar10-det: pruning and recovery", "", *[f"`{c}`" for c in commands], "",
             "| variant | MACs | params | ONNX MB | ORT ms | mAP50-95 baseline | pruned | BN re-cal | fine-tuned | "
             "ONNX | INT8 | INT8 mAP50 drop | INT8 MB | INT8 ms | wall s | CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    for v in results["variants"]:
        m = v.get("map50_95", {})
        lines.append(f"| {v['name']} | {f(v.get('macs'), '{:.3g}')} | {f(v.get('params'), '{:.3g}')} | "
                     f"{f(v.get('onnx_mb'))} | {f(v.get('ort_ms'))} | {f(m.get('baseline'))} | "
                     f"{f(m.get('pruned'))} | "
                     f"{f(m.get('recalibrated'))} | {f(m.get('finetuned'))} | {f(m.get('onnx'))} | "
                     f"{f(m.get('int8'))} | "
                     f"{f(v.get('int8_map50_drop'))} | {f(v.get('int8_mb'))} | {f(v.get('int8_ms'))} | "
                     f"{f(v.get('wall_s'), '{:.0f}')} | {v.get('environment', {}).get('cpu', '')} |")
    lines += ["", "Per-epoch mAP50-95 of the EMA weights (plain Ultralytics: its own validation at rect 288):", ""]
    names = [v["name"] for v in results["variants"]]

    def label(v: dict) -> str:  # a variant measured on two machines is named with its CPU
        cpu = v.get("environment", {}).get("cpu")
        return f"{v['name']} ({cpu})" if names.count(v["name"]) > 1 and cpu else v["name"]

    lines += [f"- {label(v)}: " + ", ".join(f"{e:.2f}" for e in v.get("epochs_map50_95", [])) for v in
              results["variants"] if v.get("epochs_map50_95")]
    lines += ["", *[f"Note: {n}" for n in results.get("notes", [])]]
    write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def ours(name: str, pruning: dict | None, epochs: int, out: Path) -> dict:
    from edgeprune import load_recipe, run

    overrides = {"recover.epochs": epochs, "recover.eval_every_epoch": True}
    if pruning is None:  # the control: the unpruned detector (nothing pruned), fine-tuned with the same recipe
        overrides.update({"prune.ignore": ["*"], "int8.enabled": False})  # every layer kept whole
    else:
        overrides.update(pruning)
    t0 = time.time()
    report = run(load_recipe(RECIPE, overrides), out / name, quiet=True, overwrite=True)
    stages = {s: report[s].get("map50_95") for s in ("baseline", "pruned", "recalibrated", "finetuned", "onnx")
              if s in report}
    after = report["finetuned"]
    row = {"name": name, "pruning": pruning or {},
           "macs": after["macs"], "params": after["params"], "onnx_mb": after["onnx_bytes"] / 1e6,
           "ort_ms": after["latency_ms"]["ort_cpu"], "baseline_ort_ms": report["baseline"]["latency_ms"]["ort_cpu"],
           "baseline_macs": report["baseline"]["macs"], "macs_factor": report["baseline"]["macs"] / after["macs"],
           "map50_95": stages, "map50": {s: report[s].get("map50") for s in stages}, "epochs": epochs,
           "epochs_map50_95": [e["map50_95"] for e in after.get("epochs", [])], "wall_s": time.time() - t0}
    if report.get("int8"):
        q = report["int8"]
        row["map50_95"]["int8"] = q["map50_95"]
        row.update(int8_map50_drop=q["map50_drop_pts"], int8_mb=q["onnx_bytes"] / 1e6,
                   int8_ms=q["latency_ms"]["ort_cpu"], int8_fp32_ms=q["fp32"]["latency_ms"]["ort_cpu"])
    return row


def plain(name: str, pruning: dict, epochs: int, out: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from yolo_plain import plain_ultralytics_finetune

    from edgeprune import create_model, load_recipe, prune
    from edgeprune.detection.data import load_detection_data
    from edgeprune.detection.metrics import evaluate_model
    from edgeprune.measure import count_macs

    recipe = load_recipe(RECIPE, pruning)
    model = create_model(**recipe.model.model_dump())
    data = load_detection_data(recipe.data.path)
    t0 = time.time()
    pruned, _ = prune(model, recipe.prune)
    spec = pruned.edgeprune_spec
    at_prune = evaluate_model(pruned, data).map50_95
    history, trained = plain_ultralytics_finetune(pruned, str(data.yaml), epochs=epochs, imgsz=spec.input_size[-1],
                                                  batch=recipe.recover.batch_size, workdir=str(out / name),
                                                  seed=recipe.seed)
    trained.edgeprune_spec = spec
    from edgeprune.models.yolo import detect_head

    detect_head(trained).export = True
    final = evaluate_model(trained.eval(), data)  # the same evaluation as edgeprune's stages
    example = spec.example_input()
    return {"name": name, "pruning": pruning,
            "macs": count_macs(trained, example), "baseline_macs": count_macs(model, example),
            "map50_95": {"pruned": at_prune, "finetuned": final.map50_95}, "map50": {"finetuned": final.map50},
            "epochs_map50_95": [h["map50_95"] for h in history], "epochs": epochs, "wall_s": time.time() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+",
                        default=["ours-1.5x", "plain-1.5x", "control", "ours-2x", "plain-2x"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v != "control" and (v.partition("-")[0] not in ("ours", "plain")
                                                               or v.partition("-")[2] not in PRUNING)]
    if unknown:
        parser.error(f"unknown variants {unknown}; use control, ours-F or plain-F with F in {list(PRUNING)}")
    timed = [v for v in args.variants if v.startswith("plain-") and PRUNING[v.partition("-")[2]].get(
        "prune.round_to") == "auto"]
    if timed:
        parser.error(f"{timed}: round_to auto times candidates on the pipeline's runtime; run it as ours-F only")
    results = _load()
    results["command"] = "EDGEPRUNE_HOME=../shared/data python " + shlex.join(["bench/detection.py", *sys.argv[1:]])
    from edgeprune.environment import environment

    results["environment"] = environment()
    with tempfile.TemporaryDirectory(prefix="edgeprune-det-bench-") as tmp:
        out = args.out or Path(tmp)
        for name in args.variants:
            kind, _, factor = name.partition("-")
            if kind == "control":
                row = ours(name, None, args.epochs, out)
            elif kind == "ours":
                row = ours(name, PRUNING[factor], args.epochs, out)
            else:
                row = plain(name, PRUNING[factor], args.epochs, out)
            row["command"] = results["command"]  # variants may come from separate invocations, machines
            row["environment"] = results["environment"]
            cpu = row["environment"].get("cpu")  # a row from another machine stays beside this one
            results["variants"] = [v for v in results["variants"]
                                   if (v["name"], v.get("environment", {}).get("cpu")) != (name, cpu)] + [row]
            _save(results)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
