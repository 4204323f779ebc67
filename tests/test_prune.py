import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import edgeprune
import edgeprune.pruning
from edgeprune import EdgePruneError, create_model, prune
from edgeprune.measure import count_macs
from edgeprune.pruning import HEAD_REASON, PAD_REASON, HessianImportance, build_graph, out_channels, prunable_layers
from edgeprune.recipe import PruneOptions

X224_SMALL = torch.randn(1, 3, 64, 64)


def widths(result):
    return {la.name: (la.channels_before, la.channels_after) for la in result.layers}


def test_ratio_prunes_physically_and_keeps_the_head():
    model = create_model("resnet18")
    pruned, result = prune(model, PruneOptions(ratio=0.5), example=X224_SMALL)
    assert pruned.fc.out_features == 1000 and result.unpruned == {"fc": HEAD_REASON}
    assert pruned.conv1.out_channels == 32 and model.conv1.out_channels == 64  # original untouched
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    assert sum(p.numel() for p in pruned.parameters()) == 3_055_880
    assert widths(result)["layer4.1.conv2"] == (512, 256)
    assert all(after == before // 2 for name, (before, after) in widths(result).items() if name != "fc")
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    assert len(result.history) == 12 and result.search_trials == 1 and result.ratio == 0.5
    assert {n: out_channels(m) for n, m in prunable_layers(pruned).items()} == {
        n: after for n, (_, after) in widths(result).items()}


def test_the_package_and_the_function_are_both_reachable():
    assert edgeprune.prune is edgeprune.pruning.prune and callable(edgeprune.prune)
    assert edgeprune.pruning.__name__ == "edgeprune.pruning"
    assert set(edgeprune.pruning.__all__) >= {
        "prune", "PruneResult", "LayerWidth", "LatencyProbe", "OnnxLatencyProbe", "HessianImportance",
        "make_importance", "prunable_layers", "out_channels", "find_heads", "find_coupled", "PAD_REASON",
        "HEAD_REASON", "Trial"}
    assert all(hasattr(edgeprune.pruning, name) for name in edgeprune.pruning.__all__)


def test_cifar_pad_shortcut_layers_stay_whole_and_are_explained():
    model = create_model("cifar_resnet56", weights="default")
    pruned, result = prune(model, PruneOptions(ratio=0.5))
    coupled = [n for n, why in result.unpruned.items() if why == PAD_REASON]
    assert "conv1" in coupled and "layer3.8.conv2" in coupled and len(coupled) == 28  # stem + 27 blocks
    w = widths(result)
    assert all(w[n][0] == w[n][1] for n in coupled)
    assert w["layer3.0.conv1"] == (64, 32)
    x = torch.randn(4, 3, 32, 32)
    assert pruned(x).shape == (4, 10)


def test_plain_depgraph_breaks_the_pad_shortcut_that_we_protect():
    """Why the protection exists: Torch-Pruning alone yields a model that cannot run."""
    model = create_model("cifar_resnet20")
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 32, 32), importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.linear])
    pruner.step()
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(("macs_reduction", "ratio", "trials", "macs"),
                         [(0.5, 0.5, 1, 63_771_274), (0.6, 0.59375, 5, 50_663_818)])
def test_macs_target_is_met_within_one_percent(macs_reduction, ratio, trials, macs):
    model = create_model("cifar_resnet56", weights="default")
    x = torch.randn(1, 3, 32, 32)
    target = count_macs(model, x) * (1 - macs_reduction)
    pruned, result = prune(model, PruneOptions(macs_reduction=macs_reduction))
    assert count_macs(pruned, x) == macs and abs(macs - target) / target <= 0.01
    assert (result.ratio, result.search_trials) == (ratio, trials)  # the bisection's path: 0.5, 0.75, ...
    assert result.macs_target == int(target) and result.notes == []


