"""The tables and sentences of a report, built once from report.json (or sweep.json) and rendered
to the console (rich), Markdown and HTML by the three renderers at the bottom."""
from __future__ import annotations

import html as _html
from dataclasses import dataclass
from typing import Any

from .recipe import SPIN_BLOCK, SPIN_SETTLE_S

# (label, key path inside a stage's figures, formatter)
METRICS = [
    ("MACs", ("macs",), lambda v: f"{v / 1e9:.3f}G" if v >= 1e8 else f"{v / 1e6:.2f}M"),
    ("Params", ("params",), lambda v: f"{v / 1e6:.3f}M"),
    ("Size, state dict (MB)", ("state_dict_bytes",), lambda v: f"{v / 1e6:.2f}"),
    ("Size, ONNX (MB)", ("onnx_bytes",), lambda v: f"{v / 1e6:.2f}"),
    ("CPU ms, PyTorch", ("latency_ms", "torch_cpu"), lambda v: f"{v:.2f}"),
    ("CPU ms, ONNX Runtime", ("latency_ms", "ort_cpu"), lambda v: f"{v:.2f}"),
    ("CPU ms, OpenVINO", ("latency_ms", "ov_cpu"), lambda v: f"{v:.2f}"),
    ("GPU ms, PyTorch", ("latency_ms", "torch_cuda"), lambda v: f"{v:.2f}"),
    ("GPU ms, ONNX Runtime", ("latency_ms", "ort_cuda"), lambda v: f"{v:.2f}"),
    ("Top-1 (%)", ("top1",), lambda v: f"{v:.2f}"),
    ("Top-5 (%)", ("top5",), lambda v: f"{v:.2f}"),
    ("mAP50-95 (%)", ("map50_95",), lambda v: f"{v:.2f}"),
    ("mAP50 (%)", ("map50",), lambda v: f"{v:.2f}"),
]
# The accuracy figures of a classifier and of a detector: (key, column label)
ACCURACY_KEYS = {"top1": [("top1", "top-1 (%)"), ("top5", "top-5 (%)")],
                 "map50_95": [("map50_95", "mAP50-95 (%)"), ("map50", "mAP50 (%)")]}
POINTS = {("top1",), ("top5",), ("map50_95",), ("map50",)}
# Stages of the pruned architecture, in pipeline order; the last one present is "after".
ACCURACY_STAGES = ("pruned", "recalibrated", "finetuned")
STAGE_LABELS = {"baseline": "baseline (unpruned)", "pruned": "right after pruning",
                "recalibrated": "after BN re-calibration", "finetuned": "after fine-tuning",
                "onnx": "exported ONNX (ONNX Runtime)"}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    marked: list[bool] | None = None  # rows to emphasise (the Pareto front)
    code_names: bool = False  # the first column holds layer names (set in code style)

    def numeric(self, col: int) -> bool:
        return col > 0  # the first column names the row; the others hold figures


def _get(figures: dict, path: tuple) -> Any:
    for key in path:
        if not isinstance(figures, dict) or key not in figures:
            return None
        figures = figures[key]
    return figures


def final_stage(report: dict) -> str:
    return [s for s in ACCURACY_STAGES if s in report][-1]


def comparison(report: dict) -> Table:
    """One row per metric measured on both models, with the change and the factor."""
    rows = []
    base, pruned = report["baseline"], report[final_stage(report)]
    for label, path, fmt in METRICS:
        before, after = _get(base, path), _get(pruned, path)
        if before is None or after is None:
            continue
        change, factor = "", ""
        if path in POINTS:
            change = f"{after - before:+.2f} pts"
        elif before:
            change = f"{(after - before) / before:+.1%}"
            factor = f"{before / after:.2f}x" if after else ""
        rows.append([label, fmt(before), fmt(after), change, factor])
    return Table(f"edgeprune: {report['recipe']['model']['name']}, before -> after",
                 ["metric", "before", "after", "change", "factor"], rows)


def accuracy_keys(figures: dict) -> list[tuple[str, str]]:
    """The accuracy figures `figures` holds: top-1/top-5 (classifiers) or mAP50-95/mAP50 (detectors)."""
    for first, keys in ACCURACY_KEYS.items():
        if figures.get(first) is not None:
            return keys
    return []


