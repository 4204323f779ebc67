"""The before/after report: gathers the stage results into report.json and renders it as Markdown.

It computes nothing new beyond ratios of measured figures; the tables come from `rows`.
"""
from __future__ import annotations

from dataclasses import asdict

from . import rows
from .recipe import Recipe


def build(recipe: Recipe, results: dict[str, object], environment: dict,
          timings: dict[str, dict] | None = None) -> dict:
    """report.json from the typed stage results. The pruned, re-calibrated and fine-tuned models share
    one architecture, so they share its one measurement. `timings`: each stage's wall seconds, and whether
    this run reused it from an earlier one (`Runner.timings`)."""
    measured = results["measure"]
    baseline, pruned = asdict(measured.baseline), asdict(measured.pruned)

    def acc(name: str) -> dict:
        result = results.get(name)
        if result is None:
            return {}
        accuracy = getattr(result, "accuracy", result)
        if accuracy.map50_95 is not None:
            return {"map50_95": accuracy.map50_95, "map50": accuracy.map50}
        return {"top1": accuracy.top1, "top5": accuracy.top5}

    report: dict = {"baseline": {**baseline, **acc("accuracy_baseline")},
                    "pruned": {**pruned, **acc("accuracy_pruned")}}
    if "recalibrated" in results:
        report["recalibrated"] = {**pruned, **acc("recalibrated"), "bn_layers": results["recalibrated"].bn_layers}
    if "finetuned" in results:
        report["finetuned"] = {**pruned, **acc("finetuned"), **asdict(results["finetuned"].training)}
    exported = results["export"]
    if "accuracy_onnx" in results:
        report["onnx"] = {"onnx_bytes": exported.onnx_bytes, **acc("accuracy_onnx")}
    if "accuracy_baseline" in results:
        report["eval_images"] = results["accuracy_baseline"].images
    if "int8" in results:
        report["int8"] = asdict(results["int8"])
    if "diagnose" in results:
        report["diagnostics"] = asdict(results["diagnose"])
    if "sensitivity" in results:  # with a latency target, as timed (each point's latency_saved_ms)
        report["sensitivity"] = asdict(results.get("sensitivity_latency") or results["sensitivity"])
    if "steps" in results:  # the steps before the last (the last one is the pruned/recalibrated/finetuned stages)
        schedule = results["steps"]
        report["schedule"] = {"epochs": schedule.epochs, "steps": [asdict(s) for s in schedule.steps]}
    prune = asdict(results["prune"])
    recipe_json = recipe.model_dump(mode="json")
    if exported.openvino_parity is not None:
        report["openvino_parity"] = asdict(exported.openvino_parity)
    report.update({"onnx_parity": asdict(exported.parity),
                   "export": {"exporter": exported.exporter, "opset": exported.opset,
                              "onnx_bytes": exported.onnx_bytes, "fallback_reason": exported.fallback_reason,
                              "requested_opset": _requested_opset(exported, recipe.export.opset)},
                   "prune": prune, "recipe": recipe_json, "environment": environment,
                   "notes": export_notes(exported, recipe.export.opset)})
    report["reduction_pct"] = {key: round(100 * (1 - pruned[key] / baseline[key]), 2)
                               for key in ("macs", "params", "state_dict_bytes", "onnx_bytes") if baseline.get(key)}
    report["speedup"] = {k: round(v / pruned["latency_ms"][k], 3) for k, v in baseline["latency_ms"].items()
                         if pruned["latency_ms"].get(k)}
    report["target"] = target(prune, recipe_json, pruned, baseline)
    if timings:
        report["timings"] = timings
    return report


def _requested_opset(exported, asked: int) -> int | None:
    """export.opset when the file holds another opset (the dynamo exporter keeps 18 when it cannot convert down)."""
    return None if exported.opset == asked else asked


def export_notes(exported, asked: int) -> list[str]:
    """The export's notes: a fallback to the dynamo exporter, and a file whose opset is not `asked` (export.opset)."""
    notes = []
    if exported.fallback_reason is not None:
        notes.append(f"The TorchScript ONNX exporter failed ({exported.fallback_reason}); model.onnx was written by "
                     "the dynamo exporter instead, whose node names carry no module scopes: ONNX Runtime's per-layer "
                     "times cannot be traced back to layers (only per-operator times are shown).")
    if _requested_opset(exported, asked) is not None:
        notes.append(f"model.onnx uses opset {exported.opset}, not the {asked} asked for (export.opset): the "
                     f"dynamo exporter could not convert the model down to it. A runtime that reads only opset "
                     f"{asked} or lower needs the TorchScript exporter (export.dynamo false) to succeed on this model.")
    return notes


