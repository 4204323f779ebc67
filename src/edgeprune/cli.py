"""The `edgeprune` command: parses options, calls the public API, prints results. Nothing more."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from .errors import EdgePruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained CNNs small and fast for edge devices: measure, prune, export, report.")
out_console = Console()
err_console = Console(stderr=True)

ModelOpt = typer.Option("cifar_resnet56", "--model", "-m", help="model name (see `edgeprune models`)")
WeightsOpt = typer.Option("default", "--weights", "-w",
                          help="none, default (known pretrained weights), a torchvision weight name, "
                          "or a checkpoint path")
ClassesOpt = typer.Option(None, "--num-classes", help="classes of the checkpoint (default: 10 CIFAR, 1000 ImageNet)")
ThreadsOpt = typer.Option(2, "--threads", help="CPU threads for PyTorch and ONNX Runtime latency")
WarmupOpt = typer.Option(5, "--warmup", help="untimed runs before timing")
RepeatsOpt = typer.Option(30, "--repeats", help="timed runs; the median and p90 are reported")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress output")
SetOpt = typer.Option(None, "--set", help="override any recipe field: section.field=value (repeatable), "
                      "e.g. recover.train_images=5000")
ResumeOpt = typer.Option(False, "--resume", help="continue an interrupted fine-tune from its last epoch checkpoint")


def _parse_settings(settings: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise EdgePruneError(f"--set {item!r} must look like section.field=value, e.g. recover.epochs=3")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _latency(threads: int, warmup: int, repeats: int) -> dict:
    return {"latency.threads": threads, "latency.warmup": warmup, "latency.repeats": repeats}


@app.command("models")
def models_cmd():
    """List every model name edgeprune can build."""
    from .models import list_models

    out_console.print("\n".join(list_models()), highlight=False)


@app.command()
def profile(model: str = ModelOpt, weights: str = WeightsOpt, num_classes: int | None = ClassesOpt,
            threads: int = ThreadsOpt, warmup: int = WarmupOpt, repeats: int = RepeatsOpt,
            layers: bool = typer.Option(False, "--layers", help="also list conv/linear layers and widths"),
            as_json: bool = typer.Option(False, "--json", help="print the measurement as JSON"),
            quiet: bool = QuietOpt):
    """Measure a model: params, MACs, sizes, CPU (and GPU) latency in PyTorch and ONNX Runtime."""
    from .models import create_model
    from .pipeline import measure_models
    from .prune import _out_channels, _prunable_layers
    from .recipe import Recipe, apply_overrides

    recipe = apply_overrides(Recipe(), {"model.name": model, "model.weights": weights,
                                        "model.num_classes": num_classes, **_latency(threads, warmup, repeats)})
    net = create_model(model, weights, num_classes)
    result = measure_models({"model": (net, None)}, net.edgeprune_spec.input_size, recipe, quiet)["model"]
    if layers:
        result["layers"] = {n: _out_channels(m) for n, m in _prunable_layers(net).items()}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{model} ({weights})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("params", f"{result['params']:,}")
    table.add_row("MACs", f"{result['macs']:,}")
    table.add_row("state dict bytes", f"{result['state_dict_bytes']:,}")
    table.add_row("ONNX bytes", f"{result['onnx_bytes']:,}")
    for key, ms in result["latency_ms"].items():
        table.add_row(f"{key} ms (median / p90)", f"{ms:.2f} / {result['latency_p90_ms'][key]:.2f}")
    for name, width in result.get("layers", {}).items():
        table.add_row(f"layer {name}", str(width))
    out_console.print(table)


def _finish(report: dict | None, out: Path, as_json: bool) -> None:
    from .report import accuracy_rows, accuracy_table, console_table, int8_table

    if report is None:  # a torchrun worker other than rank 0: rank 0 reports
        return
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out_console.print(console_table(report))
    if accuracy_rows(report):
        out_console.print(accuracy_table(report))
    if report.get("int8"):
        out_console.print(int8_table(report))
    parity = report["onnx_parity"]
    out_console.print(f"ONNX parity: max abs diff {parity['max_abs_diff']:.2e}, top-1 agreement "
                      f"{parity['top1_agreement']:.1%}", highlight=False)
    t = report.get("target", {})
    if t.get("kind") == "latency":
        out_console.print(f"Latency target {t['latency_ms']:g} ms on {t['runtime']}: "
                          f"{'met' if t['met'] else 'MISSED'} ({t['measured_ms']:.2f} ms measured on the final model)",
                          highlight=False)
    for finding in report.get("diagnostics", {}).get("findings", []):
        out_console.print(f"- {finding}", highlight=False)
    unpruned = report["prune"]["unpruned"]
    if len(unpruned) > 1:
        out_console.print(f"{len(unpruned)} layers left unpruned (see report.md for why)", highlight=False)
    out_console.print(f"Report: {out / 'report.html'} (also .md, .json); pruned model: {out} "
                      "(edgeprune.load)", highlight=False)


@app.command("prune")
def prune_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="run folder for the report, model and ONNX"),
    model: str = ModelOpt, weights: str = WeightsOpt, num_classes: int | None = ClassesOpt,
    ratio: float | None = typer.Option(None, "--ratio", help="channel ratio removed per layer, in (0, 1)"),
    macs_reduction: float | None = typer.Option(None, "--macs-reduction",
                                                   help="fraction of MACs to remove, in (0, 1); 0.5 halves them"),
    target_latency_ms: float | None = typer.Option(
        None, "--target-latency-ms", help="prune until the exported model runs in at most X ms (measured on "
        "--latency-runtime with --threads); round_to is chosen among 1, 8, 16 unless --round-to is given"),
    latency_runtime: str = typer.Option("ort_cpu", "--latency-runtime", help="ort_cpu (ONNX Runtime) or torch_cpu"),
    importance: str = typer.Option("l2", "--importance",
                                   help="l1, l2, bn-scale, taylor, hessian, lamp, fpgm or random"),
    global_pruning: bool = typer.Option(False, "--global/--local", help="rank channels across layers or per layer"),
    round_to: int | None = typer.Option(None, "--round-to", help="keep channel counts multiples of N (8 or 16 "
                                           "often run faster)"),
    max_layer_ratio: float = typer.Option(1.0, "--max-layer-ratio", help="most any one layer may lose"),
    ignore: list[str] | None = typer.Option(None, "--ignore", help="layer name or glob never pruned (repeatable)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset"),
    threads: int = ThreadsOpt, warmup: int = WarmupOpt, repeats: int = RepeatsOpt,
    data: str | None = typer.Option(None, "--data", help="evaluate and recover on this dataset: cifar10 or an "
                                       "ImageFolder root with train/ and val/"),
    epochs: int = typer.Option(0, "--epochs", help="fine-tuning epochs with distillation (needs --data)"),
    int8: bool = typer.Option(False, "--int8", help="also quantize to INT8 with ONNX Runtime (needs --data)"),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe the options above override"),
    settings: list[str] | None = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="discard a different run already in --out"),
    resume: bool = ResumeOpt,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    quiet: bool = QuietOpt,
):
    """Prune a model structurally (to a channel ratio, a MACs reduction or a measured latency), export it
    to ONNX with a parity check, and report before/after with a per-layer profile."""
    from .pipeline import run
    from .recipe import Recipe, apply_overrides, load_recipe

    overrides = {"data.path": data, "recover.epochs": epochs, **({"int8.enabled": True} if int8 else {}),
                 "model.name": model, "model.weights": weights, "model.num_classes": num_classes,
                 "prune.importance": importance, "prune.global_pruning": global_pruning,
                 "prune.round_to": round_to, "prune.max_layer_ratio": max_layer_ratio,
                 "prune.ignore": ignore or [], "export.opset": opset, **_latency(threads, warmup, repeats)}
    targets = {"--ratio": ratio, "--macs-reduction": macs_reduction, "--target-latency-ms": target_latency_ms}
    given = [flag for flag, v in targets.items() if v is not None]
    if len(given) > 1:
        raise EdgePruneError(f"give one of --ratio, --macs-reduction, --target-latency-ms, not {' and '.join(given)}")
    overrides["prune.latency_runtime"] = latency_runtime
    if macs_reduction is not None:
        overrides["prune.macs_reduction"] = macs_reduction
    elif target_latency_ms is not None:
        overrides["prune.target_latency_ms"] = target_latency_ms
    else:
        overrides["prune.ratio"] = 0.5 if ratio is None else ratio
    overrides.update(_parse_settings(settings or []))
    base = load_recipe(recipe) if recipe else Recipe()
    report = run(apply_overrides(base, overrides), out, quiet=quiet, overwrite=overwrite, resume=resume)
    _finish(report, out, as_json)


@app.command("export")
def export_cmd(out: Path = typer.Argument(..., help="a prune run folder"),
               opset: int = typer.Option(17, "--opset", help="ONNX opset"),
               simplify: bool = typer.Option(True, "--simplify/--no-simplify", help="simplify with onnxslim"),
               int8: bool = typer.Option(False, "--int8", help="also write model.int8.onnx (ONNX Runtime static "
                                         "quantization) and add its accuracy, size and latency to the report"),
               data: str | None = typer.Option(None, "--data", help="dataset for INT8 calibration and evaluation "
                                               "(default: the run's)"),
               quiet: bool = QuietOpt):
    """Re-export the pruned model of a run folder to ONNX and check parity with PyTorch; --int8 adds
    an INT8 model."""
    from .pipeline import export_run
    from .recipe import ExportOptions, build

    result = export_run(out, build(ExportOptions, {"opset": opset, "simplify": simplify}), int8=int8, data=data,
                        quiet=quiet)
    parity = result["onnx_parity"]
    out_console.print(f"{out / 'model.onnx'}: max abs diff {parity['max_abs_diff']:.2e}, top-1 agreement "
                      f"{parity['top1_agreement']:.1%}", highlight=False)
    if "int8" in result:
        from .report import int8_table

        out_console.print(int8_table({"int8": result["int8"]}))


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
    model: str | None = typer.Option(None, "--model", "-m", help="override the recipe's model"),
    weights: str | None = typer.Option(None, "--weights", "-w", help="override the recipe's weights"),
    data: str | None = typer.Option(None, "--data", help="override the recipe's dataset (accuracy per point)"),
    epochs: int | None = typer.Option(None, "--epochs", help="override the recipe's fine-tuning epochs"),
    settings: list[str] | None = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="discard different runs already in the point folders"),
    as_json: bool = typer.Option(False, "--json", help="print the sweep as JSON"),
    quiet: bool = QuietOpt,
):
    """Prune at several ratios, MACs reductions or latency targets and chart the accuracy / latency /
    MACs / size trade-off with its Pareto front (sweep.html). Each point is a resumable run folder."""
    from .pipeline import _log_to_stderr
    from .recipe import load_recipe
    from .sweep import sweep

    given = {k: v for k, v in (("ratio", _floats(ratios, "--ratios")),
                               ("macs_reduction", _floats(macs_reductions, "--macs-reductions")),
                               ("target_latency_ms", _floats(latencies, "--target-latency-ms"))) if v is not None}
    if len(given) != 1:
        raise EdgePruneError("give exactly one of --ratios, --macs-reductions, --target-latency-ms")
    (kind, values), = given.items()
    overrides = {k: v for k, v in (("model.name", model), ("model.weights", weights), ("data.path", data),
                                   ("recover.epochs", epochs)) if v is not None}
    overrides.update(_parse_settings(settings or []))
    base = load_recipe(recipe, overrides)
    result = sweep(base, kind, values, out, quiet=quiet, overwrite=overwrite, log=_log_to_stderr(quiet))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"sweep: {result['model']} (Pareto front by {result['front_by']})")
    for col in ("model", "ORT CPU ms", "MACs", "ONNX MB", "top-1 %", "Pareto"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for p in result["points"]:
        table.add_row(p["label"], f"{p['ms']:.2f}", f"{p['macs'] / 1e6:.1f}M", f"{p['bytes'] / 1e6:.2f}",
                      "" if p["top1"] is None else f"{p['top1']:.2f}", "yes" if p["pareto"] else "")
    out_console.print(table)
    out_console.print(f"Sweep report: {out / 'sweep.html'} (also .md, .json)", highlight=False)


@app.command()
def evaluate(model: str = typer.Option(..., "--model", "-m", help="model name, or a prune run folder"),
             weights: str = WeightsOpt, num_classes: int | None = ClassesOpt,
             data: str = typer.Option(..., "--data", help="cifar10 or an ImageFolder root; its val/ (or test/) "
                                      "split is used"),
             onnx: bool = typer.Option(False, "--onnx", help="evaluate the run folder's model.onnx with ONNX Runtime"),
             batch_size: int = typer.Option(500, "--batch-size"),
             limit: int | None = typer.Option(None, "--limit", help="evaluate an even subset of N images"),
             threads: int = ThreadsOpt,
             as_json: bool = typer.Option(False, "--json", help='print {"top1": .., "top5": ..} as JSON'),
             quiet: bool = QuietOpt):
    """Top-1 / top-5 accuracy of a model (or a pruned run folder, or its ONNX file) on a dataset."""
    import torch

    from .artifact import load
    from .data import load_split, loader
    from .distributed import runtime
    from .evaluate import evaluate as evaluate_model
    from .evaluate import evaluate_onnx
    from .models import create_model

    torch.set_num_threads(threads)
    folder = Path(model)
    net = load(folder) if folder.is_dir() else create_model(model, weights, num_classes)
    ds = load_split(data, net.edgeprune_spec, train=False, quiet=quiet)
    batches = loader(ds, batch_size, limit=limit)
    if onnx:
        if not (folder / "model.onnx").is_file():
            raise EdgePruneError(f"--onnx needs a run folder holding model.onnx, not {model}")
        acc = evaluate_onnx(folder / "model.onnx", batches, threads, quiet)
    else:
        acc = evaluate_model(net, batches, runtime(), quiet)
    if as_json:
        print(json.dumps({"top1": acc["top1"], "top5": acc["top5"]}))
    else:
        out_console.print(f"{model}: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}% on {acc['images']} images",
                          highlight=False)


def main() -> None:
    from .distributed import shutdown

    try:
        app()
    except EdgePruneError as exc:
        err_console.print(f"edgeprune: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("edgeprune: interrupted; run the same command again (with --resume while "
                          "fine-tuning) to continue", highlight=False)
        sys.exit(130)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
