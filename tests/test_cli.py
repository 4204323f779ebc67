"""The `edgeprune` command end to end, in real subprocesses, on real models and checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import edgeprune
from conftest import assert_one_line_error, run_cli

FAST = ("--warmup", "2", "--repeats", "5")
CONTRACT = {"params": int, "macs": int, "onnx_bytes": int}


def check_contract(report: dict) -> None:
    for stage in ("baseline", "pruned"):
        for key, kind in CONTRACT.items():
            assert isinstance(report[stage][key], kind), (stage, key)
        assert report[stage]["latency_ms"]["torch_cpu"] > 0 and report[stage]["latency_ms"]["ort_cpu"] > 0
    assert isinstance(report["onnx_parity"]["max_abs_diff"], float)
    assert 0 <= report["onnx_parity"]["top1_agreement"] <= 1


@pytest.mark.slow
def test_resnet50_at_ratio_07_is_ten_times_smaller_and_four_times_faster(tmp_path):
    out = tmp_path / "r50"
    proc = run_cli("prune", "--model", "resnet50", "--weights", "none", "--ratio", "0.7", "--out", str(out),
                   "--warmup", "3", "--repeats", "15", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    check_contract(report)
    base, pruned = report["baseline"], report["pruned"]
    assert pruned["macs"] <= 0.11 * base["macs"] and pruned["params"] <= 0.11 * base["params"]
    assert report["onnx_parity"]["max_abs_diff"] <= 1e-4
    assert base["latency_ms"]["ort_cpu"] >= 4 * pruned["latency_ms"]["ort_cpu"]
    model = edgeprune.load(out)
    assert model.fc.out_features == 1000
    assert "| MACs |" in (out / "report.md").read_text()


def test_cifar_resnet56_checkpoint_halves_macs_exports_and_reloads(tmp_path, data_dir, cifar_test_subset):
    out = tmp_path / "r56"
    proc = run_cli("prune", "--model", "cifar_resnet56", "--weights", str(data_dir / "resnet56-cifar10jpeg.pth"),
                   "--macs-reduction", "0.5", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "MACs" in proc.stdout and "ONNX parity" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    check_contract(report)
    assert report["baseline"]["macs"] / report["pruned"]["macs"] >= 1.9
    assert report["onnx_parity"]["passed"]
    assert "zero-padding" in (out / "report.md").read_text()
    x, _ = cifar_test_subset
    model = edgeprune.load(out)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"))
    with torch.no_grad():
        ref = model(x[:32]).numpy()
    assert abs(sess.run(None, {"input": x[:32].numpy()})[0] - ref).max() < 1e-4


def test_default_run_and_resume(tmp_path):
    out = tmp_path / "default"
    proc = run_cli("run", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    check_contract(report)
    assert report["recipe"]["model"]["name"] == "cifar_resnet56"
    assert 1.96 <= report["baseline"]["macs"] / report["pruned"]["macs"] <= 2.04

    prune_mtime = (out / "stages" / "prune.json").stat().st_mtime_ns
    (out / "stages" / "measure.json").unlink()  # as if the run stopped before its last measurement
    proc = run_cli("run", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "stages" / "prune.json").stat().st_mtime_ns == prune_mtime
    assert (out / "stages" / "measure.json").exists()

    other = run_cli("prune", "--model", "cifar_resnet20", "--out", str(out), *FAST)
    assert_one_line_error(other, "different recipe", "--overwrite")


def test_killed_run_resumes_to_the_same_model(tmp_path):
    out = tmp_path / "killed"
    args = ["prune", "--model", "resnet18", "--weights", "none", "--ratio", "0.5", "--out", str(out),
            "--warmup", "2", "--repeats", "200", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "edgeprune", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 120
    while not (out / "stages" / "prune.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "stages" / "prune.json").exists() and not (out / "report.json").exists()
    first = json.loads((out / "stages" / "prune.json").read_text())["history"]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "report.json").read_text())["prune"]["history"] == first
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_export_command_reexports_a_run(tmp_path):
    out = tmp_path / "r20"
    assert run_cli("prune", "--model", "cifar_resnet20", "--ratio", "0.4", "--out", str(out), *FAST).returncode == 0
    proc = run_cli("export", str(out), "--opset", "13")
    assert proc.returncode == 0, proc.stderr
    import onnx

    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 13
    assert json.loads((out / "report.json").read_text())["onnx_parity"]["passed"]


@pytest.mark.parametrize("args,needles", [
    (("--model", "resnet5o"), ("unknown model 'resnet5o'", "resnet50")),
    (("--model", "cifar_resnet20", "--weights", "/nonexistent/w.pth"), ("does not exist",)),
    (("--model", "cifar_resnet20", "--weights", "{corrupt}"), ("cannot be read safely",)),
    (("--model", "cifar_resnet20", "--weights", "{r56}"), ("does not match the model", "unexpected keys")),
    (("--model", "cifar_resnet20", "--ratio", "1.5"), ("ratio", "between 0 and 1")),
    (("--model", "cifar_resnet20", "--ratio", "0"), ("between 0 and 1",)),
    (("--model", "cifar_resnet20", "--importance", "magic"), ("prune.importance",)),
])
def test_bad_input_is_one_line_and_leaves_no_files(tmp_path, data_dir, args, needles):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x04garbage")
    args = [a.format(corrupt=corrupt, r56=data_dir / "resnet56-cifar10jpeg.pth") for a in args]
    out = tmp_path / "out"
    assert_one_line_error(run_cli("prune", *args, "--out", str(out), *FAST), *needles)
    assert not (out / "report.json").exists() and not (out / "model.safetensors").exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_one_line_error(run_cli("prune", "--model", "cifar_resnet20", "--out", str(blocker / "run"), *FAST),
                          "not writable", "--out")


def test_unprunable_torchvision_model_stops_cleanly(tmp_path):
    out = tmp_path / "shufflenet"
    proc = run_cli("prune", "--model", "shufflenet_v2_x0_5", "--weights", "none", "--out", str(out), "-q", *FAST)
    assert_one_line_error(proc, "cannot be pruned safely")
    assert not (out / "model.safetensors").exists() and not (out / "model.onnx").exists()


def test_help_describes_each_command():
    for command in ("profile", "prune", "export", "run"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout
    assert "MACs" in run_cli("prune", "--help").stdout


def test_profile_prints_json():
    proc = run_cli("profile", "--model", "cifar_resnet20", "--json", "--layers", *FAST)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["params"] == 269_722 and result["layers"]["linear"] == 10
