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
