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

from . import rows
from .accuracy import Accuracy, evaluate_onnx
from .data import even_subset, load_split, loader
from .distributed import runtime
from .errors import EdgePruneError
from .export import export_onnx
from .fsio import ensure_writable_dir, write_json, write_text
from .measure import onnx_bytes, ort_runner, ort_waiting, time_interleaved
from .models import create_model
from .models.yolo import is_yolo_name
from .pipeline import run, share_sensitivity
from .quantize import calibration_data, quantize_int8
from .recipe import Recipe, apply_overrides
from .results import from_json, to_json
from .stages import INT8_NAME, ONNX_NAME, Stage, StageStore

# The unpruned model's files in DIR/baseline/, kept while what made them stays the same.
BASELINE_STAGES = (
    Stage("baseline_export", ("model", "export"), writes=(ONNX_NAME,)),
    Stage("baseline_int8", ("model", "int8", "data", "latency.threads"), after=("baseline_export",),
          writes=(INT8_NAME,), wanted=lambda r: r.int8.enabled),
)

KINDS = {"ratio": ("prune.ratio", "ratio {v:g}", "ratio-{v:g}"),
         "macs_reduction": ("prune.macs_reduction", "MACs -{p:g}%", "macs-{v:g}"),
         "target_latency_ms": ("prune.target_latency_ms", "<= {v:g} ms", "latency-{v:g}ms"),
         "target_speedup": ("prune.target_speedup", ">= {v:g}x faster", "speedup-{v:g}x")}


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


def _baseline_files(model, folder: Path, recipe: Recipe, quiet: bool) -> Accuracy | None:
    """Export (and with INT8 enabled, quantize and evaluate) the unpruned model in `folder`."""
    store = StageStore(folder, BASELINE_STAGES)
    export, int8 = BASELINE_STAGES
    fingerprint = store.fingerprint(export, recipe)
    if store.fresh(export, fingerprint) is None:
        export_onnx(model, model.edgeprune_spec.input_size, folder / ONNX_NAME, recipe.export)
        store.save(export, fingerprint, {"onnx_bytes": onnx_bytes(folder / ONNX_NAME)})
    if not recipe.int8.enabled:
        return None
    fingerprint = store.fingerprint(int8, recipe)
    done = store.fresh(int8, fingerprint)
    if done is not None:
        return from_json(Accuracy, done)
    spec, data = model.edgeprune_spec, recipe.int8_data
    train = load_split(data, spec, True, quiet)
    quantize_int8(folder / ONNX_NAME, folder / INT8_NAME,
                  calibration_data(train, spec, recipe.int8.calibration_images), recipe.int8)
    evaluation = even_subset(load_split(data, spec, False, quiet), recipe.data.eval_images)
    result = evaluate_onnx(folder / INT8_NAME, loader(evaluation, recipe.data.eval_batch_size),
                           recipe.latency.threads, quiet)
    store.save(int8, fingerprint, to_json(result))
    return result


def sweep(recipe: Recipe, kind: str, values: list[float], out: str | Path, quiet: bool = False,
          overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict | None:
    """Run every point of the sweep in `out/points/`, re-time all models together, write
    sweep.json, sweep.md and sweep.html; returns the sweep.

    Under torchrun every process takes part in each point's evaluation and fine-tuning; the main
    process alone re-times the models and writes the sweep, and only it returns the result."""
    out = Path(out)
    log = log or (lambda msg: None)
    if is_yolo_name(recipe.model.name):
        raise EdgePruneError("sweep covers classifiers so far; for a detector, run `edgeprune prune` once per ratio")
    planned = [(label, folder, apply_overrides(recipe, overrides))  # every point validated before any runs
               for label, folder, overrides in plan(kind, values)]
    rt = runtime()
    if rt.is_main:
        ensure_writable_dir(out)
    rt.barrier()
    reports = {}
    for label, folder, point in planned:
        log(f"sweep point {label}")
        where = out / "points" / folder
        if reports and rt.is_main:  # a sensitivity analysis does not depend on the target: the first point's serves
            share_sensitivity(next(iter(reports.values()))[1], where)
        rt.barrier()
        reports[label] = (run(point, where, quiet=quiet, overwrite=overwrite), where)
    if not rt.is_main:  # the main process re-times the models and writes the sweep
        return None
    first = next(iter(reports.values()))[0]
    base = first["baseline"]
    points = [{"label": "baseline", "folder": None, "macs": base["macs"], "params": base["params"],
               "bytes": base["onnx_bytes"], "top1": base.get("top1")}]
    for label, (report, folder) in reports.items():
        stage = rows.final_stage(report)
        points.append({"label": label, "folder": str(folder), "macs": report[stage]["macs"],
                       "params": report[stage]["params"], "bytes": report[stage]["onnx_bytes"],
                       "top1": _top1(report, stage), "onnx": str(folder / ONNX_NAME)})
        if report.get("int8"):
            q = report["int8"]
            points.append({"label": f"{label} INT8", "folder": str(folder), "macs": report[stage]["macs"],
                           "params": report[stage]["params"], "bytes": q["onnx_bytes"], "top1": q.get("top1"),
                           "onnx": str(folder / INT8_NAME)})
    model = create_model(**recipe.model.model_dump())
    lat = recipe.latency
    points[0]["onnx"] = str(out / "baseline" / ONNX_NAME)
    if recipe.int8.enabled:  # INT8 alone, unpruned: often the point to beat
        log("quantizing the unpruned model to INT8")
    q = _baseline_files(model, out / "baseline", recipe, quiet)
    if q is not None:
        points.insert(1, {"label": "baseline INT8", "folder": None, "macs": base["macs"], "params": base["params"],
                          "bytes": onnx_bytes(out / "baseline" / INT8_NAME), "top1": q.top1,
                          "onnx": str(out / "baseline" / INT8_NAME)})
    log(f"timing the baseline and {len(points) - 1} models side by side on ONNX Runtime")
    size = model.edgeprune_spec.input_size
    runners = {p["label"]: ort_runner(p["onnx"], size, lat.batch_size, lat.threads, **ort_waiting(lat))
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
    table = rows.sweep(result)
    return "\n".join([f"# edgeprune sweep: {result['model']}", "",
                      f"ONNX Runtime CPU latency: median of {lat['repeats']} runs, batch {lat['batch_size']}, "
                      f"{lat['threads']} threads, every model timed side by side in one call. Pareto front by "
                      f"{result['front_by']}.", "", *rows.markdown(table)[2:], f"Reproduce: `{result['command']}`", ""])
