"""The report of a real run (through the Python API): JSON, the table rows and their three renderings."""
import copy
import html
import json

import pytest

import edgeprune
from edgeprune import report as rep
from edgeprune import rows
from edgeprune.diagnose import findings
from edgeprune.export import Parity
from edgeprune.report_html import page
from edgeprune.results import ExportResult


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recipe = edgeprune.load_recipe(None, {"data.path": None, "int8.enabled": False, "recover.epochs": 0,
                                          "prune.allocation": "uniform",  # the default's analysis needs data
                                          "model.name": "cifar_resnet20", "model.weights": "default",
                                          "prune.ratio": 0.5, "latency.warmup": 1, "latency.repeats": 5})
    report = edgeprune.run(recipe, out, quiet=True)
    return out, report


def test_report_json_is_what_run_returns_and_describes_the_files(finished):
    out, report = finished
    assert json.loads((out / "report.json").read_text()) == report
    assert report["export"] == {"exporter": "torchscript", "opset": 17, "fallback_reason": None,
                                "requested_opset": None, "onnx_bytes": (out / "model.onnx").stat().st_size}
    assert report["pruned"]["onnx_bytes"] == report["export"]["onnx_bytes"]
    assert report["pruned"]["params"] == sum(p.numel() for p in edgeprune.load(out).parameters())
    macs_kept = report["pruned"]["macs"] / report["baseline"]["macs"]
    assert report["reduction_pct"]["macs"] == round(100 * (1 - macs_kept), 2)
    assert report["notes"] == [] and report["target"] == {"kind": "ratio", "ratio": 0.5}
    # where the time went: every stage that ran, timed, in one line of each rendering
    assert set(report["timings"]) == {p.stem for p in (out / "stages").glob("*.json")} >= {"prune", "measure"}
    assert all(t["seconds"] >= 0 and not t["reused"] for t in report["timings"].values())
    line = rows.timings(report["timings"])
    assert line.startswith("Time by stage") and "measurement" in line and line in (out / "report.md").read_text()
    assert html.escape(line) in (out / "report.html").read_text()


def test_one_table_renders_the_same_figures_in_markdown_html_and_the_console(finished):
    out, report = finished
    table = rows.comparison(report)
    assert [r[0] for r in table.rows] == ["MACs", "Params", "Size, state dict (MB)", "Size, ONNX (MB)",
                                          "CPU ms, PyTorch", "CPU ms, ONNX Runtime", "CPU ms, OpenVINO"]
    md = (out / "report.md").read_text()
    page_html = (out / "report.html").read_text()
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rows.rich(table))
    text = console.export_text()
    for row in table.rows:
        assert "| " + " | ".join(row) + " |" in md
        assert "".join(f'<td class="num">{html.escape(c)}</td>' for c in row[1:]) in page_html
        assert all(cell in text for cell in row)
    assert rows.parity(report) in md


def test_notes_and_a_missed_target_reach_every_rendering(finished):
    _, report = finished
    changed = copy.deepcopy(report)
    fallback = ExportResult(parity=Parity(1e-6, 1.0, 8, 1e-4, True), opset=17, exporter="dynamo", onnx_bytes=1,
                            fallback_reason="SymbolicValueError: adaptive pooling")
    changed["notes"] = rep.export_notes(fallback, 17)
    changed["recipe"]["prune"].update({"ratio": None, "target_latency_ms": 0.01})
    changed["target"] = rep.target(changed["prune"], changed["recipe"], changed["pruned"], changed["baseline"])
    assert changed["target"]["met"] is False
    text, met = rows.latency_verdict(changed)
    assert not met and "MISSED" in text and f"{changed['pruned']['latency_ms']['ort_cpu']:.2f} ms" in text
    md, page_html = rep.markdown(changed), page(changed)
    assert "**missed**" in md and "class='bad'" in page_html
    assert "dynamo exporter" in md and "dynamo exporter" in page_html and "SymbolicValueError" in md
    assert rows.latency_verdict(report) is None and "Latency target" not in rep.markdown(report)


