"""The `edgeprune` command: parses options, calls the public API, prints results. Nothing more."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console

from .errors import EdgePruneError, first_line, user_message

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained CNNs small and fast for edge devices: measure, prune, export, report.")
out_console = Console()
err_console = Console(stderr=True)
DEBUG_ENV = "EDGEPRUNE_DEBUG"


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help=f"on an error, also print its full traceback "
                                       f"(or set {DEBUG_ENV}=1)")):
    """Make trained CNNs small and fast for edge devices: measure, prune, export, report."""
    if debug:
        os.environ[DEBUG_ENV] = "1"

ModelOpt = typer.Option("cifar_resnet56", "--model", "-m", help="model name (see `edgeprune models`), timm/NAME, "
                        "or your own FILE.py:NAME / package.module:NAME (importing it runs that code)")
ModelArgsOpt = typer.Option(None, "--model-args", help="custom models: keyword arguments as JSON, e.g. "
                            "'{\"width\": 0.5}'")
InputSizeOpt = typer.Option(None, "--input-size", help="timm and custom models: input C,H,W (default: timm's, "
                            "else 3,224,224)")
WeightsOpt = typer.Option("default", "--weights", "-w",
                          help="none, default (known pretrained weights), a torchvision weight name, "
                          "or a checkpoint path")
ClassesOpt = typer.Option(None, "--num-classes", help="classes of the checkpoint (default: 10 CIFAR, 1000 ImageNet)")
ThreadsOpt = typer.Option(2, "--threads", min=1, help="CPU threads for PyTorch and ONNX Runtime latency")
ImgszOpt = typer.Option(None, "--imgsz", help="YOLO detectors: square input size (default: the checkpoint's "
                        "training size, else 640)")
TrustOpt = typer.Option(False, "--trust-pickle", help="load an Ultralytics .pt checkpoint (a pickle that can run "
                        "code: only for files you trust)")
WarmupOpt = typer.Option(5, "--warmup", help="untimed runs before timing")
RepeatsOpt = typer.Option(30, "--repeats", help="timed runs; the median and p90 are reported")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress output")
SetOpt = typer.Option(None, "--set", help="override any recipe field: section.field=value (repeatable), "
                      "e.g. recover.train_images=5000, model.model_args.width=0.5 or seed=1")
ResumeOpt = typer.Option(False, "--resume", help="continue an interrupted fine-tune from its last epoch checkpoint")


def _parse_settings(settings: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EdgePruneError(f"--set {item!r} must look like section.field=value, e.g. recover.epochs=3")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise EdgePruneError(f"--set {item!r}: the value is not valid YAML ({first_line(exc)}); quote it, e.g. "
                                 "--set 'prune.ignore=[\"*downsample*\"]'") from None
    return overrides


def _model_args(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EdgePruneError(f"--model-args must be a JSON object, e.g. '{{\"width\": 0.5}}' ({exc.msg})") from None
    if not isinstance(value, dict):
        raise EdgePruneError("--model-args must be a JSON object of keyword arguments, e.g. '{\"width\": 0.5}'")
    return value


def _input_size(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise EdgePruneError(f"--input-size {text!r} must be C,H,W, e.g. 3,224,224")
    return [int(p) for p in parts]


def _latency(threads: int, warmup: int, repeats: int) -> dict:
    return {"latency.threads": threads, "latency.warmup": warmup, "latency.repeats": repeats}


@app.command("models")
def models_cmd():
    """List every model name edgeprune can build."""
    from .models import list_models

    out_console.print("\n".join(list_models()), highlight=False)
    out_console.print("YOLO detectors: any Ultralytics detection YAML (yolov8n.yaml, yolov8s.yaml, yolo11n.yaml, "
                      "...; needs pip install -e '.[yolo]')", highlight=False)
    out_console.print("timm models: timm/NAME for any timm.list_models() name (needs pip install -e '.[timm]')",
                      highlight=False)
    out_console.print("Your own: path/to/file.py:NAME or package.module:NAME (a class or function returning an "
                      "nn.Module; --model-args JSON, --input-size C,H,W)", highlight=False)


@app.command()
def profile(model: str = ModelOpt, weights: str = WeightsOpt, num_classes: int | None = ClassesOpt,
            imgsz: int | None = ImgszOpt, trust_pickle: bool = TrustOpt, model_args: str | None = ModelArgsOpt,
            input_size: str | None = InputSizeOpt, threads: int = ThreadsOpt,
            warmup: int = WarmupOpt, repeats: int = RepeatsOpt,
            layers: bool = typer.Option(False, "--layers", help="also list conv/linear layers and widths"),
            as_json: bool = typer.Option(False, "--json", help="print the measurement as JSON"),
            quiet: bool = QuietOpt):
    """Measure a model: params, MACs, sizes, CPU (and GPU) latency in PyTorch, ONNX Runtime and OpenVINO (when
    installed)."""
    from dataclasses import asdict

    from .models import create_model
    from .models.yolo import is_yolo_name
    from .pipeline import profile_model
    from .pruning import out_channels, prunable_layers
    from .recipe import Recipe, apply_overrides

    if is_yolo_name(model) and weights == "default":  # detectors have no default weights; sizes and times need none
        weights = "none"
    recipe = apply_overrides(Recipe(), _latency(threads, warmup, repeats))
    net = create_model(model, weights, num_classes, imgsz=imgsz, trust_pickle=trust_pickle,
                       model_args=_model_args(model_args), input_size=_input_size(input_size))
    result = asdict(profile_model(net, recipe, quiet))
    if layers:
        result["layers"] = {n: out_channels(m) for n, m in prunable_layers(net).items()}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from .rows import Table, rich

    table = Table(f"{model} ({weights})", ["measure", "value"], [
        ["params", f"{result['params']:,}"], ["MACs", f"{result['macs']:,}"],
        ["state dict bytes", f"{result['state_dict_bytes']:,}"], ["ONNX bytes", f"{result['onnx_bytes']:,}"],
        *([f"{key} ms (median / p90)", f"{ms:.2f} / {result['latency_p90_ms'][key]:.2f}"]
          for key, ms in result["latency_ms"].items()),
        *([f"layer {name}", str(width)] for name, width in result.get("layers", {}).items())])
    out_console.print(rich(table))


def _finish(report: dict | None, out: Path, as_json: bool) -> None:
    from . import rows
    from .report import console_tables

    if report is None:  # a torchrun worker other than rank 0: rank 0 reports
        return
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for table in console_tables(report):
        out_console.print(table)
    out_console.print(rows.parity(report), highlight=False)
    verdict = rows.latency_verdict(report)
    if verdict:
        out_console.print(verdict[0], highlight=False)
    for line in [*report.get("diagnostics", {}).get("findings", []), *rows.notes(report)]:
        out_console.print(f"- {line}", highlight=False)
    unpruned = report["prune"]["unpruned"]
    if len(unpruned) > 1:
        out_console.print(f"{len(unpruned)} layers left unpruned (see report.md for why)", highlight=False)
    if report.get("timings"):
        out_console.print(rows.timings(report["timings"]), highlight=False)
    out_console.print(f"Report: {out / 'report.html'} (also .md, .json); pruned model: {out} "
                      "(edgeprune.load)", highlight=False)


def _given(pairs: dict[str, object]) -> dict[str, object]:
    """Only what the user typed: an option left out must not override the recipe with a default."""
    return {key: value for key, value in pairs.items() if value is not None}


PRUNE_DEFAULTS = {"recover.epochs": 0}  # `prune` without a recipe recovers nothing unless asked


@app.command("prune")
def prune_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="run folder for the report, model and ONNX"),
    model: str | None = typer.Option(None, "--model", "-m", help="model name (see `edgeprune models`), timm/NAME, "
                                     "or your own FILE.py:NAME / package.module:NAME (importing it runs that code); "
                                     "default: the recipe's, else cifar_resnet56"),
    model_args: str | None = ModelArgsOpt,
    input_size: str | None = InputSizeOpt,
    weights: str | None = typer.Option(None, "--weights", "-w", help="none, default (known pretrained weights), a "
                                       "torchvision weight name, or a checkpoint path; default: the recipe's, else "
                                       "default"),
    num_classes: int | None = ClassesOpt,
    imgsz: int | None = ImgszOpt,
    trust_pickle: bool = TrustOpt,
    ratio: float | None = typer.Option(None, "--ratio", help="channel ratio removed per layer, in (0, 1); "
                                       "default: the recipe's target, else 0.5 (0.2 for a YOLO model)"),
    macs_reduction: float | None = typer.Option(None, "--macs-reduction",
                                                help="fraction of MACs to remove, in (0, 1); 0.5 halves them"),
    target_latency_ms: float | None = typer.Option(
        None, "--target-latency-ms", help="prune until the exported model runs in at most X ms (measured on "
        "--latency-runtime with --threads); channel rounding as --round-to says"),
    target_speedup: float | None = typer.Option(
        None, "--target-speedup", help="prune until the exported model runs at least X times faster than the "
        "unpruned one on --latency-runtime (X > 1; both timed side by side in this run, so a loaded machine does "
        "not move the target as it moves milliseconds)"),
    max_drop: float | None = typer.Option(
        None, "--max-drop", help="accuracy budget in points of top-1 (mAP50-95 for detectors): the most pruned "
        "model whose recovered accuracy stays within it, found by prune-and-recover trials (needs --data)"),
    max_drop_by: str | None = typer.Option(None, "--max-drop-by", help="macs (default: the most MACs removed) or "
                                           "latency (the lowest latency on --latency-runtime)"),
    max_drop_trials: int | None = typer.Option(None, "--max-drop-trials", help="trials at most (default 5)"),
    latency_runtime: str | None = typer.Option(None, "--latency-runtime", help="ort_cpu (default), ov_cpu "
                                               "(OpenVINO, needs the openvino extra) or torch_cpu"),
    importance: str | None = typer.Option(None, "--importance", help="l1, l2 (default; bn-scale for a YOLO "
                                          "model), bn-scale, taylor, hessian, lamp, fpgm or random"),
    allocation: str | None = typer.Option(None, "--allocation", help="uniform (one ratio for every layer, the "
                                          "default), global (one ranking over all layers) or sensitivity (per-group "
                                          "ratios from a sensitivity analysis on --data)"),
    global_pruning: bool | None = typer.Option(None, "--global/--local", help="--allocation global / uniform"),
    round_to: int | None = typer.Option(None, "--round-to", help="keep channel counts multiples of N (1: any "
                                        "count; default: auto, the fastest of 1, 8, 16 and 32 timed on "
                                        "--latency-runtime; none for a YOLO model or with sensitivity allocation)"),
    max_layer_ratio: float | None = typer.Option(None, "--max-layer-ratio", help="most any one layer may lose "
                                                 "(default 1.0)"),
    steps: int | None = typer.Option(None, "--steps", help="prune in N steps, each followed by BN re-calibration "
                                     "and its share of --epochs (needs --data; default 1)"),
    ignore: list[str] | None = typer.Option(None, "--ignore", help="layer name or glob never pruned (repeatable)"),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default 17)"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for PyTorch and ONNX Runtime (default 2)"),
    warmup: int | None = typer.Option(None, "--warmup", help="untimed runs before timing (default 5)"),
    repeats: int | None = typer.Option(None, "--repeats", help="timed runs; median and p90 reported (default 30)"),
    data: str | None = typer.Option(None, "--data", help="evaluate and recover on this dataset: cifar10, an "
                                    "ImageFolder root with train/ and val/, or a YOLO data.yaml"),
    epochs: int | None = typer.Option(None, "--epochs", help="fine-tuning epochs with distillation (needs --data; "
                                      "default: the recipe's, else 0)"),
    int8: bool = typer.Option(False, "--int8", help="also quantize to INT8 with ONNX Runtime (needs --data)"),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe; the options above that you give "
                                       "override it, the others keep the recipe's values"),
    settings: list[str] | None = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="discard a different run already in --out"),
    resume: bool = ResumeOpt,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    quiet: bool = QuietOpt,
):
    """Prune a model structurally (to a channel ratio, a MACs reduction, a measured latency or an accuracy
    budget), export it
    to ONNX with a parity check, and report before/after with a per-layer profile."""
    from .recipe import DETECTION_RECIPE, Recipe, apply_overrides, load_recipe

    targets = {"--ratio": ratio, "--macs-reduction": macs_reduction, "--target-latency-ms": target_latency_ms,
               "--target-speedup": target_speedup, "--max-drop": max_drop}
    given = [flag for flag, v in targets.items() if v is not None]
    if len(given) > 1:
        raise EdgePruneError(f"give one of {', '.join(targets)}, not "
                             f"{' and '.join(given)}")
    if allocation is not None and global_pruning is not None and (allocation == "global") != global_pruning:
        raise EdgePruneError(f"--allocation {allocation} and --{'global' if global_pruning else 'local'} disagree; "
                             "give --allocation alone")
    overrides = _given({
        "model.name": model, "model.weights": weights, "model.num_classes": num_classes,
        "model.model_args": _model_args(model_args), "model.input_size": _input_size(input_size),
        "data.path": data, "model.imgsz": imgsz, "model.trust_pickle": True if trust_pickle else None,
        "recover.epochs": epochs, "int8.enabled": True if int8 else None, "prune.ratio": ratio,
        "prune.macs_reduction": macs_reduction, "prune.target_latency_ms": target_latency_ms,
        "prune.target_speedup": target_speedup, "prune.latency_runtime": latency_runtime,
        "prune.importance": importance, "prune.max_drop": max_drop,
        "prune.max_drop_by": max_drop_by, "prune.max_drop_trials": max_drop_trials,
        "prune.allocation": allocation or (None if global_pruning is None else
                                           "global" if global_pruning else "uniform"),
        "prune.global_pruning": global_pruning, "prune.round_to": round_to, "prune.max_layer_ratio": max_layer_ratio,
        "prune.steps": steps, "prune.ignore": ignore or None, "export.opset": opset, "latency.threads": threads,
        "latency.warmup": warmup, "latency.repeats": repeats})
    overrides.update(_parse_settings(settings or []))
    from .models.yolo import is_yolo_name  # PyTorch from here on: the checks above answer at once
    from .pipeline import run

    if recipe:
        base = load_recipe(recipe)
    else:
        base = apply_overrides(Recipe(), PRUNE_DEFAULTS)
        if is_yolo_name(model or ""):
            base = load_recipe(DETECTION_RECIPE, {"model.weights": "none", "data.path": None, "int8.enabled": False,
                                                  **PRUNE_DEFAULTS})
    report = run(apply_overrides(base, overrides), out, quiet=quiet, overwrite=overwrite, resume=resume)
    _finish(report, out, as_json)


@app.command("export")
def export_cmd(out: Path = typer.Argument(..., help="a prune run folder (of a --max-drop search: its chosen "
                                          "trial, published again)"),
               opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: the run's)"),
               simplify: bool | None = typer.Option(None, "--simplify/--no-simplify", help="simplify with onnxslim "
                                                    "(default: the run's)"),
               int8: bool = typer.Option(False, "--int8", help="also write model.int8.onnx (ONNX Runtime static "
                                         "quantization) and add its accuracy, size and latency to the report"),
               data: str | None = typer.Option(None, "--data", help="dataset for INT8 calibration and evaluation "
                                               "(default: the run's)"),
               as_json: bool = typer.Option(False, "--json", help="print the updated report as JSON"),
               quiet: bool = QuietOpt):
    """Re-export the pruned model of a run folder to ONNX (another opset, say) and check parity with
    PyTorch; --int8 adds an INT8 model. Everything measured on the old file is measured again."""
    from .pipeline import export_run

    _finish(export_run(out, opset=opset, simplify=simplify, int8=int8, data=data, quiet=quiet), out, as_json)


@app.command("run")
def run_cmd(recipe: Path | None = typer.Argument(None, help="YAML recipe; none runs the built-in default "
                                                    "(CIFAR ResNet-56 to half its MACs)"),
            out: Path | None = typer.Option(None, "--out", "-o", help="run folder (default runs/<model>)"),
            epochs: int | None = typer.Option(None, "--epochs", help="override the recipe's fine-tuning epochs"),
            settings: list[str] | None = SetOpt,
            overwrite: bool = typer.Option(False, "--overwrite", help="discard a different run already in --out"),
            resume: bool = ResumeOpt,
            as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
            quiet: bool = QuietOpt):
    """Run every stage from a YAML recipe (or the built-in default: CIFAR ResNet-56 to half its MACs,
    evaluated and recovered on CIFAR-10). Works under torchrun; re-running skips finished stages."""
    from .pipeline import run
    from .recipe import load_recipe

    overrides = _parse_settings(settings or [])
    if epochs is not None:
        overrides["recover.epochs"] = epochs
    loaded = load_recipe(recipe, overrides)
    out = out or Path("runs") / loaded.model.name
    _finish(run(loaded, out, quiet=quiet, overwrite=overwrite, resume=resume), out, as_json)


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EdgePruneError(f"{flag} takes comma-separated numbers, e.g. {flag} 0.3,0.5,0.7; got {text!r}") from None


@app.command("sweep")
def sweep_cmd(
    recipe: Path | None = typer.Argument(None, help="YAML recipe; none uses the built-in default"),
    out: Path = typer.Option(..., "--out", "-o", help="sweep folder: points/<point>/ run folders and "
                             "sweep.html/.md/.json"),
    ratios: str | None = typer.Option(None, "--ratios", help="channel ratios, e.g. 0.3,0.5,0.7"),
    macs_reductions: str | None = typer.Option(None, "--macs-reductions", help="MACs reductions, e.g. 0.3,0.5,0.7"),
    latencies: str | None = typer.Option(None, "--target-latency-ms", help="latency targets in ms, e.g. 20,10,5"),
    speedups: str | None = typer.Option(None, "--target-speedups", help="speed-up targets over the unpruned model, "
                                        "e.g. 1.5,2,3"),
    model: str | None = typer.Option(None, "--model", "-m", help="override the recipe's model"),
    weights: str | None = typer.Option(None, "--weights", "-w", help="override the recipe's weights"),
    data: str | None = typer.Option(None, "--data", help="override the recipe's dataset (accuracy per point)"),
    epochs: int | None = typer.Option(None, "--epochs", help="override the recipe's fine-tuning epochs"),
    settings: list[str] | None = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="discard different runs already in the point folders"),
    as_json: bool = typer.Option(False, "--json", help="print the sweep as JSON"),
    quiet: bool = QuietOpt,
):
    """Prune at several ratios, MACs reductions, latency or speed-up targets and chart the accuracy / latency /
    MACs / size trade-off with its Pareto front (sweep.html). Each point is a resumable run folder."""
    from .recipe import load_recipe

    given = {k: v for k, v in (("ratio", _floats(ratios, "--ratios")),
                               ("macs_reduction", _floats(macs_reductions, "--macs-reductions")),
                               ("target_latency_ms", _floats(latencies, "--target-latency-ms")),
                               ("target_speedup", _floats(speedups, "--target-speedups"))) if v is not None}
    if len(given) != 1:
        raise EdgePruneError("give exactly one of --ratios, --macs-reductions, --target-latency-ms, --target-speedups")
    (kind, values), = given.items()
    overrides = {k: v for k, v in (("model.name", model), ("model.weights", weights), ("data.path", data),
                                   ("recover.epochs", epochs)) if v is not None}
    overrides.update(_parse_settings(settings or []))
    base = load_recipe(recipe, overrides)
    from .pipeline import stderr_logger  # PyTorch from here on: the checks above answer at once
    from .sweeps import sweep

    result = sweep(base, kind, values, out, quiet=quiet, overwrite=overwrite, log=stderr_logger(quiet))
    if result is None:  # a torchrun worker other than rank 0: rank 0 reports
        return
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from .rows import rich
    from .rows import sweep as sweep_table

    out_console.print(rich(sweep_table(result)))
    out_console.print(f"Sweep report: {out / 'sweep.html'} (also .md, .json)", highlight=False)


@app.command("sensitivity")
def sensitivity_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="run folder: sensitivity.json (a later `prune --allocation "
                             "sensitivity --out` of the same model and data reuses it)"),
    model: str | None = typer.Option(None, "--model", "-m", help="model name; default: the recipe's, else "
                                     "cifar_resnet56"),
    weights: str | None = typer.Option(None, "--weights", "-w", help="none, default, a torchvision weight name, or "
                                       "a checkpoint path"),
    num_classes: int | None = ClassesOpt,
    data: str | None = typer.Option(None, "--data", help="dataset the groups are scored on (cifar10 or an "
                                    "ImageFolder root); default: the recipe's"),
    ratios: str | None = typer.Option(None, "--ratios", help="ratios each group is pruned at, alone (default "
                                      "0.25,0.5,0.75)"),
    images: int | None = typer.Option(None, "--images", help="images per score (default 256)"),
    split: str | None = typer.Option(None, "--split", help="score on held-out training images (train, the default) "
                                     "or on the evaluation split (eval)"),
    importance: str | None = typer.Option(None, "--importance", help="channel ranking: l2 (default), l1, bn-scale, "
                                          "lamp, fpgm"),
    round_to: int | None = typer.Option(None, "--round-to", help="round each group's kept channels as pruning will"),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe the options above override"),
    settings: list[str] | None = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="discard a different run already in --out"),
    as_json: bool = typer.Option(False, "--json", help="print sensitivity.json"),
    quiet: bool = QuietOpt,
):
    """Score every prunable group pruned alone at several ratios (top-1 after BN re-calibration, on an even
    subset of held-out training images, or of the evaluation split with --split eval): which layers can be
    cut, and how far."""
    from .pipeline import sensitivity_run
    from .recipe import Recipe, apply_overrides, load_recipe
    from .rows import rich, sensitivity

    overrides = _given({"model.name": model, "model.weights": weights, "model.num_classes": num_classes,
                        "data.path": data, "prune.sensitivity_ratios": _floats(ratios, "--ratios"),
                        "prune.sensitivity_images": images, "prune.sensitivity_split": split,
                        "prune.importance": importance,
                        "prune.round_to": round_to})
    overrides.update(_parse_settings(settings or []))
    base = load_recipe(recipe) if recipe else apply_overrides(Recipe(), PRUNE_DEFAULTS)
    if not apply_overrides(base, overrides).data.path:
        raise EdgePruneError("sensitivity scores the model on data: give --data (cifar10 or an ImageFolder root)")
    result = sensitivity_run(apply_overrides(base, overrides), out, quiet=quiet, overwrite=overwrite)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out_console.print(rich(sensitivity({"sensitivity": result, "prune": {}})))
    out_console.print(f"Sensitivity: {out / 'sensitivity.json'}", highlight=False)


@app.command()
def evaluate(model: str = typer.Option(..., "--model", "-m", help="model name, or a prune run folder"),
             weights: str = WeightsOpt, num_classes: int | None = ClassesOpt,
             imgsz: int | None = ImgszOpt, trust_pickle: bool = TrustOpt,
             data: str = typer.Option(..., "--data", help="cifar10 or an ImageFolder root (its val/ or test/ "
                                      "split), or a YOLO data.yaml (its val split)"),
             onnx: bool = typer.Option(False, "--onnx", help="evaluate the run folder's model.onnx with ONNX Runtime"),
             batch_size: int = typer.Option(500, "--batch-size", min=1),
             limit: int | None = typer.Option(None, "--limit", min=1, help="evaluate an even subset of N images"),
             threads: int = ThreadsOpt,
             as_json: bool = typer.Option(False, "--json", help='print {"top1": .., "top5": ..} (detectors: '
                                          '{"map50_95": .., "map50": ..}) as JSON'),
             quiet: bool = QuietOpt):
    """Top-1 / top-5 accuracy (detectors: mAP50-95 / mAP50) of a model, a pruned run folder or its ONNX
    file on a dataset."""
    from .accuracy import evaluate as evaluate_accuracy

    acc = evaluate_accuracy(model, data, weights=weights, num_classes=num_classes, onnx=onnx, limit=limit,
                            batch_size=batch_size, threads=threads, quiet=quiet, imgsz=imgsz,
                            trust_pickle=trust_pickle)
    detector = acc.map50_95 is not None
    figures = {"map50_95": acc.map50_95, "map50": acc.map50} if detector else {"top1": acc.top1, "top5": acc.top5}
    if as_json:
        print(json.dumps({**figures, "images": acc.images}))
    elif detector:
        out_console.print(f"{model}: mAP50-95 {acc.map50_95:.2f}%, mAP50 {acc.map50:.2f}% on {acc.images} images",
                          highlight=False)
    else:
        out_console.print(f"{model}: top-1 {acc.top1:.2f}%, top-5 {acc.top5:.2f}% on {acc.images} images",
                          highlight=False)


@app.command("benchmark")
def benchmark_cmd(out: Path = typer.Argument(..., help="a prune run folder"),
                  data: str | None = typer.Option(None, "--data", help="also measure accuracy on this dataset's "
                                                  "evaluation split (cifar10, an ImageFolder root, a YOLO data.yaml)"),
                  limit: int | None = typer.Option(None, "--limit", min=1,
                                                   help="with --data: an even subset of N images"),
                  baseline: bool = typer.Option(False, "--baseline", help="also the unpruned model (rebuilt from the "
                                                "run's recipe, FP32) on every runtime"),
                  threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: the run's)"),
                  warmup: int | None = typer.Option(None, "--warmup", help="untimed runs (default: the run's)"),
                  repeats: int | None = typer.Option(None, "--repeats", help="timed runs (default: the run's)"),
                  ort_spinning: bool | None = typer.Option(None, "--ort-spinning/--no-ort-spinning",
                                                           help="ONNX Runtime's workers busy-wait between runs "
                                                           "(its own default; each turn then times a block of "
                                                           "runs once the other model's workers are idle, see "
                                                           "latency.ort_spinning) or not (default: the run's)"),
                  ort_spin_us: int | None = typer.Option(None, "--ort-spin-us", min=0,
                                                         help="without --ort-spinning: microseconds ONNX Runtime's "
                                                         "workers busy-wait before they sleep; 0 sleeps at once "
                                                         "(default: the run's)"),
                  turn_runs: int | None = typer.Option(None, "--turn-runs", min=1,
                                                       help="runs timed back to back in each model's turn, after "
                                                       "--settle-runs untimed ones (default: the run's); 1 with "
                                                       "--settle-runs 0 times single runs in turn"),
                  settle_runs: int | None = typer.Option(None, "--settle-runs", min=0,
                                                         help="untimed runs at the start of each turn "
                                                         "(default: the run's)"),
                  as_json: bool = typer.Option(False, "--json", help="print the rows as a JSON list"),
                  quiet: bool = QuietOpt):
    """Time a run's pruned model on every runtime and precision available here (PyTorch, ONNX Runtime,
    OpenVINO when installed; FP32, and INT8 when the run wrote model.int8.onnx) side by side in one process:
    file, size, latency median/p90, outputs against PyTorch, and accuracy with --data. Writes
    OUT/benchmark.json and adds the table to the run's report."""
    from .benchmark import benchmark

    given = _given({"threads": threads, "warmup": warmup, "repeats": repeats, "ort_spinning": ort_spinning,
                    "ort_spin_us": ort_spin_us, "turn_runs": turn_runs, "settle_runs": settle_runs})
    result = benchmark(out, data=data, limit=limit, latency_overrides=given, baseline=baseline, quiet=quiet)
    if as_json:
        print(json.dumps(result["rows"], indent=2))
        return
    from .rows import benchmark as table
    from .rows import rich

    out_console.print(rich(table(result)))
    out_console.print(f"Benchmark: {out / 'benchmark.json'} (also in {out / 'report.html'})", highlight=False)


def main() -> None:
    try:
        app()
    except EdgePruneError as exc:
        if os.environ.get(DEBUG_ENV):
            traceback.print_exception(exc)
        err_console.print(f"edgeprune: error: {user_message(exc)}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("edgeprune: interrupted; run the same command again (with --resume while "
                          "fine-tuning) to continue", highlight=False)
        sys.exit(130)
    finally:
        if "torch.distributed" in sys.modules:  # else nothing to shut down, and no need to import PyTorch
            from .distributed import shutdown

            shutdown()


if __name__ == "__main__":
    main()
