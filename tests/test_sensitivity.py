"""Sensitivity analysis and allocation: masking computes what Torch-Pruning's surgery computes, the
allocation spends a MACs budget where it costs least, and the CLI caches the analysis in the run folder."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch_pruning as tp
from conftest import assert_one_line_error, cli, run_cli

import edgeprune
from edgeprune.measure import count_macs
from edgeprune.pruning import resolve_unpruned
from edgeprune.pruning import sensitivity as S
from edgeprune.recipe import PruneOptions
from edgeprune.recover import recalibrate_bn_on


def _randomize_bn(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


@pytest.mark.parametrize("name,size", [("cifar_resnet20", 32), ("mobilenet_v2", 64)])
def test_masking_computes_what_pruning_computes(name, size):
    model = edgeprune.create_model(name, "none")
    _randomize_bn(model)  # fresh BNs are identities: a wrong mask could hide behind them
    x = torch.randn(2, 3, size, size)
    opts = PruneOptions(ratio=0.5)
    graph, groups = S._groups(model, x, list(resolve_unpruned(model, x, opts)), opts)
    assert len(groups) > 5
    state = copy.deepcopy(model.state_dict())
    for gname, root, group, _ in groups[:4] + groups[-2:]:
        channels = len(group[0][1])
        idxs = sorted(torch.randperm(channels, generator=torch.Generator().manual_seed(1))[: channels // 2].tolist())
        cut = copy.deepcopy(model)
        dg = tp.DependencyGraph().build_dependency(cut, x)
        dg.get_pruning_group(dict(cut.named_modules())[gname], group[0][0].handler, idxs).prune()
        seen = []
        hook = root.register_forward_hook(lambda mod, i, out, seen=seen, idxs=idxs: seen.append(
            out[:, idxs].abs().max().item()))
        with torch.no_grad():
            model(x)
            S._mask(graph.get_pruning_group(root, group[0][0].handler, idxs), graph)
            masked = model(x)
            model.load_state_dict(state)
            assert torch.allclose(masked, cut(x), atol=1e-4), gname
        hook.remove()
        assert seen[0] > 0 and seen[1] == 0, gname  # the masked channels were live, then silenced


def test_allocation_spends_the_budget_where_it_costs_least():
    def point(ratio, saved, distortion):  # the top-1 figures play no part in the allocation
        return S.SensitivityPoint(ratio, 8 - int(8 * ratio), saved, 90.0, 0.0, distortion)

    sens = S.Sensitivity(metric="top1", reference=90.0, ratios=[0.25, 0.5], macs=1000, groups=[
        S.GroupSensitivity("robust", 8, ["robust"], [point(0.25, 100, 0.0), point(0.5, 200, 0.2)]),
        S.GroupSensitivity("fragile", 8, ["fragile"], [point(0.25, 100, 5.0), point(0.5, 200, 20.0)]),
        S.GroupSensitivity("cheap", 8, ["cheap"], [point(0.25, 50, 0.0), point(0.5, 100, 1.0)]),
    ])
    ratios, predicted = S.allocate(sens, 250)
    assert ratios == {"robust": 0.5, "cheap": 0.25}  # per MAC, robust's second step beats cheap's
    assert predicted == pytest.approx(0.2)
    ratios, predicted = S.allocate(sens, 200)  # both free steps, then half of "robust"'s second
    assert ratios == {"cheap": 0.25, "robust": 0.375} and predicted == pytest.approx(0.1)
    ratios, predicted = S.allocate(sens, 10_000)  # more than there is: everything at its largest ratio
    assert ratios == {"robust": 0.5, "fragile": 0.5, "cheap": 0.5} and predicted == pytest.approx(21.2)
    assert S.allocate(sens, 250, max_ratio=0.3)[0] == {"robust": 0.25, "cheap": 0.25, "fragile": 0.25}


def test_sensitivity_allocation_meets_a_macs_target_and_reloads(tmp_path, cifar_test_subset):
    x_all, y_all = cifar_test_subset
    model = edgeprune.create_model("cifar_resnet20", "cifar10-jpeg")
    calibration = [x_all[i:i + 64] for i in range(0, 128, 64)]
    images, labels = x_all[128:328], y_all[128:328]

    @torch.no_grad()
    def score(m):
        recalibrate_bn_on(m, calibration)
        logits = m(images)
        return 100 * float((logits.argmax(1) == labels).float().mean()), logits

    opts = PruneOptions(macs_reduction=0.4, allocation="sensitivity", sensitivity_ratios=[0.3, 0.6])
    example = model.edgeprune_spec.example_input()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = S.analyse(model, example, opts, list(resolve_unpruned(model, example, opts)), score, opts.sensitivity_ratios)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored after the trials
    assert len(sens.groups) == 9 and all(len(g.points) == 2 for g in sens.groups)
    assert max(p.drop for g in sens.groups for p in g.points) > 2  # some groups matter
    distortions = [p.distortion for g in sens.groups for p in g.points]
    assert min(distortions) >= 0 and max(distortions) > 10 * min(distortions)
    for g in sens.groups:  # more pruned, more distorted (BN re-calibration keeps this monotone here)
        assert g.points[1].distortion >= g.points[0].distortion * 0.9, g
    pruned, result = edgeprune.prune(model, opts, sensitivity=sens)
    macs = count_macs(pruned, example)
    assert abs(macs - result.macs_target) / result.macs_target <= opts.tolerance
    assert result.macs_target == int(count_macs(model, example) * 0.6)
    assert len(set(result.group_ratios.values())) > 1 or len(result.group_ratios) < len(sens.groups)  # not uniform
    layers = {la.name: la for la in result.layers}
    for group, ratio in result.group_ratios.items():  # each group cut as its scored point
        la = layers[group]
        assert la.channels_after == la.channels_before - S.pruned_count(la.channels_before, ratio, None)
    edgeprune.save(pruned, result.history, tmp_path / "art")
    again = edgeprune.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(again(images[:8]), pruned(images[:8]))
    with pytest.raises(edgeprune.EdgePruneError, match="needs a sensitivity analysis"):
        edgeprune.prune(model, opts)


SMALL = ("--images", "200", "--ratios", "0.3,0.6", "--set", "prune.sensitivity_calibration_images=128")


def test_cli_sensitivity_then_prune_reuses_it(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("sensitivity", "--model", "cifar_resnet20", "--weights", "cifar10-jpeg", "--data", "cifar10",
                   "--out", str(out), "-q", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "layer3.0.conv1" in proc.stdout
    sens = json.loads((out / "sensitivity.json").read_text())
    assert sens["images"] == 200 and sens["ratios"] == [0.3, 0.6] and len(sens["groups"]) == 9
    assert sens["split"] == "train"  # held-out training images: the test split chooses nothing
    assert sens["reference"] > 95  # the unpruned model on images it was trained on
    stamp = (out / "stages" / "sensitivity.json").stat().st_mtime
    proc = run_cli("prune", "--model", "cifar_resnet20", "--weights", "cifar10-jpeg", "--data", "cifar10",
                   "--allocation", "sensitivity", "--ratio", "0.4", "--out", str(out), "-q",
                   "--set", "prune.sensitivity_images=200", "--set", "prune.sensitivity_ratios=[0.3,0.6]",
                   "--set", "prune.sensitivity_calibration_images=128", "--set", "data.eval_images=200",
                   "--set", "recover.calibration_images=128", "--set", "latency.per_layer=false",
                   "--set", "latency.openvino=false", "--warmup", "1", "--repeats", "5")
    assert proc.returncode == 0, proc.stderr
    assert (out / "stages" / "sensitivity.json").stat().st_mtime == stamp  # the analysis was reused
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["allocation"] == "sensitivity" and report["prune"]["group_ratios"]
    assert report["sensitivity"]["groups"] == sens["groups"]
    assert "Sensitivity" in (out / "report.md").read_text()
    assert "sensitivity of each prunable group" in (out / "report.html").read_text()
    again = cli("sensitivity", "--model", "cifar_resnet20", "--weights", "cifar10-jpeg", "--data", "cifar10",
                "--out", str(out), "-q", "--images", "100")  # a finished run is not rewritten
    assert_one_line_error(again, "different recipe")
    assert json.loads((out / "report.json").read_text())["prune"]["group_ratios"]
    for args, needle in ((("--allocation", "sensitivity"), "give --data"),
                         (("--allocation", "uniform", "--global"), "disagree"),
                         (("--allocation", "sensitivity", "--data", "cifar10", "--importance", "taylor"),
                          "without gradients")):
        bad = cli("prune", "--model", "cifar_resnet20", "--weights", "none", *args, "--out",
                  str(tmp_path / "bad"), "-q")
        assert_one_line_error(bad, needle)
        assert not (tmp_path / "bad").exists()


def test_a_training_split_too_small_to_hold_images_out_is_one_line(tmp_path):
    from test_data import make_folder

    data = make_folder(tmp_path / "data", classes=10, per_class=2)  # 20 training images, 256 asked to calibrate
    proc = cli("sensitivity", "--model", "cifar_resnet20", "--weights", "none", "--data", str(data),
               "--out", str(tmp_path / "run"), "-q")
    assert_one_line_error(proc, "sensitivity_split=eval")
    proc = run_cli("sensitivity", "--model", "cifar_resnet20", "--weights", "none", "--data", str(data),
                   "--out", str(tmp_path / "run"), "-q", "--split", "eval", "--ratios", "0.5", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    sens = json.loads((tmp_path / "run" / "sensitivity.json").read_text())
    assert sens["split"] == "eval" and sens["images"] == 20


def test_allocation_and_its_global_alias_agree():
    from edgeprune.recipe import Recipe, apply_overrides

    base = apply_overrides(Recipe(), {"prune.allocation": "global"})
    assert base.prune.global_pruning
    assert apply_overrides(base, {"prune.global_pruning": False}).prune.allocation == "uniform"
    assert apply_overrides(base, {"prune.allocation": "sensitivity"}).prune.global_pruning is False
    assert apply_overrides(Recipe(), {"prune.global_pruning": True}).prune.allocation == "global"
    with pytest.raises(edgeprune.EdgePruneError, match="exclude each other"):
        edgeprune.load_recipe(None, {"prune.allocation": "sensitivity", "prune.global_pruning": True})


def test_groups_masking_cannot_represent_are_refused():
    model = edgeprune.create_model("resnext50_32x4d", "none")
    x = torch.randn(1, 3, 64, 64)
    opts = PruneOptions(ratio=0.5)
    with pytest.raises(edgeprune.EdgePruneError, match="grouped conv"):
        S.check_maskable(model, x, list(resolve_unpruned(model, x, opts)), opts)


def test_ratios_that_round_to_the_same_count_are_scored_once():
    # round_to 8 on ResNet-20's 16-channel groups: 0.25 and 0.5 both keep 8 channels, 0.75 keeps none
    model = edgeprune.create_model("cifar_resnet20", "none")
    x = torch.randn(2, 3, 32, 32)
    opts = PruneOptions(ratio=0.5, round_to=8)
    calls = []

    def score(m):
        calls.append(1)
        with torch.no_grad():
            out = m(x)
        return 50.0, out

    sens = S.analyse(model, x, opts, list(resolve_unpruned(model, x, opts)), score, [0.25, 0.5, 0.75])
    by_width = {g.channels: [p.channels_after for p in g.points] for g in sens.groups}
    assert by_width[16] == [8]
    assert by_width[32] == [24, 16, 8]
    assert by_width[64] == [48, 32, 16]
    assert len(calls) == 1 + sum(len(g.points) for g in sens.groups)  # the reference, then one per point


def _trivial_analysis(model, ratios):
    """The analysis with a score that only runs the model (distortion is all the allocation reads)."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def score(m):
        with torch.no_grad():
            return 0.0, m(x)

    example = model.edgeprune_spec.example_input()
    opts = PruneOptions(ratio=0.5)
    return S.analyse(model, example, opts, list(resolve_unpruned(model, example, opts)), score, ratios)


