"""YOLO detectors end to end: real Ultralytics models, the trained YOLOv8n and the real cifar10-det
images (copies of a few in tmp_path only where a test breaks them), the CLI in subprocesses."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import assert_one_line_error, cli, run_cli

import edgeprune
from edgeprune.environment import cpu_has_bf16
from edgeprune.errors import EdgePruneError
from edgeprune.measure import count_macs
from edgeprune.recipe import PruneOptions

FAST = ("--warmup", "2", "--repeats", "10")


@pytest.fixture(scope="module")
def det_data(data_dir: Path) -> Path:
    path = data_dir / "cifar10-det" / "data.yaml"
    assert path.is_file(), f"{path} missing: the detection tests need the shared cifar10-det set"
    return path


@pytest.fixture(scope="module")
def yolo_weights(data_dir: Path) -> Path:
    path = data_dir / "yolov8n-cifar10det.safetensors"
    assert path.is_file(), f"{path} missing"
    return path


def test_prune_cli_contract_at_640(tmp_path):
    """The issue's contract: random-init YOLOv8n at 640, ratio 0.5: >= 2x fewer MACs, parity, faster, reloadable."""
    out = tmp_path / "run"
    proc = run_cli("prune", "--model", "yolov8n.yaml", "--weights", "none", "--ratio", "0.5", "--out", str(out), "-q",
                   "--set", "latency.per_layer=false", "--set", "latency.openvino=false", *FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    base, pruned = report["baseline"], report["pruned"]
    for figures in (base, pruned):
        assert {"params", "macs", "onnx_bytes"} <= set(figures) and figures["latency_ms"]["ort_cpu"] > 0
    assert base["macs"] / pruned["macs"] >= 2.0
    assert report["onnx_parity"]["passed"] and report["onnx_parity"]["max_abs_diff"] < 1e-4
    assert report["speedup"]["ort_cpu"] > 1.3, report["speedup"]  # 2.19x measured here on 2 quiet cores
    assert "detection head" in " ".join(report["prune"]["unpruned"].values())
    model = edgeprune.load(out)
    assert model.edgeprune_spec.input_size == (3, 640, 640) and model.edgeprune_spec.task == "detect"
    import onnxruntime as ort

    x = torch.rand(2, 3, 640, 640)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (2, 84, 8400)
    assert abs(ref[:, 4:].numpy() - got[:, 4:]).max() < 1e-4  # class scores
    assert abs(ref[:, :4].numpy() - got[:, :4]).max() / 640 < 1e-4  # boxes, in units of the image size


def test_pruned_detector_reloads_exactly(tmp_path, yolo_weights):
    model = edgeprune.create_model("yolov8n.yaml", yolo_weights)
    assert model.edgeprune_spec.input_size == (3, 256, 256)  # the checkpoint's training size
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        before = model(x)
    pruned, result = edgeprune.prune(model, PruneOptions(ratio=0.3, round_to=8))
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the original is untouched
    assert count_macs(pruned, x[:1]) < 0.7 * count_macs(model, x[:1])
    head = [n for n, why in result.unpruned.items() if why.startswith("detection head")]
    assert "model.22.dfl.conv" in head and "model.22.cv3.2.2" in head
    edgeprune.save(pruned, result.history, tmp_path / "art")
    assert not list((tmp_path / "art").glob("*.pt"))
    again = edgeprune.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_split_c2f_is_exact(yolo_weights):
    """The rewritten C2f blocks compute what Ultralytics' own model computes."""
    from ultralytics.nn.tasks import DetectionModel

    from edgeprune.models.factory import load_checkpoint

    ours = edgeprune.create_model("yolov8n.yaml", yolo_weights)
    theirs = load_checkpoint(DetectionModel("yolov8n.yaml", nc=10, verbose=False), yolo_weights).eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x)[0], atol=1e-4)
    assert not any(type(m).__name__ == "C2f" for m in ours.modules())


