"""`run(recipe, out)`: load -> measure -> prune -> export -> measure -> report, in one run folder.

Each stage writes its result under `out/stages/`; a re-run with the same recipe skips stages whose
result is already there, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import importlib.metadata
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import artifact, report
from .data import even_subset, load_split, loader, shard
from .diagnose import diagnose
from .distributed import Runtime, runtime, seed_everything
from .errors import EdgePruneError
from .evaluate import evaluate, evaluate_onnx
from .export import check_parity, export_onnx
from .fsio import ensure_writable_dir, read_json, write_json, write_text
from .measure import measure, onnx_bytes
from .models import create_model
from .prune import prune
from .quantize import INT8_NAME, calibration_data, compare_int8, quantize_int8
from .recipe import ExportOptions, Recipe
from .recover import finetune, recalibrate_bn

ONNX_NAME = "model.onnx"


def _log_to_stderr(quiet: bool) -> Callable[[str], None]:
    from rich.console import Console

    console = Console(stderr=True, log_path=False)
    return (lambda msg: None) if quiet else (lambda msg: console.log(msg))


def environment() -> dict:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "torch": torch.__version__, "torch_pruning": version("torch-pruning"),
           "onnxruntime": version("onnxruntime"), "onnx": version("onnx")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


class RunFolder:
    """The run directory: resolved recipe, stage results, artifact, ONNX and report."""

    def __init__(self, out: str | Path, recipe: Recipe, overwrite: bool = False, write: bool = True):
        self.root = Path(out)
        self.stages = self.root / "stages"
        if not write:
            return
        ensure_writable_dir(self.root)
        for stale in [*self.root.glob(".export-*"), *self.root.rglob(".*.tmp")]:  # left by a killed run
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        resolved = recipe.model_dump(mode="json")
        recipe_path = self.root / "recipe.json"
        if recipe_path.exists() and read_json(recipe_path) != resolved:
            if not overwrite:
                raise EdgePruneError(f"{self.root} holds a run of a different recipe; choose another --out "
                                     "or pass --overwrite")
            self._discard()
        elif overwrite:
            self._discard()
        write_json(recipe_path, resolved)

    def _discard(self) -> None:
        shutil.rmtree(self.stages, ignore_errors=True)
        (self.root / FINETUNE_CHECKPOINT).unlink(missing_ok=True)

    def result(self, stage: str) -> dict | None:
        path = self.stages / f"{stage}.json"
        return read_json(path) if path.exists() else None

    def save(self, stage: str, data: dict, invalidates: tuple[str, ...] = ()) -> dict:
        """Record a stage result; results computed from the stage's old output are dropped first."""
        for later in invalidates:
            (self.stages / f"{later}.json").unlink(missing_ok=True)
        if "finetuned" in invalidates:  # its checkpoint belongs to the weights being replaced
            (self.root / FINETUNE_CHECKPOINT).unlink(missing_ok=True)
        write_json(self.stages / f"{stage}.json", data)
        return data


def measure_models(models: dict, input_size, recipe: Recipe, quiet: bool = True) -> dict[str, dict]:
    """Measure `{label: (model, onnx path or None)}` side by side; a missing ONNX file is exported
    to a temporary folder for the ONNX Runtime figures."""
    with tempfile.TemporaryDirectory(prefix="edgeprune-") as tmp:
        ready = {label: (model, path if path is not None else
                         export_onnx(model, input_size, Path(tmp) / f"{label}.onnx", recipe.export))
                 for label, (model, path) in models.items()}
        return {label: m.to_dict() for label, m in measure(ready, input_size, recipe.latency, quiet).items()}


