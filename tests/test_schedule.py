"""Iterative pruning (prune.steps): the steps land on the one-shot plan's widths, the history replays,
and a run recovers between steps, reports every step and resumes after the last finished one."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch_pruning as tp
from conftest import assert_one_line_error, cli, run_cli

import edgeprune
from edgeprune.measure import count_macs
from edgeprune.pruning import resolve_unpruned
from edgeprune.pruning.schedule import epoch_shares, layer_widths, prune_to_widths, step_widths
from edgeprune.recipe import PruneOptions


def test_epoch_shares_spend_the_whole_budget_last_steps_first():
    assert epoch_shares(5, 2) == [2, 3]
    assert epoch_shares(5, 3) == [1, 2, 2]
    assert epoch_shares(1, 3) == [0, 0, 1]
    assert epoch_shares(6, 3) == [2, 2, 2]
    assert all(sum(epoch_shares(e, n)) == e for e in range(9) for n in range(1, 6))


def test_step_widths_move_monotonically_to_the_final_widths():
    start, final = {"a": 64, "b": 16, "c": 10}, {"a": 16, "b": 16, "c": 3}
    steps = [step_widths(start, final, k, 3, round_to=8) for k in (1, 2, 3)]
    assert steps[-1] == final
    assert steps[0]["a"] == 48 and steps[1]["a"] == 32  # 64 - 48/3 and 64 - 2*48/3, multiples of 8
    assert steps[0]["c"] == 8 and steps[1]["c"] == 8  # 10 - 2 = 8, and 10 - 4 = 6 rounded up to 8
    assert step_widths({"d": 12}, {"d": 4}, 1, 3, round_to=16) == {"d": 12}  # never past the unpruned width
    for name in start:
        widths = [start[name]] + [s[name] for s in steps]
        assert widths == sorted(widths, reverse=True), widths


@pytest.mark.parametrize("name, opts", [("cifar_resnet20", PruneOptions(ratio=0.5)),
                                        ("mobilenet_v2", PruneOptions(macs_reduction=0.6, round_to=8))])
def test_steps_reach_the_one_shot_widths_and_the_history_replays(name, opts):
    model = edgeprune.create_model(name, weights="none", num_classes=10)
    example = model.edgeprune_spec.example_input()
    one_shot, _ = edgeprune.prune(model, opts)
    start, final = layer_widths(model), layer_widths(one_shot)
    unpruned = resolve_unpruned(model, example, opts)
    current, history, macs = model, [], [count_macs(model, example)]
    for k in (1, 2, 3):
        current, step_history = prune_to_widths(current, example, opts, step_widths(start, final, k, 3, opts.round_to),
                                                unpruned, {})
        history += step_history
        macs.append(count_macs(current, example))
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4  # each step removes more
    assert layer_widths(current) == final and macs[-1] == count_macs(one_shot, example)
    fresh = edgeprune.create_model(name, weights="none", num_classes=10)
    tp.DependencyGraph().build_dependency(fresh, example).load_pruning_history([tuple(h) for h in history])
    fresh.load_state_dict(current.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(example), current.eval()(example))


SMALL = ("--set", "recover.train_images=256", "--set", "recover.calibration_images=128",
         "--set", "data.eval_images=200", "--set", "latency.per_layer=false", "--warmup", "1", "--repeats", "3",
         "--round-to", "1", "--set", "latency.openvino=false")


def test_cli_prunes_in_steps_recovers_between_them_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ("prune", "--model", "cifar_resnet20", "--weights", "cifar10-jpeg", "--data", "cifar10", "--ratio", "0.5",
            "--steps", "3", "--epochs", "4", "--out", str(out), "-q", *SMALL)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    schedule = report["schedule"]
    assert schedule["epochs"] == [1, 1, 2] and [s["step"] for s in schedule["steps"]] == [1, 2]
    assert report["prune"]["steps"] == 3 and report["finetuned"]["epochs"][-1]["epoch"] == 2  # the last share
    macs = [s["macs"] for s in schedule["steps"]] + [report["pruned"]["macs"]]
    assert macs == sorted(macs, reverse=True) and macs[0] < report["baseline"]["macs"]
    model = edgeprune.create_model("cifar_resnet20", "cifar10-jpeg")
    one_shot, _ = edgeprune.prune(model, PruneOptions(ratio=0.5))
    assert report["pruned"]["macs"] == count_macs(one_shot, model.edgeprune_spec.example_input())  # same widths
    for step in schedule["steps"]:  # BN re-calibration and fine-tuning recover part of each step's loss
        assert step["recalibrated"]["top1"] > step["pruned"]["top1"]
        assert step["finetuned"]["top1"] > 40 and step["epochs"] == 1
    assert "Iterative pruning in 3 steps" in (out / "report.md").read_text()
    assert "Iterative pruning in 3 steps" in (out / "report.html").read_text()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # the published model is the last step's fine-tuned one, rebuilt from its history
        assert torch.equal(edgeprune.load(out)(x), edgeprune.load(out / "stages" / "finetuned")(x))
    # an interruption after the steps but before their stage record: the rerun resumes after step 2
    (out / "stages" / "steps.json").unlink()
    shutil.rmtree(out / "stages" / "finetuned")
    assert not (out / "stages" / "steps" / "step-1").exists() and (out / "stages" / "steps" / "step-2").is_dir()
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "report.json").read_text())
    assert again["schedule"] == schedule  # the finished steps were not run again (their seconds are the same)
    assert again["finetuned"]["top1"] == report["finetuned"]["top1"]


def test_steps_need_data(tmp_path):
    proc = cli("prune", "--model", "cifar_resnet20", "--weights", "none", "--steps", "2", "--out",
               str(tmp_path / "bad"), "-q")
    assert_one_line_error(proc, "prune.steps", "--data")
    assert not (tmp_path / "bad").exists()
