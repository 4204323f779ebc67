import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from edgeprune import EdgePruneError, create_model, prune
from edgeprune.measure import count_macs
from edgeprune.pruning import PAD_REASON, HessianImportance
from edgeprune.recipe import PruneOptions

X224_SMALL = torch.randn(1, 3, 64, 64)


def widths(result):
    return {la.name: (la.channels_before, la.channels_after) for la in result.layers}


def test_ratio_prunes_physically_and_keeps_the_head():
    model = create_model("resnet18")
    pruned, result = prune(model, PruneOptions(ratio=0.5), example=X224_SMALL)
    assert pruned.fc.out_features == 1000 and "fc" in result.unpruned
    assert pruned.conv1.out_channels == 32 and model.conv1.out_channels == 64  # original untouched
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * sum(p.numel() for p in model.parameters())
    assert widths(result)["layer4.1.conv2"] == (512, 256)
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    assert len(result.history) > 0


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


@pytest.mark.parametrize("macs_reduction", [0.5, 0.6])
def test_macs_target_is_met_within_one_percent(macs_reduction):
    model = create_model("cifar_resnet56", weights="default")
    x = torch.randn(1, 3, 32, 32)
    target = count_macs(model, x) * (1 - macs_reduction)
    pruned, result = prune(model, PruneOptions(macs_reduction=macs_reduction))
    assert abs(count_macs(pruned, x) - target) / target <= 0.01
    assert result.macs_target == int(target) and not any("not reachable" in n for n in result.notes)


def test_global_ranking_round_to_and_layer_cap():
    model = create_model("resnet18")
    _, result = prune(model, PruneOptions(ratio=0.5, round_to=16, global_pruning=True, max_layer_ratio=0.75),
                      example=X224_SMALL)
    after = [la.channels_after for la in result.layers if la.name != "fc"]
    assert all(c % 16 == 0 for c in after)
    assert all(la.channels_after >= 0.25 * la.channels_before - 16 for la in result.layers)
    assert len({round(la.channels_after / la.channels_before, 2) for la in result.layers if la.name != "fc"}) > 1


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
    kept_l2 = set(range(16)) - set(next(h[2] for h in l2.history if h[0] == "layer1.0.conv1"))
    block = model.layer1[0]
    norms = (block.conv1.weight.flatten(1).norm(dim=1) ** 2
             + block.conv2.weight.transpose(0, 1).flatten(1).norm(dim=1) ** 2)
    assert norms[list(kept_l2)].mean() > norms.mean()
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


def test_untraceable_model_is_a_clear_error():
    model = create_model("shufflenet_v2_x0_5")
    with pytest.raises(EdgePruneError, match="shufflenet_v2_x0_5 cannot be pruned safely"):
        prune(model, PruneOptions(ratio=0.5), example=X224_SMALL)


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