def target(prune: dict, recipe: dict, pruned: dict, baseline: dict) -> dict:
    """What the pruning aimed at and whether the final measurement meets it. A speed-up target is judged on the
    final side-by-side measurement of both models (its `latency_ms` is the ms it stood for in the search)."""
    opts = recipe["prune"]
    if opts.get("target_latency_ms") is not None or opts.get("target_speedup") is not None:
        runtime, search = opts["latency_runtime"], prune.get("latency_search") or {}
        measured, unpruned = pruned["latency_ms"].get(runtime), baseline["latency_ms"].get(runtime)
        speedup = unpruned / measured if measured and unpruned else None
        goal = opts.get("target_speedup")
        met = (speedup is not None and speedup >= goal) if goal is not None else (
            measured is not None and measured <= opts["target_latency_ms"])
        return {"kind": "latency", "latency_ms": opts["target_latency_ms"] or search.get("target_ms"),
                "speedup": goal, "runtime": runtime,
                "threads": recipe["latency"]["threads"], "batch_size": recipe["latency"]["batch_size"],
                "measured_ms": measured, "measured_speedup": speedup, "met": met,
                "round_to": prune["round_to"], "ratio": prune["ratio"],
                "baseline_ms_in_search": search.get("baseline_ms")}
    if opts.get("macs_reduction") is not None:
        return {"kind": "macs", "macs_reduction": opts["macs_reduction"], "macs": prune["macs_target"]}
    return {"kind": "ratio", "ratio": opts["ratio"]}


def markdown(report: dict) -> str:
    prune = report["prune"]
    verdict = rows.latency_verdict(report)
    lines = [f"# edgeprune report: {report['recipe']['model']['name']}", ""]
    if verdict:
        lines += [verdict[0].replace("MISSED", "**missed**"), ""]
    allocation = prune.get("allocation") or ("global" if prune["global_pruning"] else "uniform")
    how = (f"per-group ratios from the sensitivity analysis (summed output distortion of the chosen points "
           f"{prune['predicted_distortion']:.4f} nats)"
           if allocation == "sensitivity" else f"{allocation} allocation, channel ratio {prune['ratio']:.4f}")
    lines += [f"Pruned with `{prune['importance']}` importance, {how}, round_to {prune['round_to']}.",
              rows.latency_method(report), ""]
    comparison = rows.comparison(report)
    comparison.title = "Before and after"
    lines += rows.markdown(comparison)
    for table in (rows.accuracy(report), rows.int8(report), rows.benchmark(report.get("benchmark"))):
        if table is not None:
            lines += rows.markdown(table)
    epochs = report.get("finetuned", {}).get("epochs", [])
    if epochs:
        lines += ["Fine-tuning: " + "; ".join(
            f"epoch {e['epoch']} loss {e['loss']:.3f}" + (f" top-1 {e['top1']:.2f}" if e.get("top1") is not None
                                                          else "") + f" ({e['seconds']:.0f} s)" for e in epochs), ""]
    lines += [rows.parity(report), ""]
    for table in (rows.max_drop(report), rows.schedule(report), rows.sensitivity(report),
                  rows.unpruned(report)):
        if table is not None:
            lines += rows.markdown(table)
    diag = report.get("diagnostics")
    changed = [la for la in prune["layers"] if la["channels_before"] != la["channels_after"]]
    lines += [f"{len(changed)} of {len(prune['layers'])} conv/linear layers were narrowed"
              + (" (per-layer widths, MACs and times below)." if diag else "."), ""]
    if diag:
        lines += ["## Why isn't it faster? (per-layer profile)", "",
                  f"Per-layer medians of {diag['runs']} runs, batch {diag['batch_size']}, {diag['threads']} threads: "
                  "ONNX Runtime's profiler (fused Conv+BN+activation kernels traced back to their layer) and "
                  "PyTorch forward hooks.", ""]
        lines += [f"- {f}" for f in diag["findings"]] + [""]
        lines += rows.markdown(rows.layer_times(diag), "###")
        other = rows.other_ops(diag)
        if other is not None:
            lines += rows.markdown(other, "###")
    else:
        lines += rows.markdown(rows.widths(report))
    lines += [f"Note: {note}\n" for note in rows.notes(report)]
    if report.get("timings"):
        lines += [rows.timings(report["timings"]), ""]
    env = report["environment"]
    lines += [f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}.", ""]
    return "\n".join(lines)


def console_tables(report: dict) -> list:
    """The rich tables the CLI prints after a run."""
    return [rows.rich(t) for t in (rows.comparison(report), rows.accuracy(report), rows.int8(report))
            if t is not None]