def accuracy(report: dict) -> Table | None:
    keys = accuracy_keys(report.get("baseline", {}))
    rows = [[STAGE_LABELS[s], *(f"{report[s][k]:.2f}" for k, _ in keys)]
            for s in ("baseline", *ACCURACY_STAGES, "onnx") if s in report and report[s].get(keys[0][0]) is not None] \
        if keys else []
    if not rows:
        return None
    return Table(f"Accuracy by stage ({report['recipe']['data']['path']}, {report['eval_images']} images)",
                 ["stage", *(label for _, label in keys)], rows)


def int8(report: dict) -> Table | None:
    """FP32 ONNX against INT8 ONNX, measured side by side."""
    q = report.get("int8")
    if not q:
        return None
    f = q["fp32"]
    rows = [["Size, ONNX (MB)", f"{f['onnx_bytes'] / 1e6:.2f}", f"{q['onnx_bytes'] / 1e6:.2f}",
             f"{q['size_reduction_x']:.2f}x smaller"],
            ["CPU ms, ONNX Runtime", f"{f['latency_ms']['ort_cpu']:.2f}", f"{q['latency_ms']['ort_cpu']:.2f}",
             f"{q['speedup_vs_fp32']:.2f}x faster"]]
    if "ov_cpu" in q["latency_ms"] and "ov_cpu" in f["latency_ms"]:
        before, after = f["latency_ms"]["ov_cpu"], q["latency_ms"]["ov_cpu"]
        rows.append(["CPU ms, OpenVINO", f"{before:.2f}", f"{after:.2f}", f"{before / after:.2f}x faster"])
    for key, label in accuracy_keys(q):
        rows.append([label[0].upper() + label[1:], f"{f[key]:.2f}", f"{q[key]:.2f}", f"{q[key] - f[key]:+.2f} pts"])
    if q.get("top1_agreement") is not None:
        rows.append(["Top-1 agreement with FP32", "", f"{q['top1_agreement']:.2%}", ""])
    scales = ("per-channel" if q["per_channel"] else "per-tensor") + (
        " 7-bit" if q.get("reduce_range") else "")
    return Table(f"INT8 (ONNX Runtime static quantization, QDQ, {scales} weights, {q['method']} calibration on "
                 f"{q['calibration_images']} training images)", ["metric", "FP32 ONNX", "INT8 ONNX", "change"], rows)


def widths(report: dict) -> Table:
    return Table("Channel widths", ["layer", "type", "before", "after"],
                 [[la["name"], la["kind"], str(la["channels_before"]), str(la["channels_after"])]
                  for la in report["prune"]["layers"]], code_names=True)


def unpruned(report: dict) -> Table | None:
    reasons = report["prune"]["unpruned"]
    return Table("Layers left unpruned", ["layer", "why"], [[n, why] for n, why in reasons.items()],
                 code_names=True) if reasons else None


def schedule(report: dict) -> Table | None:
    """prune.steps > 1: each step's MACs and accuracy after pruning, BN re-calibration and its fine-tuning."""
    sched = report.get("schedule")
    if not sched:
        return None
    keys = accuracy_keys(report.get("baseline", {}))
    key = keys[0][0] if keys else "top1"
    label = keys[0][1] if keys else "top-1 (%)"

    def fmt(acc: dict | None) -> str:
        return "" if not acc or acc.get(key) is None else f"{acc[key]:.2f}"

    steps = [[str(s["step"]), f"{s['macs'] / 1e6:.2f}M", fmt(s["pruned"]), fmt(s["recalibrated"]), str(s["epochs"]),
              fmt(s["finetuned"]), f"{s['seconds']:.0f}"] for s in sched["steps"]]
    last = report.get("finetuned", {})
    n = len(sched["epochs"])
    steps.append([str(n), f"{report['pruned']['macs'] / 1e6:.2f}M", fmt(report.get("pruned")),
                  fmt(report.get("recalibrated")), str(sched["epochs"][-1]), fmt(last or None),
                  f"{sum(e['seconds'] for e in last.get('epochs', [])):.0f}" if last else ""])
    return Table(f"Iterative pruning in {n} steps ({label}; the last step is the stages above)",
                 ["step", "MACs", "pruned", "BN re-cal", "epochs", "fine-tuned", "s"], steps)