def test_macs_touch_up_prunes_the_uniform_model_further_by_a_global_ranking(tmp_path):
    """cifar_resnet20 at -50% MACs: the uniform ratio cannot get within 1% (its best, ratio 0.5, is 1.6%
    above), so the closest model above the target is pruned further by a global l2 ranking."""
    model = create_model("cifar_resnet20", weights="default")
    x = torch.randn(1, 3, 32, 32)
    target = int(count_macs(model, x) * 0.5)
    uniform, uniform_result = prune(model, PruneOptions(ratio=0.5))
    assert abs(count_macs(uniform, x) - target) / target > 0.01  # why the touch-up runs
    pruned, result = prune(model, PruneOptions(macs_reduction=0.5))
    assert result.notes == ["a uniform ratio of 0.5000 left 20,787,850 MACs; a global l2 ranking removed "
                            "channels down to 20,490,890"]
    assert (result.macs_target, count_macs(pruned, x), count_macs(uniform, x)) == (target, 20_490_890, 20_787_850)
    assert abs(20_490_890 - target) / target <= 0.01
    assert result.ratio == 0.5 and result.search_trials == 21  # 20 bisection steps, then one touch-up trial
    # The history holds both passes: the uniform one first, then the global one on top of it.
    n = len(uniform_result.history)
    assert result.history[:n] == uniform_result.history and len(result.history) == 18
    edgeprune.save(pruned, result.history, tmp_path)
    loaded = edgeprune.load(tmp_path)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert {n: out_channels(m) for n, m in prunable_layers(loaded).items()} == {
        la.name: la.channels_after for la in result.layers}


def test_an_unreachable_macs_target_names_the_closest_model():
    """A 0.3% tolerance: neither pass gets there; the note gives the closest MACs found."""
    model = create_model("cifar_resnet20", weights="default")
    pruned, result = prune(model, PruneOptions(macs_reduction=0.45, tolerance=0.003))
    assert result.notes == ["MACs target 22,510,335 not reachable within 0%; closest is 22,414,474 (channel "
                            "rounding or un-prunable layers limit the granularity)"]
    assert count_macs(pruned, torch.randn(1, 3, 32, 32)) == 22_414_474
    assert result.search_trials == 27 and result.ratio == 0.4375


def test_global_ranking_round_to_and_layer_cap():
    torch.manual_seed(0)  # the global ranking follows the random weights
    model = create_model("resnet18")
    _, result = prune(model, PruneOptions(ratio=0.5, round_to=16, global_pruning=True, max_layer_ratio=0.75),
                      example=X224_SMALL)
    w = widths(result)
    after = [a for n, (_, a) in w.items() if n != "fc"]
    assert all(c % 16 == 0 for c in after)
    assert all(a >= b // 4 for b, a in w.values())  # the layer cap
    assert w["layer1.1.conv1"] == (64, 16) and w["layer2.0.conv1"] == (128, 48) and w["layer3.0.conv1"] == (256, 112)
    assert w["layer1.0.conv1"] == (64, 32) and w["fc"] == (1000, 1000)
    assert sum(after) == 2272


def test_pruning_inside_no_grad_works():
    with torch.no_grad():
        pruned, _ = prune(create_model("cifar_resnet20"), PruneOptions(ratio=0.5))
    assert pruned.layer1[0].conv1.out_channels == 8


def test_ignored_layer_globs_and_typos():
    model = create_model("resnet18")
    _, result = prune(model, PruneOptions(ratio=0.5, ignore=["layer4.*"]), example=X224_SMALL)
    assert widths(result)["layer4.0.conv1"] == (512, 512)
    assert result.unpruned["layer4.0.conv1"] == "ignored by the recipe"
    with pytest.raises(EdgePruneError, match="'layer9.*' matches no conv or linear layer"):
        prune(model, PruneOptions(ratio=0.5, ignore=["layer9.*"]), example=X224_SMALL)


@pytest.mark.parametrize("importance", ["l1", "l2", "bn-scale", "taylor", "hessian", "lamp", "fpgm", "random"])
def test_every_importance_criterion_prunes_a_working_model(importance, cifar_test_subset):
    model = create_model("cifar_resnet20", weights="default")
    x, y = cifar_test_subset
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    pruned, result = prune(model, PruneOptions(ratio=0.3, importance=importance), calibration=batches)
    assert pruned(x[:8]).shape == (8, 10)
    assert widths(result)["layer1.0.conv1"] == (16, 11)
    assert not result.notes


def test_magnitude_criteria_keep_the_strongest_channels():
    model = create_model("cifar_resnet20", weights="default")
    _, l2 = prune(model, PruneOptions(ratio=0.5, importance="l2"))
    _, rnd = prune(model, PruneOptions(ratio=0.5, importance="random"))
    removed = set(next(h[2] for h in l2.history if h[0] == "layer1.0.conv1"))
    block = model.layer1[0]
    norms = (block.conv1.weight.flatten(1).norm(dim=1) ** 2
             + block.conv2.weight.transpose(0, 1).flatten(1).norm(dim=1) ** 2)
    assert removed == set(norms.argsort()[:8].tolist())  # exactly the 8 weakest channels of the group
    assert l2.history != rnd.history


def test_gradient_criteria_without_data_say_so():
    _, result = prune(create_model("cifar_resnet20"), PruneOptions(ratio=0.3, importance="taylor"))
    assert "random inputs" in result.notes[0]


def test_hessian_accumulates_every_sample_unlike_torch_pruning():
    """Upstream 1.6.1 keeps only the last sample's g^2; ours averages all of them."""
    layer = nn.Linear(1, 1, bias=False)
    layer.weight.data.fill_(1.0)
    model = nn.Sequential(layer)
    ours, upstream = HessianImportance(), tp.importance.GroupHessianImportance()
    for scale in (1.0, 2.0):  # d(scale * w)/dw = scale, so g^2 = 1 then 4
        model.zero_grad()
        (model(torch.tensor([[scale]])).sum()).backward()
        ours.accumulate_grad(model)
        upstream.accumulate_grad(model)
    assert ours.mean_squared_grads()[layer.weight].item() == pytest.approx(2.5)
    upstream_sum = sum(upstream._accu_grad.values()).item()
    assert upstream_sum == pytest.approx(4.0)  # the bug: the first sample was dropped


def test_untraceable_model_is_a_clear_error_that_keeps_its_cause():
    """torchvision's own ShuffleNet V2 (not rewritten by create_model): DepGraph divides by zero on its shuffle."""
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5().eval()
    with pytest.raises(EdgePruneError, match="ShuffleNetV2 cannot be pruned safely") as err:
        prune(model, PruneOptions(ratio=0.5), example=X224_SMALL)
    assert str(err.value) == ("ShuffleNetV2 cannot be pruned safely with DepGraph (ZeroDivisionError: integer "
                              "division or modulo by zero); add the failing layers to prune.ignore or choose another "
                              "model")
    assert isinstance(err.value.__cause__, ZeroDivisionError)  # for --debug


def test_a_type_error_inside_torch_pruning_is_refused_one_raised_elsewhere_propagates():
    """Swin's concat index mapping makes Torch-Pruning itself add None to an int: a graph it cannot
    handle. A TypeError raised by a model's own forward is a bug, not advice to ignore layers."""
    with pytest.raises(EdgePruneError, match=r"swin_s cannot be pruned safely with DepGraph \(TypeError") as err:
        build_graph(create_model("swin_s"), X224_SMALL)
    assert isinstance(err.value.__cause__, TypeError)

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) + None

    with pytest.raises(TypeError, match="unsupported operand"):
        build_graph(Broken(), X224_SMALL)


