"""The pipeline through the CLI: recipes and options, --overwrite, --json, --debug and re-export."""
import json

from conftest import assert_one_line_error, cli, run_cli

import edgeprune
from edgeprune.export import file_opset
from edgeprune.measure import onnx_bytes
from edgeprune.recipe import apply_overrides, load_recipe

RECIPE = """
model: {name: cifar_resnet20, weights: default}
prune: {macs_reduction: 0.4, importance: taylor, round_to: 1}
recover: {epochs: 5}
export: {opset: 13}
latency: {warmup: 1, repeats: 3, per_layer: false, openvino: false}
"""


def test_prune_with_a_recipe_runs_the_recipe_and_options_override_only_themselves(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    out = tmp_path / "a"
    proc = run_cli("prune", "--recipe", str(path), "--out", str(out), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())  # --json prints exactly the report
    expected = load_recipe(path).model_dump(mode="json")
    assert json.loads((out / "recipe.json").read_text()) == expected
    assert report["recipe"]["model"]["name"] == "cifar_resnet20" and report["prune"]["importance"] == "taylor"
    assert report["target"] == {"kind": "macs", "macs_reduction": 0.4, "macs": report["prune"]["macs_target"]}
    assert report["export"]["opset"] == 13 and report["recipe"]["recover"]["epochs"] == 5

    # Each stage's time, measured in this run.
    stages = {p.stem for p in (out / "stages").glob("*.json")}
    assert set(report["timings"]) == stages and not any(t["reused"] for t in report["timings"].values())
    assert report["timings"]["prune"]["seconds"] > 0
    assert "Time by stage" in (out / "report.md").read_text()

    # `run` of the same recipe is the same run: it finds every stage done, and says so with the times it took.
    stamp = (out / "stages" / "prune.json").stat().st_mtime_ns
    again = run_cli("run", str(path), "--out", str(out), "-q", "--json")
    assert again.returncode == 0, again.stderr
    assert (out / "stages" / "prune.json").stat().st_mtime_ns == stamp
    assert json.loads(again.stdout)["timings"] == {k: {**t, "reused": True} for k, t in report["timings"].items()}
    # --overwrite starts afresh.
    assert run_cli("prune", "--recipe", str(path), "--out", str(out), "-q", "--overwrite").returncode == 0
    assert (out / "stages" / "prune.json").stat().st_mtime_ns != stamp

    other = tmp_path / "b"
    proc = run_cli("prune", "--recipe", str(path), "--ratio", "0.3", "--importance", "l1", "--out", str(other), "-q")
    assert proc.returncode == 0, proc.stderr
    changed = apply_overrides(load_recipe(path), {"prune.ratio": 0.3, "prune.importance": "l1"})
    assert json.loads((other / "recipe.json").read_text()) == changed.model_dump(mode="json")
    assert changed.prune.macs_reduction is None and changed.export.opset == 13


def test_reexport_at_another_opset_recomputes_everything_measured_on_the_old_file(tmp_path):
    out = tmp_path / "r20"
    proc = run_cli("prune", "--model", "cifar_resnet20", "--ratio", "0.4", "--round-to", "1", "--out", str(out),
                   "--warmup", "1", "--repeats", "5", "-q")
    assert proc.returncode == 0, proc.stderr
    before = {name: json.loads((out / "stages" / f"{name}.json").read_text())
              for name in ("prune", "export", "measure", "diagnose")}
    proc = run_cli("export", str(out), "--opset", "13", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    import onnx

    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 13
    report = json.loads((out / "report.json").read_text())
    assert json.loads(proc.stdout) == report
    assert report["export"]["opset"] == 13 and report["recipe"]["export"]["opset"] == 13
    assert report["pruned"]["onnx_bytes"] == onnx_bytes(out / "model.onnx")
    after = {name: json.loads((out / "stages" / f"{name}.json").read_text()) for name in before}
    assert after["prune"] == before["prune"]  # the pruning did not change
    for name in ("export", "measure", "diagnose"):  # all computed from the new file
        assert after[name]["fingerprint"] != before[name]["fingerprint"], name
    assert edgeprune.load(out).layer1[0].conv1.out_channels == 9  # 16 channels at ratio 0.4


def test_the_report_gives_the_opset_the_file_has(tmp_path):
    """The dynamo exporter keeps opset 18 when it cannot convert down to the one asked for (a ResNet's Pad, with
    onnx 1.23): the report says what the file holds, and a note says what was asked for."""
    out = tmp_path / "r20"
    proc = run_cli("prune", "--model", "cifar_resnet20", "--weights", "none", "--ratio", "0.4", "--round-to", "1",
                   "--out", str(out), "--warmup", "1", "--repeats", "3", "--set", "export.dynamo=true",
                   "--set", "latency.per_layer=false", "--set", "latency.openvino=false", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    # 18 with torch 2.14 and onnx 1.23; should a later onnx convert Pad down, this test needs another model
    assert file_opset(out / "model.onnx") == 18
    assert report["export"]["exporter"] == "dynamo" and report["export"]["opset"] == 18
    assert report["export"]["requested_opset"] == 17 and report["recipe"]["export"]["opset"] == 17
    assert any("uses opset 18, not the 17" in n for n in report["notes"]), report["notes"]
    assert "uses opset 18, not the 17" in (out / "report.md").read_text()


def test_debug_shows_the_cause_of_an_error(tmp_path):
    (tmp_path / "stock.py").write_text("import torchvision\n\ndef net():\n    return torchvision.models."
                                       "shufflenet_v2_x0_5()\n")  # not rewritten as create_model's is
    args = ("prune", "--model", "stock.py:net", "--out", str(tmp_path / "s"), "-q")
    assert_one_line_error(cli(*args, cwd=tmp_path), "cannot be pruned safely")  # without --debug: one line
    proc = run_cli("--debug", *args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("edgeprune: error:")


def test_a_run_folder_from_before_a_recipe_field_was_added_resumes_without_recomputing(tmp_path):
    """recipe.json and the stage fingerprints of an older edgeprune lack fields added since (here
    prune.target_speedup): at their defaults those fields leave the folder the same recipe's, every stage kept."""
    out = tmp_path / "old"
    args = ("prune", "--model", "cifar_resnet20", "--weights", "none", "--ratio", "0.4", "--round-to", "1",
            "--set", "latency.per_layer=false", "--set", "latency.openvino=false", "--repeats", "3", "--out", str(out),
            "-q")
    assert run_cli(*args).returncode == 0
    recipe = json.loads((out / "recipe.json").read_text())
    del recipe["prune"]["target_speedup"]  # as an edgeprune of 2026-11-29 wrote it
    (out / "recipe.json").write_text(json.dumps(recipe))
    for path in (out / "stages").glob("*.json"):  # nor did it record how long each stage took
        record = json.loads(path.read_text())
        del record["seconds"]
        path.write_text(json.dumps(record))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == stamps
    assert "target_speedup" in json.loads((out / "recipe.json").read_text())["prune"]  # written as today's


def test_a_run_folder_is_cleaned_of_our_half_written_files_only(tmp_path):
    """What a killed run leaves half-written (edgeprune's own temporary names, in the run folder and its stages) is
    removed when the folder is opened again; nothing else, even with `--out .` in a folder of other files."""
    from edgeprune.fsio import TEMP_MARK, atomic_path
    from edgeprune.pipeline import open_run_folder
    from edgeprune.recipe import Recipe

    ours = [tmp_path / f".model.json.{TEMP_MARK}k1.tmp", tmp_path / "stages" / f".prune.json.{TEMP_MARK}x.tmp",
            tmp_path / "stages" / "prune" / f".model.safetensors.{TEMP_MARK}y.tmp"]
    theirs = [tmp_path / ".notes.swp.tmp", tmp_path / "data" / f".cache.{TEMP_MARK}z.tmp",
              tmp_path / ".export-photos" / "a.jpg", tmp_path / "draft.tmp"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / f".{TEMP_MARK}export-q1").mkdir()  # an export's temporary folder
    with atomic_path(tmp_path / "stages" / "a.json") as tmp:
        assert TEMP_MARK in tmp.name  # what atomic_path writes is what the cleanup looks for
    open_run_folder(tmp_path, Recipe())
    assert not any(p.exists() for p in ours) and not (tmp_path / f".{TEMP_MARK}export-q1").exists()
    assert all(p.exists() for p in theirs)
