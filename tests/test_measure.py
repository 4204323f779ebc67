import torch

from edgeprune import create_model
from edgeprune.export import export_onnx
from edgeprune.measure import count_macs, count_params, measure, state_dict_bytes
from edgeprune.recipe import ExportOptions, LatencyOptions


def test_counts_follow_the_documented_convention():
    model = create_model("resnet18")
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs - 1.82e9) / 1.82e9 < 0.01  # torchvision's published 1.82 GFLOPs (MACs) for ResNet-18
    assert count_params(model) == 11_689_512
    assert 4 * count_params(model) < state_dict_bytes(model) < 4 * count_params(model) + 100_000


def test_measure_reports_sizes_and_latency_percentiles(tmp_path):
    model = create_model("cifar_resnet20", weights="default")
    path = export_onnx(model, (3, 32, 32), tmp_path / "m.onnx", ExportOptions())
    m = measure({"m": (model, path)}, (3, 32, 32), LatencyOptions(warmup=2, repeats=10))["m"]
    assert m.params == 269_722 and m.onnx_bytes == path.stat().st_size
    assert set(m.latency_ms) >= {"torch_cpu", "ort_cpu"}
    for key, median in m.latency_ms.items():
        assert 0 < median <= m.latency_p90_ms[key]


def test_latency_drops_with_width():
    from edgeprune import prune
    from edgeprune.measure import time_interleaved, torch_runner
    from edgeprune.recipe import PruneOptions

    model = create_model("resnet18")
    pruned, _ = prune(model, PruneOptions(ratio=0.75), example=torch.randn(1, 3, 64, 64))
    runners = {name: torch_runner(m, (3, 112, 112), 1) for name, m in (("full", model), ("pruned", pruned))}
    timed = time_interleaved(runners, LatencyOptions(warmup=3, repeats=15))
    assert timed["pruned"].median_ms < timed["full"].median_ms


def test_spinning_runtimes_are_timed_in_settled_turns():
    """ONNX Runtime's workers spin for tens of ms after a run: when any runner spins, each model's turn first runs
    it untimed until the one before has settled, then times a block of runs; the timed count stays `repeats`."""
    import itertools
    import time

    from edgeprune.measure import SPIN_BLOCK, SPIN_SETTLE_S, time_interleaved
    from edgeprune.rows import turns as turns_text

    calls: list[tuple[str, float]] = []

    def runner(name, spins=False):
        def run():
            calls.append((name, time.perf_counter()))
            time.sleep(0.002)
        run.spins = spins  # as ort_runner(..., spinning=True) marks its runs
        return run

    for settle_runs in (0, 2):  # the untimed runs count towards the settling time, however many are asked for
        calls.clear()
        opts = LatencyOptions(warmup=1, repeats=SPIN_BLOCK + 3, turn_runs=4, settle_runs=settle_runs)
        timed = time_interleaved({"a": runner("a", spins=True), "b": runner("b")}, opts)
        assert timed["a"].runs == timed["b"].runs == SPIN_BLOCK + 3
        turns = [(name, [t for _, t in group]) for name, group in itertools.groupby(calls[2:], key=lambda c: c[0])]
        assert [name for name, _ in turns] == ["a", "b", "a", "b"]  # after the warm-up: two turns each, in turn
        for (_, times), timed_runs in zip(turns, (SPIN_BLOCK, SPIN_BLOCK, 3, 3), strict=True):
            assert len(times) > max(timed_runs, settle_runs)
            assert times[-timed_runs] - times[0] >= SPIN_SETTLE_S  # settled first
    # what reports say of such turns names the same floor
    spun = turns_text({"turn_runs": 1, "settle_runs": 0, "ort_spinning": True})
    assert f"at least {SPIN_BLOCK} runs per turn, after {SPIN_SETTLE_S:g} s untimed" in spun
    assert "spinning" not in turns_text({"turn_runs": 1, "settle_runs": 0, "ort_spinning": False})


