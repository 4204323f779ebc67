"""The before/after report: reads stage results, derives reductions, renders Markdown and a console table."""
from __future__ import annotations

from typing import Any

# (label, key path inside a stage result, formatter)
ROWS = [
    ("MACs", ("macs",), lambda v: f"{v / 1e9:.3f}G" if v >= 1e8 else f"{v / 1e6:.2f}M"),
    ("Params", ("params",), lambda v: f"{v / 1e6:.3f}M"),
    ("Size, state dict (MB)", ("state_dict_bytes",), lambda v: f"{v / 1e6:.2f}"),
    ("Size, ONNX (MB)", ("onnx_bytes",), lambda v: f"{v / 1e6:.2f}"),
    ("CPU ms, PyTorch", ("latency_ms", "torch_cpu"), lambda v: f"{v:.2f}"),
    ("CPU ms, ONNX Runtime", ("latency_ms", "ort_cpu"), lambda v: f"{v:.2f}"),
    ("GPU ms, PyTorch", ("latency_ms", "torch_cuda"), lambda v: f"{v:.2f}"),
    ("GPU ms, ONNX Runtime", ("latency_ms", "ort_cuda"), lambda v: f"{v:.2f}"),
    ("Top-1 (%)", ("top1",), lambda v: f"{v:.2f}"),
    ("Top-5 (%)", ("top5",), lambda v: f"{v:.2f}"),
]
# Stages of the pruned architecture, in pipeline order; the last one present is "after".
ACCURACY_STAGES = ("pruned", "recalibrated", "finetuned")
STAGE_LABELS = {"baseline": "baseline (unpruned)", "pruned": "right after pruning",
                "recalibrated": "after BN re-calibration", "finetuned": "after fine-tuning",
                "onnx": "exported ONNX (ONNX Runtime)"}


def _get(stage: dict, path: tuple) -> Any:
    for key in path:
        if not isinstance(stage, dict) or key not in stage:
            return None
        stage = stage[key]
    return stage


def comparison(report: dict) -> list[dict]:
    """One row per metric measured on both models, with the reduction (%) and the factor (x)."""
    rows = []
    base, pruned = report["baseline"], report[final_stage(report)]
    for label, path, fmt in ROWS:
        before, after = _get(base, path), _get(pruned, path)
        if before is None or after is None:
            continue
        row = {"metric": label, "before": fmt(before), "after": fmt(after), "change": "", "factor": ""}
        if path in (("top1",), ("top5",)):
            row["change"] = f"{after - before:+.2f} pts"
        elif before:
            row["change"] = f"{(after - before) / before:+.1%}"
            row["factor"] = f"{before / after:.2f}x" if after else ""
        rows.append(row)
    return rows


def final_stage(report: dict) -> str:
    return [s for s in ACCURACY_STAGES if s in report][-1]


def build(baseline: dict, pruned: dict, accuracy: dict[str, dict], parity: dict, prune: dict, recipe: dict,
          environment: dict, int8: dict | None = None, diagnostics: dict | None = None) -> dict:
    """The report: each stage's measurement and accuracy; the pruned, re-calibrated and fine-tuned
    models share one architecture, so they share its one measurement."""
    def acc(stage: str) -> dict:
        return {k: v for k, v in accuracy.get(stage, {}).items() if k != "images"}

    report = {"baseline": {**baseline, **acc("baseline")}, "pruned": {**pruned, **acc("pruned")}}
    for stage in ("recalibrated", "finetuned"):
        if stage in accuracy:
            report[stage] = {**pruned, **acc(stage)}
    if "onnx" in accuracy:
        report["onnx"] = {"onnx_bytes": pruned["onnx_bytes"], **acc("onnx")}
    if accuracy:
        report["eval_images"] = accuracy["baseline"].get("images")
    if int8:
        report["int8"] = int8
    if diagnostics:
        report["diagnostics"] = diagnostics
    report.update({"onnx_parity": parity, "prune": prune, "recipe": recipe, "environment": environment})
    report["reduction_pct"] = {
        key: round(100 * (1 - pruned[key] / baseline[key]), 2)
        for key in ("macs", "params", "state_dict_bytes", "onnx_bytes") if baseline.get(key)
    }
    report["speedup"] = {k: round(v / pruned["latency_ms"][k], 3) for k, v in baseline["latency_ms"].items()
                         if pruned["latency_ms"].get(k)}
    report["target"] = target(prune, recipe, pruned)
    return report