def test_every_point_is_timed_on_the_runtime_layer_by_layer(tmp_path):
    from edgeprune.pruning.layer_latency import time_savings
    from edgeprune.pruning.probe import runner
    from edgeprune.recipe import ExportOptions, LatencyOptions

    model = edgeprune.create_model("cifar_resnet20", "cifar10-jpeg")
    sens = _trivial_analysis(model, [0.3, 0.6])
    latency = LatencyOptions(repeats=20, warmup=2)
    time_savings(model, model.edgeprune_spec.example_input(), sens, "ort_cpu",
                 lambda layer, size, name: runner(layer, size, "ort_cpu", latency, ExportOptions(),
                                                  tmp_path / f"{name}.onnx"), latency)
    assert sens.latency_runtime == "ort_cpu" and sens.latency_seconds > 0
    for g in sens.groups:  # a block's inner channels: conv1 loses outputs, conv2 inputs
        block = g.name.rsplit(".", 1)[0]
        for p in g.points:
            assert set(p.widths) == {f"{block}.conv1", f"{block}.conv2"}
            assert p.widths[f"{block}.conv1"][1] == p.channels_after == p.widths[f"{block}.conv2"][0]
            assert isinstance(p.latency_saved_ms, float)
    # identical shapes are exported once: per stage the full conv, the strided first conv and 2 widths x 2
    # convs, less the shared ones (layer1: 1 full + 4 pruned; layer2 and layer3: 3 + 1 + 2 + 2)
    assert len(list(tmp_path.glob("*.onnx"))) == 21
    # 60% of every block's inner channels gone: measurably faster in all. Not per stage: on an AVX-512 Xeon layer3's
    # 64 -> 25 channels at 8x8 saved -1 to 15 us per block, within the noise (it once summed to -6 us), while
    # layer1's and layer2's saved 18-38 us each
    assert sum(p.latency_saved_ms for g in sens.groups for p in g.points if p.ratio == 0.6) > 0
    from edgeprune.results import from_json

    again = from_json(S.Sensitivity, json.loads(json.dumps(sens.to_dict())))  # as a run folder stores it
    assert again == sens