class _Stages:
    """Runs the stages of one recipe in one folder; only the main process writes."""

    def __init__(self, recipe: Recipe, folder: RunFolder, rt: Runtime, quiet: bool, resume: bool):
        self.recipe, self.folder, self.rt, self.quiet, self.resume = recipe, folder, rt, quiet, resume
        self.log = _log_to_stderr(quiet or not rt.is_main)
        self.model = create_model(recipe.model.name, recipe.model.weights, recipe.model.num_classes)
        self.spec = self.model.edgeprune_spec
        self._splits: dict[bool, object] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="edgeprune-")  # the baseline's ONNX, exported once
        self._baseline_onnx: Path | None = None

    def baseline_onnx(self) -> Path:
        """The unpruned model exported to ONNX (once per run) for latency search, measurement and profiling."""
        if self._baseline_onnx is None:
            self._baseline_onnx = export_onnx(self.model, self.spec.input_size,
                                              Path(self._scratch.name) / "baseline.onnx", self.recipe.export)
        return self._baseline_onnx

    def close(self) -> None:
        self._scratch.cleanup()

    def split(self, train: bool):
        if train not in self._splits:
            self._splits[train] = load_split(self.recipe.data.path, self.spec, train, self.quiet or not self.rt.is_main)
        return self._splits[train]

    def stage(self, name: str, compute: Callable[[], dict], invalidates: tuple[str, ...] = (),
              collective: bool = True) -> dict:
        """The stage's saved result, or compute it and save it (on the main rank). A collective stage
        runs on every rank and ends in a barrier; others run on the main rank alone."""
        done = self.folder.result(name)
        if done is not None:
            return done
        result = compute()
        if self.rt.is_main:
            self.folder.save(name, result, invalidates)
        if collective:
            self.rt.barrier()
        return result

    def eval_set(self):
        return even_subset(self.split(False), self.recipe.data.eval_images)

    def accuracy(self, model, label: str) -> dict:
        data = self.recipe.data
        self.log(f"evaluating {label} on {data.path}")
        ds = shard(self.eval_set(), self.rt.rank, self.rt.world_size)
        return evaluate(model, loader(ds, data.eval_batch_size, workers=data.workers), self.rt,
                        self.quiet or not self.rt.is_main, desc=f"evaluate {label}")

    def save_model(self, model, history) -> None:
        if self.rt.is_main:
            artifact.save(model, history, self.folder.root)

    def prune(self):
        root = self.folder.root
        pruned = None
        if self.folder.result("prune") is None:
            if self.rt.is_main:
                self.log("pruning with DepGraph")
                calibration = None
                if self.recipe.data.path and self.recipe.prune.importance in ("taylor", "hessian"):
                    calibration = loader(self.split(True), 32, limit=32 * self.recipe.prune.calibration_batches)
                opts = self.recipe.prune
                if opts.target_latency_ms is not None:
                    from .target import OnnxLatencyProbe

                    with tempfile.TemporaryDirectory(prefix="edgeprune-target-") as tmp:
                        probe = OnnxLatencyProbe(self.model, opts.latency_runtime, self.recipe.latency,
                                                 self.recipe.export, tmp, baseline_onnx=self.baseline_onnx())
                        self.log(f"unpruned: {probe.baseline_ms:.2f} ms on {opts.latency_runtime}; searching for "
                                 f"<= {opts.target_latency_ms:g} ms")
                        pruned, result = prune(self.model, opts, calibration=calibration, latency_probe=probe,
                                               log=self.log)
                else:
                    pruned, result = prune(self.model, opts, calibration=calibration)
                artifact.save(pruned, result.history, root)
                self.folder.save("prune", result.to_dict(), invalidates=LATER_STAGES)
            self.rt.barrier()
        # Rebuild from the artifact only where the pruned model is not in memory (a resume, other ranks).
        return pruned if pruned is not None else artifact.load(root), self.folder.result("prune")

    def recover(self, pruned, history) -> dict[str, dict]:
        recipe, opts, out = self.recipe, self.recipe.recover, {}
        out["baseline"] = self.stage("accuracy_baseline", lambda: self.accuracy(self.model, "the baseline"))
        chance = 100 / self.spec.num_classes
        if recipe.model.weights != "none" and out["baseline"]["top1"] < 2 * chance:
            self.log(f"[bold red]warning:[/] the unpruned model scores {out['baseline']['top1']:.1f}% (chance is "
                     f"{chance:.1f}%): do the dataset's class folders match the model's classes, in order?")
        out["pruned"] = self.stage("accuracy_pruned", lambda: self.accuracy(pruned, "the pruned model"))
        if opts.recalibrate:
            def recalibrate():
                self.log(f"re-calibrating BatchNorm on {opts.calibration_images} training images")
                layers = recalibrate_bn(pruned, self.split(True), opts.calibration_images, opts.batch_size,
                                        self.rt.device, recipe.seed, self.quiet or not self.rt.is_main)
                self.save_model(pruned, history)
                return {**self.accuracy(pruned, "the re-calibrated model"), "bn_layers": layers}
            out["recalibrated"] = self.stage("recalibrated", recalibrate, invalidates=("finetuned", *LATE_STAGES))
        if opts.epochs > 0:
            def tune():
                teacher = self.model if opts.distill else None
                self.log(f"fine-tuning {opts.epochs} epoch(s) on {self.rt.world_size} process(es), "
                         f"{'distilling from the unpruned model' if teacher else 'cross-entropy only'}")
                result = finetune(pruned, teacher, self.split(True),
                                  self.eval_set() if opts.eval_every_epoch else None, opts, self.rt,
                                  self.folder.root / FINETUNE_CHECKPOINT, self.resume, recipe.seed,
                                  self.quiet or not self.rt.is_main)
                self.save_model(pruned, history)
                return {**self.accuracy(pruned, "the fine-tuned model"), **result.to_dict()}
            out["finetuned"] = self.stage("finetuned", tune, invalidates=LATE_STAGES)
        return out