def max_drop(report: dict) -> Table | None:
    """prune.max_drop: every trial's MACs, latency and recovered accuracy against the budget."""
    budget = report.get("max_drop")
    if not budget:
        return None
    runtime = report["recipe"]["prune"]["latency_runtime"]
    base_macs = report["baseline"]["macs"]
    label = dict(ACCURACY_KEYS["map50_95"] + ACCURACY_KEYS["top1"])[budget["metric"]]
    table = [[t["name"] + (" (chosen)" if t["name"] == budget["chosen"] else ""),
              f"{base_macs / t['macs']:.2f}x" if t.get("macs") else "",
              "" if t["latency_ms"] is None else f"{t['latency_ms']:.2f}",
              "" if t["recovered"] is None else f"{t['recovered']:.2f}",
              "target not reached" if t["drop"] is None else f"{0.0 - t['drop']:+.2f}",
              "yes" if t["within"] else "no"] for t in budget["trials"]]
    return Table(f"Accuracy budget: the most pruned model within {budget['max_drop']:g} points of the unpruned "
                 f"{budget['baseline']:.2f} ({label}), searched by {budget['by']}; each trial pruned and recovered "
                 "with the recipe", ["trial", "fewer MACs", f"{runtime} ms", "recovered", "change", "within"],
                 table, marked=[t["name"] == budget["chosen"] for t in budget["trials"]])


def sensitivity(report: dict) -> Table | None:
    """Each group's drop (points of the metric) when pruned alone at each scored ratio, and its chosen ratio."""
    sens = report.get("sensitivity")
    if not sens:
        return None
    chosen = report["prune"].get("group_ratios") or {}
    rows_ = []
    timed = sens.get("latency_runtime")
    for g in sens["groups"]:
        at = {p["ratio"]: f"{p['drop']:.2f} / {p['distortion']:.4f}" + (
            f" / {p['latency_saved_ms']:.3f}" if timed and p.get("latency_saved_ms") is not None else "")
            for p in g["points"]}
        rows_.append([g["name"], str(g["channels"]), *[at.get(r, "") for r in sens["ratios"]],
                      f"{chosen[g['name']]:g}" if g["name"] in chosen else "0"])
    saved = f" / ms saved on {timed} (its layers timed alone)" if timed else ""
    return Table(f"Sensitivity: {sens['metric']} drop (points) / output distortion (KL, nats){saved} with each "
                 f"group alone pruned, after BN re-calibration (unpruned {sens['reference']:.2f} on {sens['images']} "
                 f"{_SPLIT_WORDS.get(sens.get('split'), '')}images); the allocation ranks by distortion per MAC "
                 "(per ms for a latency target)",
                 ["group", "channels", *[f"at {r:g}" for r in sens["ratios"]], "chosen ratio"], rows_,
                 code_names=True)


_SPLIT_WORDS = {"train": "held-out training ", "eval": "evaluation "}  # sensitivity.json before "split": unsaid
RUNTIME_NAMES = {"torch_cpu": "PyTorch", "torch_cuda": "PyTorch CUDA", "ort_cpu": "ONNX Runtime", "ov_cpu": "OpenVINO"}


def benchmark(result: dict | None) -> Table | None:
    """`edgeprune benchmark`: every runtime x precision of the model, timed side by side."""
    if not result:
        return None
    rows = result["rows"]
    metric = [(k, label) for k, label in (("top1", "top-1 (%)"), ("map50_95", "mAP50-95 (%)"))
              if any(r.get(k) is not None for r in rows)]
    columns = ["model", "runtime", "precision", "file", "MB", "ms median", "ms p90", "max abs diff vs PyTorch",
               *(label for _, label in metric)]
    body = [[r["model"], RUNTIME_NAMES.get(r["runtime"], r["runtime"]), r["precision"].upper(), r["file"],
             f"{r['bytes'] / 1e6:.2f}", f"{r['latency_ms']:.2f}", f"{r['latency_p90_ms']:.2f}",
             "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}",
             *("" if r.get(k) is None else f"{r[k]:.2f}" for k, _ in metric)] for r in rows]
    images = next((r["images"] for r in rows if r.get("images")), None)
    return Table(f"Runtimes and precisions (batch {result['batch_size']}, {result['threads']} threads, median of "
                 f"{result['repeats']} runs, {turns(result)}"
                 + (f", accuracy on {images} images of {result['data']}" if images else "")
                 + f"; `{result['command']}`)", columns, body)