def test_onnx_decodes_boxes_with_a_last_axis_softmax(tmp_path, yolo_weights):
    """The exported DFL takes its softmax on the last axis (ONNX Runtime runs Ultralytics' axis-1 form six
    times slower) and still matches PyTorch; the module itself is left as Ultralytics wrote it."""
    import onnx

    from edgeprune.export import check_parity, export_onnx
    from edgeprune.recipe import ExportOptions

    model = edgeprune.create_model("yolov8n.yaml", yolo_weights)
    path = export_onnx(model, (3, 256, 256), tmp_path / "m.onnx", ExportOptions())
    softmax = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and onnx.helper.get_attribute_value(softmax[0].attribute[0]) in (-1, 3)
    parity = check_parity(model, path, (3, 256, 256), ExportOptions())
    assert parity.passed and parity.max_abs_diff < 1e-4
    assert "forward" not in vars(edgeprune.models.yolo.detect_head(model).dfl)


def test_macs_target_keeps_a_detector_uniform():
    """A MACs target that channel rounding cannot hit: the closest uniform model, no global touch-up
    (which left a trained YOLOv8n at 0.0 mAP), and a note saying so."""
    model = edgeprune.create_model("yolov8n.yaml", "none", imgsz=64)
    pruned, result = edgeprune.prune(model, PruneOptions(macs_reduction=0.4, round_to=8))
    assert any("not touched up by a global ranking" in n for n in result.notes), result.notes
    x = torch.rand(1, 3, 64, 64)
    assert abs(count_macs(pruned, x) / count_macs(model, x) - 0.6) < 0.05
    widths = {la.name: la.channels_after for la in result.layers}
    assert all(w % 8 == 0 for n, w in widths.items() if n not in result.unpruned)  # rounding kept


@pytest.mark.parametrize("name", ["yolov8s.yaml", "yolo11n.yaml"])
def test_other_detection_yamls_prune(name):
    model = edgeprune.create_model(name, "none", num_classes=10, imgsz=256)
    pruned, result = edgeprune.prune(model, PruneOptions(ratio=0.3))
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (1, 14, 1344)
    assert count_macs(pruned, x) < 0.8 * count_macs(model, x)


def test_the_users_own_detection_yaml_builds_and_prunes(tmp_path):
    """Any .yaml is an Ultralytics model config: yolov8.yaml under the user's name, with scale n alone (Ultralytics
    takes the first scale listed when the file name names none), builds yolov8n and prunes; a YAML that builds no
    detector is one line."""
    from ultralytics.nn.tasks import yaml_model_load

    config = yaml_model_load("yolov8n.yaml")
    mine = tmp_path / "gate_detector.yaml"
    mine.write_text(yaml.safe_dump({"nc": config["nc"], "scales": {"n": config["scales"]["n"]},
                                    "backbone": config["backbone"], "head": config["head"]}))
    model = edgeprune.create_model(str(mine), "none", num_classes=10, imgsz=64)
    stock = edgeprune.create_model("yolov8n.yaml", "none", num_classes=10, imgsz=64)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())
    pruned, _ = edgeprune.prune(model, PruneOptions(ratio=0.3))
    x = torch.rand(1, 3, 64, 64)
    assert count_macs(pruned, x) < 0.8 * count_macs(model, x)
    # profiled by the command with no --weights: a detector's "default" is none there (sizes and times need none)
    proc = cli("profile", "--model", str(mine), "--num-classes", "10", "--imgsz", "64", "--json", "--warmup", "1",
               "--repeats", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"] == sum(p.numel() for p in model.parameters())
    (tmp_path / "broken.yaml").write_text("nc: 10\nbackbone: []\n")
    proc = cli("prune", "--model", str(tmp_path / "broken.yaml"), "--weights", "none", "--out", str(tmp_path / "o"),
               "-q")
    assert_one_line_error(proc, "does not build an Ultralytics detection model")


@pytest.mark.parametrize("name,needle", [("yolov8n-seg.yaml", "not a plain detection model"),
                                         ("yolov99z.yaml", "unknown YOLO model")])
def test_unsupported_yamls_are_one_line(tmp_path, name, needle):
    proc = cli("prune", "--model", name, "--weights", "none", "--out", str(tmp_path / "o"), "-q")
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)