LATE_STAGES = ("export", "accuracy_onnx", "int8", "measure", "diagnose")
LATER_STAGES = ("accuracy_baseline", "accuracy_pruned", "recalibrated", "finetuned", *LATE_STAGES)
FINETUNE_CHECKPOINT = "finetune-checkpoint.pt"
FINAL_REPEATS = 100  # timed runs behind a latency target's verdict: short load spikes cannot move the median


def run(recipe: Recipe, out: str | Path, quiet: bool = False, overwrite: bool = False,
        resume: bool = False) -> dict | None:
    """Run every stage of `recipe` in the folder `out`; returns the report (also in out/report.json).

    Under torchrun every process joins evaluation and fine-tuning; only rank 0 prunes, writes files,
    exports and measures, and only rank 0 returns the report.
    """
    rt = runtime()
    seed_everything(recipe.seed)
    folder = RunFolder(out, recipe, overwrite, write=rt.is_main)
    rt.barrier()
    stages = _Stages(recipe, folder, rt, quiet, resume)
    try:
        return _run(recipe, folder, rt, stages, quiet)
    finally:
        stages.close()


def _run(recipe: Recipe, folder: RunFolder, rt: Runtime, stages: _Stages, quiet: bool) -> dict | None:
    pruned_model, prune_result = stages.prune()
    accuracy = stages.recover(pruned_model, prune_result["history"]) if recipe.data.path else {}
    if not rt.is_main:
        return None
    log, input_size = stages.log, stages.spec.input_size

    parity = folder.result("export")
    if parity is None or not (folder.root / ONNX_NAME).exists():
        log("exporting to ONNX and checking parity")
        parity = folder.save("export", export_stage(pruned_model, folder.root, recipe.export),
                             invalidates=("accuracy_onnx", "int8", "measure", "diagnose"))
    if recipe.data.path:
        accuracy["onnx"] = stages.stage("accuracy_onnx", lambda: evaluate_onnx(
            folder.root / ONNX_NAME, loader(stages.eval_set(), recipe.data.eval_batch_size),
            recipe.latency.threads, quiet), collective=False)
    if recipe.int8.enabled and (folder.result("int8") is None or not (folder.root / INT8_NAME).exists()):
        log(f"quantizing to INT8 (calibration on {recipe.int8.calibration_images} training images)")
        folder.save("int8", int8_stage(folder.root, recipe, stages.spec, stages.split(True), stages.eval_set(), quiet))

    measured = folder.result("measure")
    if measured is None:
        log("measuring the baseline and the pruned model side by side")
        timing = recipe
        if recipe.prune.target_latency_ms is not None:  # the verdict on the target: a median of many runs
            timing = recipe.model_copy(update={"latency": recipe.latency.model_copy(
                update={"repeats": max(recipe.latency.repeats, FINAL_REPEATS)})})
        measured = folder.save("measure", measure_models(
            {"baseline": (stages.model, stages.baseline_onnx()), "pruned": (pruned_model, folder.root / ONNX_NAME)},
            input_size, timing, quiet), invalidates=("diagnose",))

    diagnostics = None
    if recipe.latency.per_layer:
        def profile_layers():
            log("profiling every layer of both models (ONNX Runtime and PyTorch)")
            speedup = {k: v / measured["pruned"]["latency_ms"][k] for k, v in measured["baseline"]["latency_ms"].items()
                       if measured["pruned"]["latency_ms"].get(k)}
            return diagnose(stages.model, stages.baseline_onnx(), pruned_model, folder.root / ONNX_NAME,
                            recipe.latency, speedup)
        diagnostics = stages.stage("diagnose", profile_layers, collective=False)

    final = report.build(measured["baseline"], measured["pruned"], accuracy, parity, prune_result,
                         recipe.model_dump(mode="json"), environment(), int8=folder.result("int8"),
                         diagnostics=diagnostics)
    write_report(folder.root, final)
    return final