def test_a_latency_allocation_follows_milliseconds_not_macs():
    def point(ratio, macs, ms):
        return S.SensitivityPoint(ratio, 4, macs, 90.0, 0.0, 0.1, latency_saved_ms=ms)

    sens = S.Sensitivity(metric="top1", reference=90.0, ratios=[0.5], macs=1000, groups=[
        S.GroupSensitivity("thin", 8, ["thin"], [point(0.5, 200, 0.01)]),  # many MACs, no time (a narrow layer)
        S.GroupSensitivity("wide", 8, ["wide"], [point(0.5, 100, 1.0)]),
    ])
    assert S.allocate(sens, 100)[0] == {"thin": 0.25}
    assert S.allocate(sens, 0.5, by="latency")[0] == {"wide": 0.25}
    sens.groups[0].points[0].latency_saved_ms = None
    with pytest.raises(edgeprune.EdgePruneError, match="no latency savings"):
        S.allocate(sens, 0.5, by="latency")


class _MacsClock:
    """Milliseconds that follow MACs exactly (a deterministic latency probe)."""

    def __init__(self, model, runtime):
        self.runtime, self.example = runtime, model.edgeprune_spec.example_input()
        self.baseline_ms = self(model)

    def __call__(self, model) -> float:
        return count_macs(model, self.example) / 1e6