def layer_times(diag: dict) -> Table:
    return Table("Per-layer profile", [
        "layer", "channels", "MACs before", "MACs after", "ORT ms before", "ORT ms after", "PyTorch ms before",
        "PyTorch ms after", f"multiple of {diag['align']}"], [
        [la["name"], f"{la['channels_before']} -> {la['channels_after']}", f"{la['macs_before'] / 1e6:.2f}M",
         f"{la['macs_after'] / 1e6:.2f}M", f"{la['ort_ms_before']:.3f}", f"{la['ort_ms_after']:.3f}",
         f"{la['torch_ms_before']:.3f}", f"{la['torch_ms_after']:.3f}", "yes" if la["aligned"] else "no"]
        for la in diag["layers"]], code_names=True)


def other_ops(diag: dict) -> Table | None:
    other = diag["ort_other_ms"]
    ops = sorted(set(other["before"]) | set(other["after"]))
    if not ops:
        return None
    return Table("Other ONNX Runtime ops", ["op", "ms before", "ms after"],
                 [[op, f"{other['before'].get(op, 0):.3f}", f"{other['after'].get(op, 0):.3f}"] for op in ops])


def sweep(result: dict) -> Table:
    return Table(f"sweep: {result['model']} (Pareto front by {result['front_by']})",
                 ["model", "ORT CPU ms", "MACs", "params", "ONNX MB", "top-1 (%)", "Pareto"],
                 [[p["label"], f"{p['ms']:.2f}", f"{p['macs'] / 1e6:.1f}M", f"{p['params'] / 1e6:.3f}M",
                   f"{p['bytes'] / 1e6:.2f}", "" if p.get("top1") is None else f"{p['top1']:.2f}",
                   "yes" if p["pareto"] else ""] for p in result["points"]],
                 marked=[bool(p["pareto"]) for p in result["points"]])


# --- sentences -----------------------------------------------------------------------------------
def latency_verdict(report: dict) -> tuple[str, bool] | None:
    """The latency target's verdict sentence and whether it was met (None without a latency target)."""
    t = report.get("target") or {}
    if t.get("kind") != "latency":
        return None
    settings = f"on {t['runtime']} ({t['threads']} threads, batch {t['batch_size']})"
    found = f"search: {report['prune']['search_trials']} measured trials, round_to {t['round_to']} kept"
    if t.get("measured_ms") is None:  # the runtime is missing from the final measurement
        return (f"Latency target {settings}: not judged, the final measurement has no {t['runtime']} figure.", False)
    if t.get("speedup") is not None:
        return (f"Latency target: at least {t['speedup']:g}x faster than the unpruned model {settings}: "
                f"{'met' if t['met'] else 'MISSED'}, {t['measured_speedup']:.2f}x ({t['measured_ms']:.2f} ms) measured "
                f"on the final models side by side (medians of {runs(report)} runs; {found}"
                + (f", aiming at {t['latency_ms']:.3g} ms" if t.get("latency_ms") is not None else "") + ").",
                bool(t["met"]))
    return (f"Latency target: at most {t['latency_ms']:g} ms {settings}: {'met' if t['met'] else 'MISSED'}, "
            f"{t['measured_ms']:.2f} ms measured on the final model (median of {runs(report)} runs; {found}).",
            bool(t["met"]))


def parity(report: dict) -> str:
    p, ov = report["onnx_parity"], report.get("openvino_parity")
    text = (f"ONNX parity (ONNX Runtime vs PyTorch, batch {p['batch']}): max abs diff {p['max_abs_diff']:.2e}, "
            f"top-1 agreement {p['top1_agreement']:.1%}.")
    if ov:
        text += (f" OpenVINO vs PyTorch: max abs diff {ov['max_abs_diff']:.2e}, "
                 f"top-1 agreement {ov['top1_agreement']:.1%}.")
    return text