def test_a_speedup_target_is_judged_on_the_side_by_side_measurement(finished):
    _, report = finished
    measured = report["baseline"]["latency_ms"]["ort_cpu"] / report["pruned"]["latency_ms"]["ort_cpu"]
    changed = copy.deepcopy(report)
    changed["recipe"]["prune"]["ratio"] = None
    for goal, met in ((0.99 * measured, True), (1.01 * measured, False)):
        changed["recipe"]["prune"]["target_speedup"] = goal
        changed["target"] = rep.target(changed["prune"], changed["recipe"], changed["pruned"], changed["baseline"])
        assert changed["target"]["met"] is met and changed["target"]["measured_speedup"] == pytest.approx(measured)
        text, verdict = rows.latency_verdict(changed)
        assert verdict is met and f"at least {goal:g}x faster" in text and f"{measured:.2f}x" in text
        assert ("**missed**" in rep.markdown(changed)) is not met


def test_diagnostics_name_real_layers_and_time_every_one(finished):
    out, report = finished
    diag = report["diagnostics"]
    names = {n for n, _ in edgeprune.load(out).named_modules()}
    assert [la["name"] for la in diag["layers"]] == [la["name"] for la in report["prune"]["layers"]]
    assert all(la["name"] in names for la in diag["layers"])
    assert all(la["ort_ms_before"] > 0 and la["ort_ms_after"] > 0 for la in diag["layers"])
    assert sum(la["macs_after"] for la in diag["layers"]) == diag["totals"]["macs_after"]
    narrowed = [la for la in diag["layers"] if la["channels_after"] < la["channels_before"]]
    assert narrowed and all(la["macs_after"] < la["macs_before"] for la in narrowed)
    assert any(f.startswith("ONNX Runtime:") for f in diag["findings"])
    # widths off the vector lanes: the advice to round names what rounding moves
    misaligned = [f for f in diag["findings"] if "pruned layers have widths that are not multiples" in f]
    assert len(misaligned) == any(not la["aligned"] for la in diag["layers"])
    assert all("--round-to" in f and "compare the accuracy too" in f for f in misaligned)
    if not misaligned:  # this run rounded its widths: the same diagnosis with its first pruned layer off the lanes
        first = diag["layers"].index(narrowed[0])
        layers = [dict(la, aligned=i != first) for i, la in enumerate(diag["layers"])]
        (line,) = [f for f in findings({**diag, "layers": layers}, None) if "not multiples of" in f]
        assert narrowed[0]["name"] in line and "compare the accuracy too" in line
    # Both models on ONNX Runtime at 1 and 2 threads, side by side: the speed-up at each thread count.
    scaling = diag["thread_scaling"]
    assert diag["threads"] == 2 and set(scaling) == {"before", "after"}
    assert all(set(ms) == {"1", "2"} and min(ms.values()) > 0 for ms in scaling.values())
    line = next(f for f in diag["findings"] if f.startswith("ONNX Runtime on 1 thread:"))
    assert f"{scaling['before']['1'] / scaling['after']['1']:.2f}x faster" in line
    assert f"on 2 threads: {scaling['before']['2'] / scaling['after']['2']:.2f}x" in line
    assert line in (out / "report.md").read_text()
    # The measurement's speed-up and this one, both side by side: far apart, the report says the machine's speed
    # changed while timing; close, it says nothing.
    again = scaling["before"]["2"] / scaling["after"]["2"]
    measured = report["speedup"]["ort_cpu"]
    disagree = [f for f in diag["findings"] if f.startswith("The two side-by-side timings")]
    assert len(disagree) == (max(measured, again) / min(measured, again) > 1.15)
    for far in (1.3 * again, again / 1.3):
        (line,) = [f for f in findings(diag, {"ort_cpu": far}) if f.startswith("The two side-by-side timings")]
        assert f"{far:.2f}x faster in the measurement, {again:.2f}x in the diagnosis" in line and "30% apart" in line
        assert "edgeprune benchmark OUT --baseline" in line
    assert not [f for f in findings(diag, {"ort_cpu": 1.1 * again}) if f.startswith("The two side-by-side")]
