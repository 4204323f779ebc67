"""The target searches on real pruned models: latency (with a deterministic clock) and MACs bisection."""
import json

import pytest

from edgeprune import EdgePruneError, create_model, prune
from edgeprune.measure import count_macs
from edgeprune.pruning.search import RECHECK_STEP, RECHECKS, Trial, bisect
from edgeprune.recipe import PruneOptions


class MacsClock:
    """A latency probe where milliseconds follow MACs exactly. A plain class: `LatencyProbe` is a
    Protocol, so anything with `runtime`, `baseline_ms` and `__call__(model) -> ms` will do.

    `slow_rechecks`: how many times a model measured before reads ten times slower, as a noisy machine
    might report the search's winner when it is measured again."""

    runtime = "macs-model"

    def __init__(self, model, slow_rechecks: int = 0):
        self.example = model.edgeprune_spec.example_input()
        self.baseline_ms = self.ms(model)
        self.slow_rechecks = slow_rechecks

    def ms(self, model) -> float:
        return count_macs(model, self.example) / 1e7

    def __call__(self, model) -> float:
        ms = self.ms(model)
        if getattr(model, "measured_by_clock", False) and self.slow_rechecks:
            self.slow_rechecks -= 1
            ms *= 10
        model.measured_by_clock = True
        return ms


@pytest.fixture(scope="module")
def resnet20():
    return create_model("cifar_resnet20")


def search(model, slow_rechecks=0, **opts):
    clock = MacsClock(model, slow_rechecks)
    opts = {"target_latency_ms": 0.7 * clock.baseline_ms, "latency_margin": 0.0, "round_to": "auto",
            "round_to_candidates": [1, 8, 16], **opts}
    pruned, result = prune(model, PruneOptions(**opts), latency_probe=clock)
    return clock, pruned, result


@pytest.fixture(scope="module")
def honest(resnet20):
    """The search with a clock that never misreads."""
    return search(resnet20)


def test_a_plain_class_is_a_latency_probe_and_the_search_is_recorded(honest):
    clock, pruned, result = honest
    s = result.latency_search
    assert set(s) == {"target_ms", "target_speedup", "goal_ms", "runtime", "baseline_ms", "chosen", "trials"}
    assert s["target_speedup"] is None
    assert json.loads(json.dumps(result.to_dict()))["latency_search"] == s  # JSON as it is
    assert (s["runtime"], s["baseline_ms"], s["target_ms"], s["goal_ms"]) == (
        "macs-model", clock.baseline_ms, 0.7 * clock.baseline_ms, 0.7 * clock.baseline_ms)
    assert s["chosen"] == {"ratio": pytest.approx(0.285428568), "round_to": 1, "latency_ms": 2.8543498,
                           "macs": 28_543_498}
    assert clock.ms(pruned) == s["chosen"]["latency_ms"] <= s["target_ms"]
    assert result.ratio == s["chosen"]["ratio"] and result.round_to is None
    assert len(s["trials"]) == result.search_trials == 14
    rechecks = [t for t in s["trials"] if t.get("recheck")]
    assert rechecks == [{"ratio": 0.2854, "round_to": 1, "latency_ms": 2.8543498, "macs": 28_543_498,
                         "within_goal": True, "recheck": True}]
    assert {t["round_to"] for t in s["trials"]} == {1, 8, 16}


def test_a_winner_slower_on_its_recheck_is_pruned_further(resnet20, honest):
    clean = honest[2]
    clock, pruned, result = search(resnet20, slow_rechecks=1)
    first = clean.latency_search["chosen"]
    s = result.latency_search
    rechecks = [t for t in s["trials"] if t.get("recheck")]
    assert [(t["ratio"], t["within_goal"]) for t in rechecks] == [(0.2854, False), (0.3054, True)]
    assert rechecks[0]["latency_ms"] == pytest.approx(10 * first["latency_ms"])
    assert s["trials"][:-3] == clean.latency_search["trials"][:-1]  # the same search up to the re-check
    assert s["chosen"]["ratio"] == pytest.approx(first["ratio"] + RECHECK_STEP)
    assert s["chosen"]["round_to"] == first["round_to"] and s["chosen"]["macs"] < first["macs"]
    assert result.ratio == s["chosen"]["ratio"] and result.search_trials == len(clean.latency_search["trials"]) + 2
    assert clock.ms(pruned) == s["chosen"]["latency_ms"] and count_macs(pruned, clock.example) == s["chosen"]["macs"]


def test_rechecks_are_bounded(resnet20, honest):
    clean = honest[2]
    _, _, result = search(resnet20, slow_rechecks=100)
    s = result.latency_search
    assert [t["within_goal"] for t in s["trials"] if t.get("recheck")] == [False] * RECHECKS
    assert s["chosen"]["ratio"] == pytest.approx(clean.latency_search["chosen"]["ratio"] + RECHECKS * RECHECK_STEP)


def test_latency_targets_already_met_or_out_of_reach_are_errors(resnet20):
    with pytest.raises(EdgePruneError, match=r"the unpruned model already runs in 4\.09 ms <= 8\.18558 ms on "
                                             r"macs-model; nothing to prune"):
        search(resnet20, target_latency_ms=2 * MacsClock(resnet20).baseline_ms)
    with pytest.raises(EdgePruneError) as err:
        search(resnet20, target_latency_ms=0.01, round_to=8)
    assert str(err.value).startswith("cannot reach 0.01 ms on macs-model: the fastest model tried (ratio 0.70, "
                                     "round_to 8) still takes 2.14 ms (unpruned 4.09 ms)")
    with pytest.raises(EdgePruneError, match="a latency target needs a latency probe"):
        prune(resnet20, PruneOptions(target_latency_ms=1.0))


def test_a_speedup_target_is_the_same_search_in_ms_of_the_probes_own_baseline(resnet20, honest):
    clean = honest[2].latency_search
    clock, pruned, result = search(resnet20, target_latency_ms=None, target_speedup=1 / 0.7)
    s = result.latency_search
    assert s["target_speedup"] == pytest.approx(1 / 0.7) and s["target_ms"] == pytest.approx(clean["target_ms"])
    assert s["chosen"] == clean["chosen"] and clock.baseline_ms / clock.ms(pruned) >= 1 / 0.7
    with pytest.raises(EdgePruneError, match=r"^cannot reach 50x faster \(0\.08186 ms\) on macs-model: the fastest"):
        search(resnet20, target_latency_ms=None, target_speedup=50, round_to=8)


def test_bisect_returns_the_closest_trials_on_each_side(resnet20):
    x = resnet20.edgeprune_spec.example_input()
    target = count_macs(resnet20, x) // 2
    ratios = []

    def prune_at(ratio):
        ratios.append(ratio)
        pruned, result = prune(resnet20, PruneOptions(ratio=ratio))
        return pruned, result.history

    found = bisect(prune_at, lambda m: count_macs(m, x), target, hi=1.0, tolerance=0.001, steps=4)
    # The padded shortcuts keep whole layers, so ratio 0.5 leaves more than half the MACs: it moves up.
    assert ratios == [0.5, 0.75, 0.625, 0.5625] and found.trials == 4
    assert isinstance(found.above, Trial) and isinstance(found.below, Trial)
    assert (found.above.ratio, found.above.macs, found.below.ratio, found.below.macs) == (
        0.5, 20_787_850, 0.5625, 18_270_346)
    assert found.above.macs > target >= found.below.macs
    assert found.above.distance == abs(found.above.macs - target) / target
    assert found.best is found.above  # 1.6% above beats 10.7% below
    assert count_macs(found.below.model, x) == found.below.macs
