"""The accuracy budget (--max-drop): prune-and-recover trials searched on the MACs reduction, the most
pruned one within the budget published, every trial reported, a re-run resumed trial by trial."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, cli, run_cli

import edgeprune
from edgeprune.budget import BudgetTrial, next_fraction

SMALL = ("--model", "cifar_resnet20", "--weights", "cifar10-jpeg", "--data", "cifar10", "--epochs", "1",
         "--set", "recover.train_images=256", "--set", "recover.calibration_images=128",
         "--set", "data.eval_images=200", "--warmup", "1", "--repeats", "3", "--round-to", "1",
         "--set", "latency.openvino=false", "-q")


def _trial(fraction: float, drop: float, budget: float = 1.0) -> BudgetTrial:
    return BudgetTrial(name=f"macs-{fraction}", fraction=fraction, overrides={}, macs=1, latency_ms=None,
                       recovered=90 - drop, drop=drop, within=drop <= budget)


def test_the_search_brackets_the_budget():
    assert next_fraction([], 1.0, 0.5) == 0.5
    assert next_fraction([_trial(0.5, 0.2)], 1.0, 0.5) == 0.7  # all pass: halfway to the 0.9 cap
    guess = next_fraction([_trial(0.5, 0.5), _trial(0.7, 2.5)], 1.0, 0.5)
    assert guess == 0.55  # regula falsi between 0.5 (0.5 points) and 0.7 (2.5): 0.5 + 0.2 * 0.5 / 2.0
    assert 0.5 < next_fraction([_trial(0.5, 0.99), _trial(0.7, 30.0)], 1.0, 0.5) <= 0.5 + 0.15 * 0.2 + 1e-9
    assert next_fraction([_trial(0.5, 0.5), _trial(0.51, 1.5)], 1.0, 0.5) is None  # bracket narrower than 0.02
    assert next_fraction([_trial(0.89, 0.5)], 1.0, 0.5) is None  # at the cap
    unreachable = BudgetTrial(name="latency-0.5", fraction=0.5, overrides={}, macs=None, latency_ms=None,
                              recovered=None, drop=None, within=False, note="cannot reach 1 ms")
    assert next_fraction([unreachable], 1.0, 0.5) == 0.25  # a latency target past the floor: bisect below it
    assert next_fraction([_trial(0.2, 0.5), unreachable], 1.0, 0.5) == 0.35


def test_max_drop_publishes_the_most_pruned_trial_within_the_budget(tmp_path):
    out = tmp_path / "run"
    args = ("prune", *SMALL, "--max-drop", "3", "--max-drop-trials", "2", "--int8", "--out", str(out))
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    budget = report["max_drop"]
    assert budget["metric"] == "top1" and len(budget["trials"]) == 2
    assert budget["trials"][0]["fraction"] == 0.5
    passing = [t for t in budget["trials"] if t["within"]]
    chosen = max(passing, key=lambda t: t["fraction"])
    assert budget["chosen"] == chosen["name"] and chosen["drop"] <= 3
    assert all(t["drop"] == round(budget["baseline"] - t["recovered"], 3) for t in budget["trials"])
    assert report["finetuned"]["top1"] == chosen["recovered"] and report["pruned"]["macs"] == chosen["macs"]
    assert "int8" in report and "diagnostics" in report  # the chosen trial ran the recipe's INT8 and profile
    others = [t["name"] for t in budget["trials"] if t["name"] != chosen["name"]]
    assert (out / "model.int8.onnx").exists() and not any((out / "trials" / o / "model.int8.onnx").exists()
                                                         for o in others)
    assert "Accuracy budget" in (out / "report.md").read_text() and "(chosen)" in (out / "report.html").read_text()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(edgeprune.load(out)(x), edgeprune.load(out / "trials" / chosen["name"])(x))
    stamp = (out / "trials" / chosen["name"] / "stages" / "finetuned.json").stat().st_mtime
    proc = run_cli(*args)  # a re-run reuses every finished trial
    assert proc.returncode == 0, proc.stderr
    assert (out / "trials" / chosen["name"] / "stages" / "finetuned.json").stat().st_mtime == stamp
    assert json.loads((out / "report.json").read_text())["max_drop"]["trials"] == budget["trials"]
    exported = cli("export", str(out), "--json")  # the search's chosen trial, exported again and re-published
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["max_drop"] == json.loads((out / "report.json").read_text())["max_drop"]
    assert (out / "model.onnx").read_bytes() == (out / "trials" / chosen["name"] / "model.onnx").read_bytes()
    other = cli("prune", "--model", "cifar_resnet20", "--weights", "none", "--ratio", "0.5", "--out", str(out), "-q")
    assert_one_line_error(other, "holds a run of a different recipe")  # a search folder is not written over


def test_no_trial_within_the_budget_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("prune", *SMALL, "--max-drop", "0.01", "--max-drop-trials", "1", "--out", str(out))
    assert_one_line_error(proc, "no trial stayed within 0.01 points", "macs-0.500")
    assert not (out / "model.safetensors").exists()
    bad = cli("prune", "--model", "cifar_resnet20", "--weights", "none", "--max-drop", "1", "--out",
                  str(tmp_path / "bad"), "-q")
    assert_one_line_error(bad, "max_drop", "--data")
    bad = cli("prune", *SMALL, "--max-drop", "1", "--ratio", "0.5", "--out", str(tmp_path / "bad"))
    assert_one_line_error(bad, "--max-drop")


def test_max_drop_by_latency_asks_each_trial_for_a_speedup(tmp_path):
    out = tmp_path / "run"
    # ResNet-20 at 32x32 barely speeds up on ONNX Runtime: 90% of its channels removed (10x fewer MACs) runs 1.66x
    # faster here at batch 1 and 1.79x at batch 16, so 2x is out of reach and 1.33x takes ~75% of its channels,
    # which one epoch of 256 images does not recover (15-28% top-1), hence the wide budget; what is checked is the
    # search. Batch 16 keeps the timings above the sub-millisecond noise of batch 1, and a third trial (1.14x after
    # two misses) keeps a slower machine whose floor is under 1.33x/0.9 = 1.48x from failing the run: CI once could
    # not reach 1.33x at batch 1
    proc = run_cli("prune", *SMALL, "--max-drop", "85", "--max-drop-by", "latency", "--max-drop-trials", "3",
                   "--set", "latency.per_layer=false", "--set", "latency.batch_size=16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    trials = report["max_drop"]["trials"]
    assert trials[0]["name"] == "latency-0.500" and len(trials) == 3
    if trials[0].get("note"):  # 2x was out of reach (always, on this machine): the search bisects below it
        assert "cannot reach 2x faster" in trials[0]["note"] and trials[1]["name"] == "latency-0.250"
    for t in trials:  # removing a fraction F of the latency: F=0.5 asks for 2x, F=0.25 (after a miss) for 1.3333x
        assert t["overrides"] == {"prune.target_speedup": round(1 / (1 - t["fraction"]), 4)}
        assert ("cannot reach" in t["note"] and t["drop"] is None) if t.get("note") else t["latency_ms"] > 0
    chosen = next(t for t in trials if t["name"] == report["max_drop"]["chosen"])
    assert chosen["within"] and report["target"]["speedup"] == chosen["overrides"]["prune.target_speedup"]
    search = report["prune"]["latency_search"]
    assert search["target_ms"] == pytest.approx(search["baseline_ms"] / report["target"]["speedup"])
