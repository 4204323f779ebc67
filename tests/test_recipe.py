import pytest

from edgeprune import EdgePruneError, load_recipe


def test_default_recipe_halves_cifar_resnet56_macs():
    recipe = load_recipe()
    assert recipe.model.name == "cifar_resnet56" and recipe.prune.macs_reduction == 0.5
    assert recipe.prune.ratio is None


def test_yaml_recipe_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: resnet18, weights: none}\nprune: {ratio: 0.3, round_to: 8}\n")
    recipe = load_recipe(path, {"prune.macs_reduction": 0.4})
    assert recipe.model.name == "resnet18" and recipe.prune.round_to == 8
    assert recipe.prune.macs_reduction == 0.4 and recipe.prune.ratio is None



def test_overrides_reach_the_seed_and_nested_mappings():
    recipe = load_recipe(None, {"seed": 3, "model.model_args.width": 0.5, "model.model_args.depth": 2})
    assert recipe.seed == 3 and recipe.model.model_args == {"width": 0.5, "depth": 2}
    for overrides, message in [({"prune": 1}, "names a whole section; give one of its fields"),
                               ({"prnue.ratio": 0.5}, "unknown recipe section 'prnue'"),
                               ({"prune.importance.x": 1}, "prune.importance is not a section or mapping"),
                               ({"sede": 1}, "sede: Extra inputs are not permitted")]:
        with pytest.raises(EdgePruneError, match=message):
            load_recipe(None, overrides)


@pytest.mark.parametrize("text,message", [
    ("prune: {ratio: 1.5}", "prune.ratio: Value error, must be between 0 and 1"),
    ("prune: {ratio: 0.5, macs_reduction: 0.5}", "give one of ratio, macs_reduction, target_latency_ms"),
    ("prune: {importance: magic}", "prune.importance"),
    ("prune: {target_speedup: 0.8}", "prune.target_speedup: Input should be greater than 1"),
    ("prune: {target_speedup: 2, target_latency_ms: 3}", "give one of .*target_speedup.*, not target_latency_ms "
                                                        "and target_speedup"),
    ("prnue: {ratio: 0.5}", "prnue: Extra inputs are not permitted"),
    ("- just\n- a list", "must be a mapping"),
    ("model: [unclosed", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(EdgePruneError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_a_checkpoint_given_as_the_recipe_is_one_line(tmp_path):
    path = tmp_path / "resnet56.pth"
    path.write_bytes(bytes(range(256)))  # not UTF-8
    with pytest.raises(EdgePruneError, match="not a YAML text file; a checkpoint goes to --weights"):
        load_recipe(path)
