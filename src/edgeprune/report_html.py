"""The visual report: one self-contained HTML file (plots embedded as PNG data URIs, no external assets).

`page(report)` renders a run: before/after table, accuracy by stage, INT8, the trade-off plot,
per-layer channel widths and the per-layer time breakdown. `sweep_page(sweep)` renders a sweep's
table and Pareto plots.
"""
from __future__ import annotations

import base64
import html
import io

from . import rows

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; } th { background: #f3f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td { background: #eef7ee; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.muted { color: #666; font-size: 0.9em; } .note { color: #7a4b00; }
.bad { color: #b00020; font-weight: 600; } .ok { color: #1b7f3b; }
"""
# Counts the plots that decoded; a browser test reads it back from the DOM.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.plot'));
  document.body.setAttribute('data-plots', String(imgs.length));
  document.body.setAttribute('data-plots-loaded',
      String(imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length));
});
"""
BLUE, ORANGE, GREEN, GREY = "#3b6fb6", "#e07b39", "#2e9d5b", "#9a9a9a"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _layer_bars(names: list[str], before: list[float], after: list[float], ylabel: str, title: str, alt: str) -> str:
    import numpy as np

    fig, ax = _figure(max(8.0, 0.16 * len(names) + 2), 4.2)
    x = np.arange(len(names))
    ax.bar(x - 0.2, before, 0.4, label="before", color=GREY)
    ax.bar(x + 0.2, after, 0.4, label="after", color=BLUE)
    ax.set_xticks(x, names, rotation=90, fontsize=6 if len(names) > 30 else 8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.margins(x=0.005)
    return _img(fig, alt)


def _metric(report: dict) -> tuple[str, str]:
    """The accuracy the run's plots show: (report key, axis label)."""
    if report["baseline"].get("map50_95") is not None:
        return "map50_95", "mAP50-95 (%)"
    return "top1", "top-1 (%)"


def _sensitivity_plot(report: dict) -> str:
    """The drop of every group pruned alone against the ratio, the most sensitive groups named."""
    sens = report["sensitivity"]
    fig, ax = _figure(7.2, 4.4)
    worst = sorted(sens["groups"], key=lambda g: -max([p["distortion"] for p in g["points"]] or [0]))[:5]
    for g in sens["groups"]:
        xs, ys = [0.0] + [p["ratio"] for p in g["points"]], [0.0] + [p["distortion"] for p in g["points"]]
        named = g in worst
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6 if named else 0.8,
                color=None if named else GREY, alpha=1.0 if named else 0.5, label=g["name"] if named else None)
    ax.set_xlabel("ratio of the group's channels removed (that group alone)")
    ax.set_ylabel("output distortion: KL from the unpruned model (nats)")
    ax.set_title("sensitivity of each prunable group (after BN re-calibration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="most sensitive", title_fontsize=7)
    return _img(fig, "sensitivity of each prunable group")


def tradeoff_points(report: dict) -> list[dict]:
    """The models of one run as trade-off points: name, ORT CPU ms, MACs, bytes and the accuracy (top-1,
    or a detector's mAP50-95) under its report key, when known."""
    final = rows.final_stage(report)
    key, _ = _metric(report)
    points = [{"label": "baseline", "ms": report["baseline"]["latency_ms"].get("ort_cpu"),
               "macs": report["baseline"]["macs"], "bytes": report["baseline"]["onnx_bytes"],
               key: report["baseline"].get(key)},
              {"label": "pruned" if final == "pruned" else f"pruned, {final}",
               "ms": report[final]["latency_ms"].get("ort_cpu"),
               "macs": report[final]["macs"], "bytes": report[final]["onnx_bytes"],
               key: report.get("onnx", report[final]).get(key)}]
    if report.get("int8"):
        q = report["int8"]
        # INT8 was timed next to its FP32 source; scale to the pruned model's main measurement.
        scale = points[1]["ms"] / q["fp32"]["latency_ms"]["ort_cpu"] if points[1]["ms"] else 1.0
        points.append({"label": "pruned INT8", "ms": q["latency_ms"]["ort_cpu"] * scale, "macs": report[final]["macs"],
                       "bytes": q["onnx_bytes"], key: q.get(key)})
    return points


def _scatter(points: list[dict], xkey: str, ykey: str, front: list[bool] | None, xlabel: str, ylabel: str,
             title: str) -> str:
    fig, ax = _figure(6.4, 4.2)
    xscale = 1e9 if xkey == "macs" and max(p[xkey] for p in points) >= 1e9 else 1e6 if xkey == "macs" else 1
    yscale = 1e9 if ykey == "macs" and max(p[ykey] for p in points) >= 1e9 else 1e6 if ykey == "macs" else 1
    xs = [p[xkey] / xscale for p in points]
    ys = [p[ykey] / yscale for p in points]
    on = front or [False] * len(points)
    ax.scatter(xs, ys, s=60, color=[GREEN if f else BLUE for f in on], zorder=3)
    for x, y, p in zip(xs, ys, points, strict=True):
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if any(on):
        line = sorted((x, y) for x, y, f in zip(xs, ys, on, strict=True) if f)
        ax.plot([x for x, _ in line], [y for _, y in line], color=GREEN, linestyle="--", label="Pareto front")
        ax.legend(loc="lower right")
    unit = {1e9: " (G)", 1e6: " (M)", 1: ""}
    ax.set_xlabel(xlabel + (unit[xscale] if xkey == "macs" else ""))
    ax.set_ylabel(ylabel + (unit[yscale] if ykey == "macs" else ""))
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _img(fig, title)


def _tradeoff_plots(points: list[dict], front: list[bool] | None = None, front_macs: list[bool] | None = None,
                    metric: tuple[str, str] = ("top1", "top-1 (%)")) -> str:
    """Accuracy (`metric`: report key, label) against latency and against MACs (MACs against latency
    when there is no accuracy)."""
    ms_label = "ONNX Runtime CPU latency (ms)"
    key, label = metric
    name = label.split(" (")[0]
    if not all(p.get(key) is not None for p in points):
        return _scatter(points, "ms", "macs", front, ms_label, "MACs", "MACs against latency")
    plots = _scatter(points, "ms", key, front, ms_label, label, f"{name} against latency")
    fp32 = [(p, f) for p, f in zip(points, front_macs or [False] * len(points), strict=True)
            if not p["label"].endswith("INT8")]  # INT8 keeps the FP32 model's MACs
    return plots + _scatter([p for p, _ in fp32], "macs", key, [f for _, f in fp32] if front_macs else None,
                            "MACs", label, f"{name} against MACs")


def _doc(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_SCRIPT}</script></body></html>")


def page(report: dict) -> str:
    """The run report as one self-contained HTML document."""
    name = report["recipe"]["model"]["name"]
    body = [f"<h1>edgeprune report: {html.escape(name)}</h1>"]
    verdict = rows.latency_verdict(report)
    if verdict:
        text, met = verdict
        body.append(f"<p class='{'ok' if met else 'bad'}'>{html.escape(text)}</p>")
    body.append("<h2>Before and after</h2>")
    body.append(rows.html(rows.comparison(report)))
    body.append(f"<p class='muted'>{html.escape(rows.latency_method(report))}</p>")
    for table in (rows.accuracy(report), rows.int8(report), rows.benchmark(report.get("benchmark")),
                  rows.max_drop(report), rows.schedule(report)):
        if table is not None:
            body.append(rows.html(table, with_title=True))
    if report.get("sensitivity"):
        body.append("<h2>Sensitivity</h2>")
        body.append(_sensitivity_plot(report))
        body.append(rows.html(rows.sensitivity(report), with_title=True))
    body.append("<h2>Trade-off</h2>")
    body.append(_tradeoff_plots(tradeoff_points(report), metric=_metric(report)))
    diag = report.get("diagnostics")
    if diag:
        body.append("<h2>Why isn't it faster?</h2><ul>")
        body += [f"<li>{html.escape(f)}</li>" for f in diag["findings"]]
        body.append("</ul>")
    layers = report["prune"]["layers"]
    body.append("<h2>Channel widths per layer</h2>")
    body.append(_layer_bars([la["name"] for la in layers], [la["channels_before"] for la in layers],
                            [la["channels_after"] for la in layers], "output channels",
                            "output channels of every conv/linear layer", "per-layer channel widths"))
    if diag:
        dl = diag["layers"]
        body.append("<h2>Time per layer (ONNX Runtime profiler)</h2>")
        other = diag["ort_other_ms"]
        names = [la["name"] for la in dl] + ["(other ops)"]
        body.append(_layer_bars(names, [la["ort_ms_before"] for la in dl] + [sum(other["before"].values())],
                                [la["ort_ms_after"] for la in dl] + [sum(other["after"].values())], "ms",
                                f"median ms per layer over {diag['runs']} runs", "per-layer time breakdown"))
        body.append(rows.html(rows.layer_times(diag)))
    body += [f"<p class='note'>Note: {html.escape(n)}</p>" for n in rows.notes(report)]
    if report.get("timings"):
        body.append(f"<p class='muted'>{html.escape(rows.timings(report['timings']))}</p>")
    env = report["environment"]
    body.append(f"<p class='muted'>{html.escape(rows.parity(report))} Environment: "
                f"{html.escape(', '.join(f'{k} {v}' for k, v in env.items()))}.</p>")
    return _doc(f"edgeprune report: {name}", body)


def sweep_page(sweep: dict) -> str:
    """A sweep: every point's figures, the Pareto front marked, and the trade-off plots."""
    points = sweep["points"]
    body = [f"<h1>edgeprune sweep: {html.escape(sweep['model'])}</h1>",
            f"<p>{len(points)} models; the Pareto front (no other model is both faster and more accurate) is "
            f"marked{' by ' + html.escape(sweep['front_by']) if sweep.get('front_by') else ''}.</p>",
            _tradeoff_plots(points, [p["pareto"] for p in points], [bool(p.get("pareto_macs")) for p in points])]
    body.append(rows.html(rows.sweep(sweep)))
    body.append(f"<p class='muted'>Reproduce: <code>{html.escape(sweep['command'])}</code></p>")
    return _doc(f"edgeprune sweep: {sweep['model']}", body)