def test_models_are_timed_in_settled_turns_of_back_to_back_runs():
    """Each turn runs one model settle_runs times untimed, then times turn_runs runs back to back; turn_runs 1
    with settle_runs 0 alternates single runs."""
    import itertools

    from edgeprune.measure import time_interleaved

    calls: list[str] = []

    def runner(name):
        def run():
            calls.append(name)
        return run

    timed = time_interleaved({"a": runner("a"), "b": runner("b")},
                             LatencyOptions(warmup=1, repeats=7, turn_runs=3, settle_runs=2))
    assert timed["a"].runs == timed["b"].runs == 7
    turns = [(name, len(list(group))) for name, group in itertools.groupby(calls[2:])]
    assert turns == [("a", 5), ("b", 5), ("a", 5), ("b", 5), ("a", 3), ("b", 3)]  # 2 untimed + 3, 3, then 1
    assert LatencyOptions().turn_runs == 10 and LatencyOptions().settle_runs == 5
    calls.clear()
    single = time_interleaved({"a": runner("a"), "b": runner("b")},
                              LatencyOptions(warmup=1, repeats=7, turn_runs=1, settle_runs=0))
    assert single["a"].runs == 7 and calls == ["a", "b"] * 8  # warm-up, then single runs in turn


def test_onnx_runtime_workers_wait_as_the_latency_options_say(tmp_path):
    """By default ONNX Runtime's workers busy-wait ort_spin_us, then sleep, and their runs are timed round-robin;
    ort_spinning is ONNX Runtime's own unbounded spin (settled turns); ort_spin_us 0 sleeps at once."""
    from edgeprune.measure import ort_runner, ort_session, ort_waiting

    model = create_model("cifar_resnet20")
    path = export_onnx(model, (3, 32, 32), tmp_path / "m.onnx", ExportOptions())

    def entries(latency):
        config = ort_session(path, 1, **ort_waiting(latency)).get_session_options()

        def entry(key):
            try:
                return config.get_session_config_entry(key)
            except RuntimeError:  # ONNX Runtime's answer for a key never set
                return None
        return entry("session.intra_op.allow_spinning"), entry("session.intra_op.spin_duration_us")

    assert LatencyOptions().ort_spin_us == 20
    assert entries(LatencyOptions()) == ("1", "20")
    assert entries(LatencyOptions(ort_spin_us=0)) == ("0", None)
    assert entries(LatencyOptions(ort_spinning=True)) == ("1", None)
    assert not ort_runner(path, (3, 32, 32), 1, 1, **ort_waiting(LatencyOptions())).spins
    assert ort_runner(path, (3, 32, 32), 1, 1, **ort_waiting(LatencyOptions(ort_spinning=True))).spins


def test_runtimes_send_no_telemetry_under_edgeprune(tmp_path):
    """ONNX Runtime 1.32's wheel writes a device id and an event queue for Microsoft's telemetry when it is
    imported, and `import openvino` sends an event to Google Analytics (writing ~/intel/openvino_ga_cid);
    edgeprune turns both off before importing them. CI=true turns them off too, so both processes run
    without CI (and without the variable the test process itself inherited from edgeprune), each with a home
    and cache folder of its own."""
    import os
    import subprocess
    import sys

    import onnx
    from onnx import TensorProto, helper

    model = tmp_path / "identity.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])),
              str(model))
    session = f"import onnxruntime as ort; ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])"
    written = {}
    for name, code in (("plain", session + "; import openvino"),
                       ("edgeprune", "from edgeprune.measure import require_openvino; require_openvino(); " + session)):
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "ORT_DISABLE_TELEMETRY")}
        env["HOME"] = env["XDG_CACHE_HOME"] = str(tmp_path / name)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
        written[name] = sorted(p.name for p in (tmp_path / name).rglob("*") if p.is_file())
    # what the two runtimes do on their own here
    assert "deviceid" in written["plain"] and "openvino_ga_cid" in written["plain"], written
    assert written["edgeprune"] == [], written