def write_report(root: Path, final: dict) -> None:
    """report.json, report.md and the self-contained report.html of a run folder."""
    from .report_html import page

    write_json(root / "report.json", final)
    write_text(root / "report.md", report.markdown(final))
    write_text(root / "report.html", page(final))


def export_stage(model, root: Path, opts: ExportOptions) -> dict:
    input_size = model.edgeprune_spec.input_size
    path = export_onnx(model, input_size, root / ONNX_NAME, opts)
    return check_parity(model, path, input_size, opts).to_dict()


def int8_stage(root: Path, recipe: Recipe, spec, train_ds, eval_ds, quiet: bool) -> dict:
    """Quantize root/model.onnx to root/model.int8.onnx and compare the two on `eval_ds`."""
    opts = recipe.int8
    quantize_int8(root / ONNX_NAME, root / INT8_NAME, calibration_data(train_ds, spec, opts.calibration_images), opts)
    result = compare_int8(root / ONNX_NAME, root / INT8_NAME, loader(eval_ds, recipe.data.eval_batch_size),
                          spec.input_size, recipe.latency, quiet)
    return {**result, "calibration_images": min(opts.calibration_images, len(train_ds)), "method": opts.method,
            "per_channel": opts.per_channel}


def export_run(out: str | Path, opts: ExportOptions, int8: bool = False, data: str | None = None,
               quiet: bool = True) -> dict:
    """Re-export the pruned model of a finished run (for example at another opset) and re-check parity;
    with `int8`, also quantize it (calibrated on `data`) and add the `int8` stage to the report."""
    root = Path(out)
    model = artifact.load(root)
    ensure_writable_dir(root)
    parity = export_stage(model, root, opts)
    write_json(root / "stages" / "export.json", parity)
    result = {"onnx_parity": parity}
    if int8:
        recipe = Recipe.model_validate(read_json(root / "recipe.json")) if (root / "recipe.json").exists() \
            else Recipe()
        data = data or recipe.data.path
        if not data:
            raise EdgePruneError("--int8 needs --data: INT8 calibration reads a few hundred training images")
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": data}),
                                           "int8": recipe.int8.model_copy(update={"enabled": True})})
        spec = model.edgeprune_spec
        train = load_split(data, spec, True, quiet)
        evaluation = even_subset(load_split(data, spec, False, quiet), recipe.data.eval_images)
        result["int8"] = int8_stage(root, recipe, spec, train, evaluation, quiet)
        write_json(root / "stages" / "int8.json", result["int8"])
    report_path = root / "report.json"
    if report_path.exists():
        final = read_json(report_path)
        final["onnx_parity"] = parity
        final["pruned"]["onnx_bytes"] = onnx_bytes(root / ONNX_NAME)
        if "int8" in result:
            final["int8"] = result["int8"]
        write_report(root, final)
    return result