def test_untrusted_pt_is_refused_and_trusted_pt_matches_safetensors(tmp_path, data_dir, yolo_weights):
    pt = data_dir / "yolov8n-cifar10det.pt"
    out = tmp_path / "o"
    proc = run_cli("prune", "--model", "yolov8n.yaml", "--weights", str(pt), "--out", str(out), "-q")
    assert proc.returncode == 2
    assert_one_line_error(proc, "pickle", "--trust-pickle")
    assert not out.exists() or not any(out.iterdir())
    trusted = edgeprune.create_model("yolov8n.yaml", pt, trust_pickle=True)
    safe = edgeprune.create_model("yolov8n.yaml", yolo_weights)
    assert trusted.edgeprune_spec.input_size == (3, 256, 256)  # train_args imgsz
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():  # the .pt holds FP16 weights of the same model
        assert (trusted(x) - safe(x)).abs()[:, 4:].max() < 5e-2


def _small_dataset(tmp_path: Path, det_data: Path, train: int = 24, val: int = 16) -> Path:
    root = tmp_path / "det"
    for split, n in (("train", train), ("val", val)):
        images = sorted((det_data.parent / "images" / split).glob("*.jpg"))[:n]
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True)
        for img in images:
            shutil.copy(img, root / "images" / split / img.name)
            shutil.copy(det_data.parent / "labels" / split / f"{img.stem}.txt", root / "labels" / split)
    (root / "data.yaml").write_text((det_data.parent / "data.yaml").read_text())
    return root


@pytest.mark.parametrize("breakage,needle", [
    ("missing_folder", "does not exist"),
    ("class_id", "exceeds dataset class count"),
    ("corrupt_image", "corrupt"),
])
def test_bad_datasets_are_one_line_and_write_nothing(tmp_path, det_data, yolo_weights, breakage, needle):
    root = _small_dataset(tmp_path, det_data)
    if breakage == "missing_folder":
        shutil.rmtree(root / "images" / "val")
    elif breakage == "class_id":
        label = sorted((root / "labels" / "train").glob("*.txt"))[0]
        label.write_text("10 0.5 0.5 0.2 0.2\n")
    else:
        image = sorted((root / "images" / "val").glob("*.jpg"))[0]
        image.write_bytes(b"not a jpeg at all" * 10)
    out = tmp_path / "run"
    proc = cli("prune", "--model", "yolov8n.yaml", "--weights", str(yolo_weights), "--data",
               str(root / "data.yaml"), "--out", str(out), "-q")
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert not out.exists()


def test_classes_must_match(tmp_path, det_data):
    with pytest.raises(EdgePruneError, match="has 10 classes but yolov8n.yaml outputs 80"):
        edgeprune.run(edgeprune.load_recipe(None, {"model.name": "yolov8n.yaml", "model.weights": "none",
                                                   "model.imgsz": 64, "data.path": str(det_data),
                                                   "recover.epochs": 0, "int8.enabled": False}), tmp_path / "o")


