"""`run(recipe, out)`: load -> measure -> prune -> export -> measure -> report, in one run folder.

Each stage writes its result under `out/stages/`; a re-run with the same recipe skips stages whose
result is already there, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import importlib.metadata
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import artifact, report
from .errors import EdgePruneError
from .export import check_parity, export_onnx
from .fsio import ensure_writable_dir, read_json, write_json, write_text
from .measure import measure, onnx_bytes
from .models import create_model
from .prune import prune
from .recipe import ExportOptions, Recipe

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

    def __init__(self, out: str | Path, recipe: Recipe, overwrite: bool = False):
        self.root = ensure_writable_dir(out)
        self.stages = self.root / "stages"
        for stale in [*self.root.glob(".export-*"), *self.root.rglob(".*.tmp")]:  # left by a killed run
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        resolved = recipe.model_dump(mode="json")
        recipe_path = self.root / "recipe.json"
        if recipe_path.exists() and read_json(recipe_path) != resolved:
            if not overwrite:
                raise EdgePruneError(f"{self.root} holds a run of a different recipe; choose another --out "
                                     "or pass --overwrite")
            shutil.rmtree(self.stages, ignore_errors=True)
        write_json(recipe_path, resolved)

    def result(self, stage: str) -> dict | None:
        path = self.stages / f"{stage}.json"
        return read_json(path) if path.exists() else None

    def save(self, stage: str, data: dict, invalidates: tuple[str, ...] = ()) -> dict:
        """Record a stage result; results computed from the stage's old output are dropped first."""
        for later in invalidates:
            (self.stages / f"{later}.json").unlink(missing_ok=True)
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


def run(recipe: Recipe, out: str | Path, quiet: bool = False, overwrite: bool = False) -> dict:
    """Run every stage of `recipe` in the folder `out`; returns the report (also in out/report.json)."""
    log = _log_to_stderr(quiet)
    folder = RunFolder(out, recipe, overwrite)
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model.name, recipe.model.weights, recipe.model.num_classes)
    input_size = model.edgeprune_spec.input_size

    prune_result = folder.result("prune")
    if prune_result is not None and (folder.root / artifact.META).exists():
        pruned_model = artifact.load(folder.root)
    else:
        log("pruning with DepGraph")
        pruned_model, result = prune(model, recipe.prune)
        artifact.save(pruned_model, result.history, folder.root)
        prune_result = folder.save("prune", result.to_dict(), invalidates=("export", "measure"))

    parity = folder.result("export")
    if parity is None or not (folder.root / ONNX_NAME).exists():
        log("exporting to ONNX and checking parity")
        parity = folder.save("export", export_stage(pruned_model, folder.root, recipe.export),
                             invalidates=("measure",))

    measured = folder.result("measure")
    if measured is None:
        log("measuring the baseline and the pruned model side by side")
        measured = folder.save("measure", measure_models(
            {"baseline": (model, None), "pruned": (pruned_model, folder.root / ONNX_NAME)},
            input_size, recipe, quiet))
    baseline, pruned = measured["baseline"], measured["pruned"]

    final = report.build(baseline, pruned, parity, prune_result, recipe.model_dump(mode="json"), environment())
    write_json(folder.root / "report.json", final)
    write_text(folder.root / "report.md", report.markdown(final))
    return final


def export_stage(model, root: Path, opts: ExportOptions) -> dict:
    input_size = model.edgeprune_spec.input_size
    path = export_onnx(model, input_size, root / ONNX_NAME, opts)
    return check_parity(model, path, input_size, opts).to_dict()


def export_run(out: str | Path, opts: ExportOptions) -> dict:
    """Re-export the pruned model of a finished run (for example at another opset) and re-check parity."""
    root = Path(out)
    model = artifact.load(root)
    ensure_writable_dir(root)
    parity = export_stage(model, root, opts)
    write_json(root / "stages" / "export.json", parity)
    report_path = root / "report.json"
    if report_path.exists():
        final = read_json(report_path)
        final["onnx_parity"] = parity
        final["pruned"]["onnx_bytes"] = onnx_bytes(root / ONNX_NAME)
        write_json(report_path, final)
        write_text(root / "report.md", report.markdown(final))
    return parity