def test_rounding_that_undoes_pruning_is_reported():
    """With round_to 16 at ratio 0.9, a 16..64-channel layer would keep under 16 channels; Torch-Pruning
    rounds that down to zero and leaves the layer whole. The result says so instead of staying silent."""
    model = create_model("cifar_resnet20")
    _, result = prune(model, PruneOptions(ratio=0.9, round_to=16))
    w = widths(result)
    assert w["layer1.0.conv1"] == (16, 16) and w["layer3.0.conv1"] == (64, 64)
    note = next(n for n in result.notes if "rounds down to zero" in n)
    assert "layer1.0.conv1" in note and "lower the ratio or the multiple" in note
    _, fine = prune(model, PruneOptions(ratio=0.5, round_to=8))
    assert not any("rounds down to zero" in n for n in fine.notes)
    assert widths(fine)["layer1.0.conv1"] == (16, 8)


def test_a_failure_in_our_own_pruning_code_is_told_apart_from_torch_prunings():
    """prune_copy turns Torch-Pruning's bare errors into "cannot be pruned safely", but not one raised in our
    importance criteria (which it calls back): a bug of ours keeps its traceback."""
    from edgeprune.pruning.rules import raised_in_our_pruning, raised_in_torch_pruning

    ours = HessianImportance()
    param = nn.Parameter(torch.ones(2))
    ours._accu_grad[param] = torch.ones(2)  # a gradient without its count: the bug this stands for
    with pytest.raises(KeyError) as info:
        ours.mean_squared_grads()
    assert raised_in_our_pruning(info.value) and not raised_in_torch_pruning(info.value)
    with pytest.raises(KeyError) as info:  # the same error raised elsewhere (here: in a user's code)
        {}["conv1"]
    assert not raised_in_our_pruning(info.value)
    assert not raised_in_our_pruning(ValueError("never raised"))