def test_detection_run_every_stage_then_resume(tmp_path, det_data, yolo_weights):
    """The recipe path: every stage reports mAP; the INT8 model keeps the box decoding in float; a second
    run finds every stage done; the fine-tuned detector reloads with the run's outputs."""
    root = _small_dataset(tmp_path, det_data, train=48, val=32)
    recipe = tmp_path / "det.yaml"
    recipe.write_text(f"""
model: {{name: yolov8n.yaml, weights: {yolo_weights}}}
data: {{path: {root / 'data.yaml'}, eval_batch_size: 16}}
prune: {{ratio: 0.2, round_to: 8}}
recover: {{calibration_images: 32, epochs: 1, batch_size: 16, optimizer: adamw, lr: 0.001, distill_alpha: 0.5,
          temperature: 2.0, close_mosaic: 1}}
int8: {{enabled: true, calibration_images: 16}}
latency: {{warmup: 1, repeats: 5, per_layer: false, openvino: false}}
""")
    out = tmp_path / "run"
    proc = run_cli("run", str(recipe), "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    for stage in ("baseline", "pruned", "recalibrated", "finetuned", "onnx", "int8"):
        figures = report[stage]
        assert 0 <= figures["map50_95"] <= figures["map50"] <= 100, (stage, figures)
    assert report["baseline"]["map50_95"] > 40  # the trained detector on real val images
    assert abs(report["onnx"]["map50_95"] - report["finetuned"]["map50_95"]) < 0.5
    assert report["int8"]["size_reduction_x"] > 3
    assert "mAP50-95" in (out / "report.md").read_text()
    # recover.amp, channels_last and packed_batchnorm (on by default) apply to detectors as to classifiers; their
    # teacher is never folded (fold_teacher is for classifiers)
    tuned = report["finetuned"]
    assert tuned["precision"] == ("bf16" if cpu_has_bf16() else "fp32") == tuned["epochs"][0]["precision"]
    assert tuned["channels_last"] and tuned["teacher_folded_batchnorms"] == 0
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert (tuned["packed_batchnorms"] > 0) == avx512  # widths rounded to 8, not all to 16
    page = (out / "report.html").read_text()
    assert "mAP50-95 against latency" in page and "top-1 against" not in page
    stamp = (out / "stages" / "finetuned.json").stat().st_mtime
    again = run_cli("run", str(recipe), "--out", str(out), "-q")
    assert again.returncode == 0, again.stderr
    assert (out / "stages" / "finetuned.json").stat().st_mtime == stamp  # nothing recomputed
    model = edgeprune.load(out)
    import onnxruntime as ort

    x = torch.rand(2, 3, 256, 256)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert abs(model(x)[:, 4:].numpy() - sess.run(None, {"input": x.numpy()})[0][:, 4:]).max() < 1e-4


def test_an_interrupted_finetune_resumes_to_the_uninterrupted_detector(tmp_path, det_data, yolo_weights):
    """Fine-tuning as shipped (bf16 where the CPU has it, channels-last, the packed batch norm), stopped after its
    first epoch's checkpoint, resumes to the very weights of an uninterrupted run; the student comes back
    contiguous and the caller's teacher keeps its weights and layout."""
    from edgeprune.detection.data import load_detection_data
    from edgeprune.detection.train import finetune
    from edgeprune.recipe import RecoverOptions

    data = load_detection_data(_small_dataset(tmp_path, det_data, train=8, val=4) / "data.yaml")
    teacher = edgeprune.create_model("yolov8n.yaml", yolo_weights)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned, _ = edgeprune.prune(teacher, PruneOptions(ratio=0.2, round_to=8))
    opts = RecoverOptions(epochs=2, batch_size=4, optimizer="adamw", lr=0.001, distill_alpha=0.5,
                          temperature=2.0, close_mosaic=1)
    whole = copy.deepcopy(pruned)
    full = finetune(whole, teacher, data, opts, seed=0)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(ema):  # called after each epoch, before its checkpoint
        if len(calls) == 1:
            raise Stop
        calls.append(ema)
        return SimpleNamespace(map50_95=0.0, map50=0.0)

    calls: list = []
    checkpoint = tmp_path / "ckpt.pt"
    with pytest.raises(Stop):
        finetune(pruned, teacher, data, opts, checkpoint, seed=0, tag="t", evaluate=stop_after_first_epoch)
    assert all(p.is_contiguous() for p in pruned.parameters()) and not hasattr(pruned, "args")  # after an error
    resumed = finetune(pruned, teacher, data, opts, checkpoint, resume=True, seed=0, tag="t")
    assert resumed.resumed_from_epoch == 1 and [e.epoch for e in resumed.epochs] == [1, 2]
    assert resumed.precision == full.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert resumed.channels_last and resumed.packed_batchnorms == full.packed_batchnorms
    for name, value in whole.state_dict().items():
        assert torch.equal(pruned.state_dict()[name], value), name
    assert all(p.is_contiguous() for p in pruned.parameters())
    assert all(torch.equal(v, before[k]) and v.is_contiguous() for k, v in teacher.state_dict().items())


def test_amp_timing_of_a_detector_leaves_no_trace(tmp_path, det_data, yolo_weights, monkeypatch):
    """recover.amp's timing of the detector's own training step in bf16 and FP32 (`recover.choose_precision`; the
    CPU made to report AVX512-BF16, the probe's floor lowered to this fine-tune) chooses by the times it records,
    and the fine-tune then matches, bit for bit, one told that precision without timing."""
    import edgeprune.environment as environment
    import edgeprune.recover as recover
    from edgeprune.detection.data import load_detection_data
    from edgeprune.detection.train import finetune
    from edgeprune.recipe import RecoverOptions

    monkeypatch.setattr(environment, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    data = load_detection_data(_small_dataset(tmp_path, det_data, train=8, val=4) / "data.yaml")
    teacher = edgeprune.create_model("yolov8n.yaml", yolo_weights)
    pruned, _ = edgeprune.prune(teacher, PruneOptions(ratio=0.2, round_to=8))
    other = copy.deepcopy(pruned)
    # the first epoch with mosaic augmentation, whose partner images come from the images loaded before
    opts = RecoverOptions(epochs=2, batch_size=4, optimizer="adamw", lr=0.001, distill_alpha=0.5, close_mosaic=1)
    monkeypatch.setattr(recover, "AMP_PROBE_MIN_STEPS", 4)  # 8 images in batches of 4, two epochs
    notes: list[str] = []
    probed = finetune(pruned, teacher, data, opts, seed=0, log=notes.append)
    seconds = probed.precision_step_s
    assert set(seconds) == {"bf16", "fp32"}, seconds
    assert probed.precision == ("bf16" if seconds["bf16"] < seconds["fp32"] * (1 - recover.AMP_MIN_GAIN) else "fp32")
    assert notes == [recover.precision_note(probed.precision, seconds)]
    monkeypatch.setattr(recover, "AMP_PROBE_MIN_STEPS", 5)
    told = finetune(other, teacher, data, opts.model_copy(update={"amp": probed.precision == "bf16"}), seed=0)
    assert told.precision == probed.precision and told.precision_step_s is None
    for name, value in other.state_dict().items():
        assert torch.equal(pruned.state_dict()[name], value), name


def test_evaluate_cli_gives_map_and_refuses_a_classification_dataset():
    proc = run_cli("evaluate", "--model", "yolov8n.yaml", "--weights", "cifar10-det", "--data",
                   "cifar10-det/data.yaml", "--limit", "32", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["images"] == 32 and 40 < figures["map50_95"] <= figures["map50"] <= 100, figures
    wrong = cli("evaluate", "--model", "yolov8n.yaml", "--weights", "cifar10-det", "--data", "cifar10", "-q")
    assert wrong.returncode == 2
    assert_one_line_error(wrong, "is a detector", "data.yaml")


@pytest.mark.parametrize("path_key", [None, ".", "det"])
def test_relative_data_yaml_and_path_key(tmp_path, det_data, monkeypatch, path_key):
    from edgeprune.detection.data import load_detection_data

    root = _small_dataset(tmp_path, det_data, train=2, val=2)
    yaml_file = root / "data.yaml"
    if path_key == "det":  # `path` relative to the data.yaml's folder
        (root / "det").mkdir()
        for sub in ("images", "labels"):
            shutil.move(root / sub, root / "det" / sub)
    if path_key is not None:
        yaml_file.write_text(f"path: {path_key}\n" + yaml_file.read_text())
    monkeypatch.chdir(tmp_path)  # a relative data.yaml path, as typed on the command line
    data = load_detection_data(Path("det") / "data.yaml")
    assert [Path(p).resolve() for p in data.train] == [(root / (path_key or ".") / "images" / "train").resolve()]
    assert len(list(Path(data.val[0]).glob("*.jpg"))) == 2