def target(prune: dict, recipe: dict, pruned: dict) -> dict:
    """What the pruning aimed at and whether the final measurement meets it."""
    opts = recipe["prune"]
    if opts.get("target_latency_ms") is not None:
        runtime = opts["latency_runtime"]
        measured = pruned["latency_ms"].get(runtime)
        return {"kind": "latency", "latency_ms": opts["target_latency_ms"], "runtime": runtime,
                "threads": recipe["latency"]["threads"], "batch_size": recipe["latency"]["batch_size"],
                "measured_ms": measured, "met": measured is not None and measured <= opts["target_latency_ms"],
                "round_to": prune["round_to"], "ratio": prune["ratio"],
                "baseline_ms_in_search": (prune.get("latency_search") or {}).get("baseline_ms")}
    if opts.get("macs_reduction") is not None:
        return {"kind": "macs", "macs_reduction": opts["macs_reduction"], "macs": prune["macs_target"]}
    return {"kind": "ratio", "ratio": opts["ratio"]}


def accuracy_rows(report: dict) -> list[tuple[str, float, float]]:
    return [(STAGE_LABELS[s], report[s]["top1"], report[s]["top5"])
            for s in ("baseline", *ACCURACY_STAGES, "onnx") if s in report and "top1" in report[s]]


def int8_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, FP32 ONNX, INT8 ONNX, factor) for the INT8 stage, measured side by side."""
    q = report.get("int8")
    if not q:
        return []
    f = q["fp32"]
    rows = [("Size, ONNX (MB)", f"{f['onnx_bytes'] / 1e6:.2f}", f"{q['onnx_bytes'] / 1e6:.2f}",
             f"{q['size_reduction_x']:.2f}x smaller"),
            ("CPU ms, ONNX Runtime", f"{f['latency_ms']['ort_cpu']:.2f}", f"{q['latency_ms']['ort_cpu']:.2f}",
             f"{q['speedup_vs_fp32']:.2f}x faster")]
    if q.get("top1") is not None:
        rows += [("Top-1 (%)", f"{f['top1']:.2f}", f"{q['top1']:.2f}", f"{q['top1'] - f['top1']:+.2f} pts"),
                 ("Top-5 (%)", f"{f['top5']:.2f}", f"{q['top5']:.2f}", f"{q['top5'] - f['top5']:+.2f} pts"),
                 ("Top-1 agreement with FP32", "", f"{q['top1_agreement']:.2%}", "")]
    return rows


def _layers_changed(report: dict) -> list[dict]:
    return [layer for layer in report["prune"]["layers"] if layer["channels_before"] != layer["channels_after"]]


def runs(report: dict) -> int:
    """Timed runs behind each latency figure (more than the recipe's when a latency target was judged)."""
    return report["pruned"].get("latency_runs") or report["recipe"]["latency"]["repeats"]


def _target_line(report: dict) -> list[str]:
    t = report.get("target") or {}
    if t.get("kind") != "latency":
        return []
    verdict = "met" if t["met"] else "**missed**"
    return [f"Target: at most {t['latency_ms']:g} ms on {t['runtime']} ({t['threads']} threads, batch "
            f"{t['batch_size']}): {verdict}, {t['measured_ms']:.2f} ms measured on the final model "
            f"(search: {report['prune']['search_trials']} measured trials, round_to {t['round_to']} kept).", ""]


def markdown(report: dict) -> str:
    spec = report["recipe"]["model"]
    env = report["environment"]
    lat = report["recipe"]["latency"]
    lines = [
        f"# edgeprune report: {spec['name']}",
        "",
        *_target_line(report),
        f"Pruned with `{report['prune']['importance']}` importance, "
        f"{'global' if report['prune']['global_pruning'] else 'local'} ranking, channel ratio "
        f"{report['prune']['ratio']:.4f}, round_to {report['prune']['round_to']}.",
        f"Latency: median of {runs(report)} runs after {lat['warmup']} warm-ups, batch {lat['batch_size']}, "
        f"{lat['threads']} threads, on {env['cpu']}"
        + (f" and {env['gpu']}" if env.get("gpu") else "") + ".",
        "",
        "| metric | before | after | change | factor |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['metric']} | {r['before']} | {r['after']} | {r['change']} | {r['factor']} |"
              for r in comparison(report)]
    if accuracy_rows(report):
        lines += ["", f"## Accuracy by stage ({report['recipe']['data']['path']}, {report['eval_images']} images)", "",
                  "| stage | top-1 (%) | top-5 (%) |", "|---|---:|---:|"]
        lines += [f"| {label} | {t1:.2f} | {t5:.2f} |" for label, t1, t5 in accuracy_rows(report)]
        epochs = report.get("finetuned", {}).get("epochs", [])
        if epochs:
            lines += ["", "Fine-tuning: " + "; ".join(
                f"epoch {e['epoch']} loss {e['loss']:.3f}" + (f" top-1 {e['top1']:.2f}" if e.get("top1") is not None
                                                              else "") + f" ({e['seconds']:.0f} s)" for e in epochs)]
    if report.get("int8"):
        q = report["int8"]
        scales = "per-channel" if q["per_channel"] else "per-tensor"
        lines += ["", f"## INT8 (ONNX Runtime static quantization, QDQ, {scales} weights, {q['method']} "
                  f"calibration on {q['calibration_images']} training images)", "",
                  "| metric | FP32 ONNX | INT8 ONNX | change |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {a} | {b} | {c} |" for m, a, b, c in int8_rows(report)]
    parity = report["onnx_parity"]
    lines += ["", f"ONNX parity (ONNX Runtime vs PyTorch, batch {parity['batch']}): max abs diff "
              f"{parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.1%}.", ""]
    if report["prune"]["unpruned"]:
        lines += ["## Layers left unpruned", "", "| layer | why |", "|---|---|"]
        lines += [f"| `{n}` | {why} |" for n, why in report["prune"]["unpruned"].items()]
        lines.append("")
    changed = _layers_changed(report)
    lines += ["## Channel widths", "", f"{len(changed)} of {len(report['prune']['layers'])} conv/linear "
              "layers were narrowed" + (" (per-layer widths, MACs and times below)." if report.get("diagnostics")
                                        else ".")]
    if not report.get("diagnostics"):
        lines += ["", "| layer | type | before | after |", "|---|---|---:|---:|"]
        lines += [f"| `{la['name']}` | {la['kind']} | {la['channels_before']} | {la['channels_after']} |"
                  for la in report["prune"]["layers"]]
    if report.get("diagnostics"):
        lines += diagnostics_markdown(report["diagnostics"])
    for note in report["prune"].get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += ["", f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}.", ""]
    return "\n".join(lines)


def diagnostics_markdown(diag: dict) -> list[str]:
    lines = ["", "## Why isn't it faster? (per-layer profile)", "",
             f"Per-layer medians of {diag['runs']} runs, batch {diag['batch_size']}, {diag['threads']} threads: "
             "ONNX Runtime's profiler (fused Conv+BN+activation kernels traced back to their layer) and PyTorch "
             "forward hooks.", ""]
    lines += [f"- {f}" for f in diag["findings"]]
    lines += ["", f"| layer | channels | MACs before | MACs after | ORT ms before | ORT ms after | "
              f"PyTorch ms before | PyTorch ms after | multiple of {diag['align']} |",
              "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for la in diag["layers"]:
        lines.append(f"| `{la['name']}` | {la['channels_before']} -> {la['channels_after']} | "
                     f"{la['macs_before'] / 1e6:.2f}M | {la['macs_after'] / 1e6:.2f}M | {la['ort_ms_before']:.3f} | "
                     f"{la['ort_ms_after']:.3f} | {la['torch_ms_before']:.3f} | {la['torch_ms_after']:.3f} | "
                     f"{'yes' if la['aligned'] else '**no**'} |")
    other = diag["ort_other_ms"]
    ops = sorted(set(other["before"]) | set(other["after"]))
    if ops:
        lines += ["", "| other ONNX Runtime ops | ms before | ms after |", "|---|---:|---:|"]
        lines += [f"| {op} | {other['before'].get(op, 0):.3f} | {other['after'].get(op, 0):.3f} |" for op in ops]
    return lines


def console_table(report: dict):
    from rich.table import Table

    table = Table(title=f"edgeprune: {report['recipe']['model']['name']}, before -> after")
    for col, justify in (("metric", "left"), ("before", "right"), ("after", "right"),
                         ("change", "right"), ("factor", "right")):
        table.add_column(col, justify=justify)
    for row in comparison(report):
        table.add_row(row["metric"], row["before"], row["after"], row["change"], row["factor"])
    return table


def int8_table(report: dict):
    from rich.table import Table

    table = Table(title="INT8 (ONNX Runtime), next to the FP32 ONNX model")
    for col, justify in (("metric", "left"), ("FP32", "right"), ("INT8", "right"), ("change", "right")):
        table.add_column(col, justify=justify)
    for row in int8_rows(report):
        table.add_row(*row)
    return table


def accuracy_table(report: dict):
    from rich.table import Table

    table = Table(title=f"accuracy on {report['recipe']['data']['path']} ({report['eval_images']} images)")
    for col, justify in (("stage", "left"), ("top-1 %", "right"), ("top-5 %", "right")):
        table.add_column(col, justify=justify)
    for label, t1, t5 in accuracy_rows(report):
        table.add_row(label, f"{t1:.2f}", f"{t5:.2f}")
    return table