STAGE_TIMES = {"sensitivity": "sensitivity analysis", "prune": "pruning", "export": "ONNX export",
               "accuracy_baseline": "unpruned accuracy", "accuracy_pruned": "pruned accuracy",
               "recalibrated": "BN re-calibration", "finetuned": "fine-tuning", "accuracy_onnx": "ONNX accuracy",
               "int8": "INT8", "measure": "measurement", "diagnose": "diagnostics",
               "sensitivity_latency": "sensitivity latency", "steps": "pruning steps"}


def timings(t: dict) -> str:
    """Where the run's time went: each stage's wall seconds (evaluations included), largest first. A stage this
    run found done (by an earlier run in the folder, or a sweep point sharing its analysis) is marked, with the
    time it took then."""
    known = sorted(((k, v) for k, v in t.items() if v.get("seconds") is not None), key=lambda kv: -kv[1]["seconds"])
    parts = [f"{STAGE_TIMES.get(k, k)} {v['seconds']:.0f} s" + (" (reused)" if v["reused"] else "") for k, v in known]
    fresh = sum(v["seconds"] for _, v in known if not v["reused"])
    return (f"Time by stage (wall clock, largest first): {', '.join(parts)}; {fresh:.0f} s computed in this run, "
            "besides loading the model and data and writing the report.")


def runs(report: dict) -> int:
    """Timed runs behind each latency figure (more than the recipe's when a latency target was judged)."""
    return report["pruned"].get("latency_runs") or report["recipe"]["latency"]["repeats"]


def latency_method(report: dict) -> str:
    env, lat = report["environment"], report["recipe"]["latency"]
    return (f"Latency: median of {runs(report)} runs after {lat['warmup']} warm-ups, {turns(lat)}, batch "
            f"{lat['batch_size']}, {lat['threads']} threads, on {env['cpu']}"
            + (f" and {env['gpu']}" if env.get("gpu") else "") + ".")


def turns(latency: dict) -> str:
    """How the models took turns (recipes and benchmarks from before latency.turn_runs timed single runs)."""
    block, settle = latency.get("turn_runs", 1), latency.get("settle_runs", 0)
    text = ("single runs of each model in turn" if block == 1 and settle == 0 else
            f"models in turns of {block} runs back to back" + (f" after {settle} untimed" if settle else ""))
    if latency.get("ort_spinning"):  # measure.time_interleaved's floor for spinning runners
        text += (f" (ONNX Runtime, its workers spinning: at least {SPIN_BLOCK} runs per turn, after {SPIN_SETTLE_S:g} "
                 "s untimed)")
    return text


def notes(report: dict) -> list[str]:
    """What the reader must know to trust the figures: exporter fallbacks, pruning notes."""
    out = list(report.get("notes", []))
    return out + list(report["prune"].get("notes", []))


# --- renderers -----------------------------------------------------------------------------------
def markdown(table: Table, heading: str = "##") -> list[str]:
    lines = [f"{heading} {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---:" if table.numeric(i) else "---" for i in range(len(table.columns))) + "|"]
    for i, row in enumerate(table.rows):
        cells = [f"`{row[0]}`" if table.code_names else row[0], *row[1:]]
        if table.marked and table.marked[i]:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def rich(table: Table):
    from rich.table import Table as RichTable

    out = RichTable(title=table.title)
    for i, col in enumerate(table.columns):
        out.add_column(col, justify="right" if table.numeric(i) else "left")
    for i, row in enumerate(table.rows):
        out.add_row(*row, style="bold green" if table.marked and table.marked[i] else None)
    return out


def html(table: Table, with_title: bool = False) -> str:
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in table.columns)
    body = []
    for i, row in enumerate(table.rows):
        cells = "".join(f'<td class="num">{_html.escape(c)}</td>' if table.numeric(j) else f"<td>{_html.escape(c)}</td>"
                        for j, c in enumerate(row))
        cls = ' class="front"' if table.marked and table.marked[i] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    title = f"<h2>{_html.escape(table.title)}</h2>" if with_title else ""
    return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
