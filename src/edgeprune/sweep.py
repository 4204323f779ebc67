"""`edgeprune sweep`: one run per ratio / MACs reduction / latency target, then the trade-off.

Every point is an ordinary run folder under `out/points/` (so an interrupted sweep resumes point by
point); the unpruned model's ONNX (and INT8) files are kept in `out/baseline/`. When all points are
done, the baseline and every point's ONNX model (and INT8 model) are timed again side by side in one
call, so their latencies compare fairly, and the Pareto front is marked: no other model is both
faster and more accurate (or, without data, keeps more MACs).
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from .data import even_subset, load_split, loader
from .errors import EdgePruneError
from .evaluate import evaluate_onnx
from .export import export_onnx
from .fsio import ensure_writable_dir, read_json, write_json, write_text
from .measure import onnx_bytes, ort_runner, time_interleaved
from .models import create_model
from .pipeline import INT8_NAME, ONNX_NAME, run
from .quantize import calibration_data, quantize_int8
from .recipe import Recipe, apply_overrides
from .report import final_stage

KINDS = {"ratio": ("prune.ratio", "ratio {v:g}", "ratio-{v:g}"),
         "macs_reduction": ("prune.macs_reduction", "MACs -{p:g}%", "macs-{v:g}"),
         "target_latency_ms": ("prune.target_latency_ms", "<= {v:g} ms", "latency-{v:g}ms")}


def plan(kind: str, values: list[float]) -> list[tuple[str, str, dict]]:
    """(label, folder name, recipe overrides) for each sweep value."""
    if kind not in KINDS:
        raise EdgePruneError(f"unknown sweep kind {kind!r}; use one of {', '.join(KINDS)}")
    if not values:
        raise EdgePruneError("a sweep needs at least one value, e.g. --ratios 0.3,0.5,0.7")
    key, label, folder = KINDS[kind]
    return [(label.format(v=v, p=round(100 * v, 1)), folder.format(v=v), {key: v}) for v in values]


def pareto(points: list[dict], cost: str, score: str) -> list[bool]:
    """For each point: is it on the Pareto front, i.e. no other point has at most its `cost` and at
    least its `score`, one of them strictly?"""
    return [not any(q is not p and q[cost] <= p[cost] and q[score] >= p[score]
                    and (q[cost] < p[cost] or q[score] > p[score]) for q in points) for p in points]


def _top1(report: dict, stage: str) -> float | None:
    return report.get("onnx", report[stage]).get("top1")


def _baseline_onnx(model, folder: Path, recipe: Recipe) -> Path:
    """The unpruned model's ONNX file in `folder`, kept while the model, data and export/INT8 options
    that made it stay the same."""
    key = recipe.model_dump(mode="json", include={"model", "data", "export", "int8"})
    if (folder / "recipe.json").exists() and read_json(folder / "recipe.json") != key:
        for stale in (ONNX_NAME, INT8_NAME, "int8.json"):
            (folder / stale).unlink(missing_ok=True)
    write_json(folder / "recipe.json", key)
    path = folder / ONNX_NAME
    if not path.exists():
        export_onnx(model, model.edgeprune_spec.input_size, path, recipe.export)
    return path


def _baseline_int8(model, folder: Path, recipe: Recipe, quiet: bool) -> dict:
    """The unpruned model in INT8 (calibrated and evaluated like every point); kept in `folder`."""
    done = folder / "int8.json"
    if done.exists() and (folder / INT8_NAME).exists():
        return read_json(done)
    spec = model.edgeprune_spec
    train = load_split(recipe.data.path, spec, True, quiet)
    quantize_int8(folder / ONNX_NAME, folder / INT8_NAME,
                  calibration_data(train, spec, recipe.int8.calibration_images), recipe.int8)
    evaluation = even_subset(load_split(recipe.data.path, spec, False, quiet), recipe.data.eval_images)
    result = evaluate_onnx(folder / INT8_NAME, loader(evaluation, recipe.data.eval_batch_size),
                           recipe.latency.threads, quiet)
    write_json(done, result)
    return result


def sweep(recipe: Recipe, kind: str, values: list[float], out: str | Path, quiet: bool = False,
          overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Run every point of the sweep in `out/points/`, re-time all models together, write
    sweep.json, sweep.md and sweep.html; returns the sweep."""
    out = Path(out)
    log = log or (lambda msg: None)
    planned = [(label, folder, apply_overrides(recipe, overrides))  # every point validated before any runs
               for label, folder, overrides in plan(kind, values)]
    ensure_writable_dir(out)
    reports = {}
    for label, folder, point in planned:
        log(f"sweep point {label}")
        where = out / "points" / folder
        reports[label] = (run(point, where, quiet=quiet, overwrite=overwrite), where)
    first = next(iter(reports.values()))[0]
    base = first["baseline"]
    points = [{"label": "baseline", "folder": None, "macs": base["macs"], "params": base["params"],
               "bytes": base["onnx_bytes"], "top1": base.get("top1")}]
    for label, (report, folder) in reports.items():
        stage = final_stage(report)
        points.append({"label": label, "folder": str(folder), "macs": report[stage]["macs"],
                       "params": report[stage]["params"], "bytes": report[stage]["onnx_bytes"],
                       "top1": _top1(report, stage), "onnx": str(folder / ONNX_NAME)})
        if report.get("int8"):
            q = report["int8"]
            points.append({"label": f"{label} INT8", "folder": str(folder), "macs": report[stage]["macs"],
                           "params": report[stage]["params"], "bytes": q["onnx_bytes"], "top1": q.get("top1"),
                           "onnx": str(folder / INT8_NAME)})
    model = create_model(recipe.model.name, recipe.model.weights, recipe.model.num_classes)
    lat = recipe.latency
    points[0]["onnx"] = str(_baseline_onnx(model, out / "baseline", recipe))
    if recipe.int8.enabled:  # INT8 alone, unpruned: often the point to beat
        log("quantizing the unpruned model to INT8")
        q = _baseline_int8(model, out / "baseline", recipe, quiet)
        points.insert(1, {"label": "baseline INT8", "folder": None, "macs": base["macs"], "params": base["params"],
                          "bytes": onnx_bytes(out / "baseline" / INT8_NAME), "top1": q["top1"],
                          "onnx": str(out / "baseline" / INT8_NAME)})
    log(f"timing the baseline and {len(points) - 1} models side by side on ONNX Runtime")
    size = model.edgeprune_spec.input_size
    runners = {p["label"]: ort_runner(p["onnx"], size, lat.batch_size, lat.threads, spinning=lat.ort_spinning)
               for p in points}
    timed = time_interleaved(runners, lat, quiet, "sweep latency")
    for p in points:
        p["ms"] = timed[p["label"]].median_ms
        p["p90_ms"] = timed[p["label"]].p90_ms
    have_acc = all(p["top1"] is not None for p in points)
    for p, on in zip(points, pareto(points, "ms", "top1" if have_acc else "macs"), strict=True):
        p["pareto"] = on
    fp32 = [p for p in points if not p["label"].endswith("INT8")]  # INT8 keeps the FP32 model's MACs
    for p in points:
        p["pareto_macs"] = None
    if have_acc:
        for p, on in zip(fp32, pareto(fp32, "macs", "top1"), strict=True):
            p["pareto_macs"] = on
    result = {"model": recipe.model.name, "kind": kind, "values": values, "points": points,
              "front_by": "top-1 against ONNX Runtime CPU latency" if have_acc
              else "MACs kept against ONNX Runtime CPU latency (no --data: no accuracy)",
              "latency": {"threads": lat.threads, "batch_size": lat.batch_size, "repeats": lat.repeats},
              "environment": first["environment"], "recipe": recipe.model_dump(mode="json"),
              "command": " ".join(shlex.quote(a) for a in ["edgeprune", *sys.argv[1:]]) if sys.argv[1:]
              else "edgeprune sweep"}
    from .report_html import sweep_page

    write_json(out / "sweep.json", result)
    write_text(out / "sweep.md", markdown(result))
    write_text(out / "sweep.html", sweep_page(result))
    return result


def markdown(result: dict) -> str:
    lat = result["latency"]
    lines = [f"# edgeprune sweep: {result['model']}", "",
             f"ONNX Runtime CPU latency: median of {lat['repeats']} runs, batch {lat['batch_size']}, "
             f"{lat['threads']} threads, every model timed side by side in one call. Pareto front by "
             f"{result['front_by']}.", "",
             "| model | ORT CPU ms | MACs | params | ONNX MB | top-1 (%) | Pareto |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    for p in result["points"]:
        top1 = "" if p["top1"] is None else f"{p['top1']:.2f}"
        lines.append(f"| {p['label']} | {p['ms']:.2f} | {p['macs'] / 1e6:.1f}M | {p['params'] / 1e6:.3f}M | "
                     f"{p['bytes'] / 1e6:.2f} | {top1} | {'**yes**' if p['pareto'] else ''} |")
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)