def test_sensitivity_allocation_meets_a_latency_target():
    from edgeprune.errors import UnreachableTarget

    model = edgeprune.create_model("cifar_resnet20", "cifar10-jpeg")
    sens = _trivial_analysis(model, [0.3, 0.6, 0.85])
    for g in sens.groups:  # estimates off by a third from what the clock will read: the search must rescale
        for p in g.points:
            p.latency_saved_ms = p.macs_saved / 1e6 * 0.67
    sens.latency_runtime = "macs-clock"
    clock = _MacsClock(model, "macs-clock")
    opts = PruneOptions(target_latency_ms=0.6 * clock.baseline_ms, allocation="sensitivity",
                        sensitivity_ratios=[0.3, 0.6, 0.85], round_to="auto")
    pruned, result = edgeprune.prune(model, opts, sensitivity=sens, latency_probe=clock)
    s = result.latency_search
    assert s["runtime"] == "macs-clock" and s["baseline_ms"] == clock.baseline_ms
    assert clock(pruned) == s["chosen"]["latency_ms"] <= s["goal_ms"] == pytest.approx(0.9 * opts.target_latency_ms)
    assert clock(pruned) >= 0.85 * s["goal_ms"]  # close under the goal, not pruned to the floor
    assert len(s["trials"]) >= 2 and all("budget_ms" in t for t in s["trials"])
    assert result.allocation == "sensitivity" and len(set(result.group_ratios.values())) > 1
    assert result.round_to is None and any("no channel rounding" in n for n in result.notes)
    with pytest.raises(UnreachableTarget, match="by sensitivity allocation"):
        edgeprune.prune(model, opts.model_copy(update={"target_latency_ms": 0.05 * clock.baseline_ms}),
                        sensitivity=sens, latency_probe=clock)
    sens.latency_runtime = "ort_cpu"
    with pytest.raises(edgeprune.EdgePruneError, match="timed its layers on ort_cpu"):
        edgeprune.prune(model, opts, sensitivity=sens, latency_probe=clock)


def test_cli_speedup_target_with_sensitivity_allocation(tmp_path):
    # a speed-up, not ms: two processes' readings of the same model differ by up to 30% on this shared machine
    # (1.07 against 1.38 ms), so a target in ms taken from another process was already met, or out of reach.
    # Batch 16: at batch 1 ResNet-20's per-run overhead leaves 1.25x (aimed 10% below) just above its floor
    # (met only at 6.8M of its 40.9M MACs here); at 16 the search meets it at 12-15M, far from a slower machine's floor
    out = tmp_path / "run"
    proc = run_cli("prune", "--model", "cifar_resnet20", "--weights", "cifar10-jpeg", "--data", "cifar10",
                   "--allocation", "sensitivity", "--target-speedup", "1.25", "--out", str(out), "-q",
                   "--epochs", "0", "--set", "int8.enabled=false", "--set", "latency.per_layer=false",
                   "--set", "latency.openvino=false", "--set", "latency.batch_size=16",
                   "--set", "prune.sensitivity_images=200",
                   "--set", "prune.sensitivity_ratios=[0.3,0.6,0.9]",
                   "--set", "prune.sensitivity_calibration_images=128", "--set", "data.eval_images=200")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (out / "stages" / "sensitivity_latency.json").exists()
    points = [p for g in report["sensitivity"]["groups"] for p in g["points"]]
    assert report["sensitivity"]["latency_runtime"] == "ort_cpu" and all(
        isinstance(p["latency_saved_ms"], float) for p in points)
    assert json.loads((out / "sensitivity.json").read_text()) == report["sensitivity"]
    search = report["prune"]["latency_search"]
    # the winner is measured again (and pruned further while it misses the target): its last reading is in time
    assert search["trials"][-1]["macs"] == search["chosen"]["macs"] == report["pruned"]["macs"]
    assert search["chosen"]["latency_ms"] == search["trials"][-1]["latency_ms"] <= search["target_ms"]
    assert all("budget_ms" in t for t in search["trials"])
    assert report["prune"]["allocation"] == "sensitivity" and report["prune"]["group_ratios"]
    target = report["target"]
    assert target["kind"] == "latency" and target["speedup"] == 1.25 and target["latency_ms"] == search["target_ms"]
    assert search["target_ms"] == pytest.approx(search["baseline_ms"] / 1.25)
    assert report["pruned"]["macs"] < report["baseline"]["macs"]
    assert "ms saved on ort_cpu" in (out / "report.md").read_text()
    assert "at least 1.25x faster than the unpruned model on ort_cpu" in (out / "report.md").read_text()
