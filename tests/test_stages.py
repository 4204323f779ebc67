"""The stage table: which stages a recipe runs, what they depend on, and what a change invalidates."""
from dataclasses import replace

from edgeprune.recipe import Recipe, apply_overrides
from edgeprune.stages import STAGES, StageStore, _settled, dependencies, final_model_stage, plan

BY_NAME = {s.name: s for s in STAGES}
FULL = apply_overrides(Recipe(), {"data.path": "cifar10", "recover.epochs": 1, "int8.enabled": True})


def names(recipe):
    return [s.name for s in plan(recipe)]


def test_plan_follows_the_recipe():
    assert names(apply_overrides(Recipe(), {"recover.epochs": 0})) == ["prune", "export", "measure", "diagnose"]
    assert names(FULL) == ["prune", "accuracy_baseline", "accuracy_pruned", "recalibrated", "finetuned", "export",
                           "accuracy_onnx", "int8", "measure", "diagnose"]
    no_recal = apply_overrides(FULL, {"recover.recalibrate": False, "latency.per_layer": False})
    assert "recalibrated" not in names(no_recal) and "diagnose" not in names(no_recal)


def test_model_dependency_is_the_latest_model_stage():
    assert dependencies(BY_NAME["finetuned"], FULL) == ("recalibrated",)
    assert dependencies(BY_NAME["export"], FULL) == ("finetuned",)
    assert final_model_stage(FULL) == "finetuned"
    no_recal = apply_overrides(FULL, {"recover.recalibrate": False})
    assert dependencies(BY_NAME["finetuned"], no_recal) == ("prune",)
    no_data = Recipe()
    assert dependencies(BY_NAME["export"], no_data) == ("prune",) and final_model_stage(no_data) == "prune"


def fill(store: StageStore, recipe: Recipe) -> None:
    """Record every planned stage in order, as a run would (results are placeholders; files are touched)."""
    for stage in plan(recipe, store.table):
        for path in stage.writes:
            (store.root / path).parent.mkdir(parents=True, exist_ok=True)
            (store.root / path).write_text("x")
        store.save(stage, store.fingerprint(stage, recipe), {"stage": stage.name})


def stale(store: StageStore, recipe: Recipe) -> list[str]:
    """The stages a run of `recipe` would compute again, walking the plan as the pipeline does."""
    out = []
    for stage in plan(recipe):
        fingerprint = store.fingerprint(stage, recipe)
        if store.fresh(stage, fingerprint) is None:
            out.append(stage.name)
            store.save(stage, fingerprint, {"stage": stage.name, "recomputed": True})
    return out


def test_a_changed_export_invalidates_exactly_what_reads_the_onnx_file(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert stale(store, FULL) == []
    assert stale(store, apply_overrides(FULL, {"export.opset": 13})) == [
        "export", "accuracy_onnx", "int8", "measure", "diagnose"]


def test_round_to_auto_is_chosen_again_for_other_threads_not_for_more_repeats(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert FULL.prune.round_to == "auto"
    assert stale(store, apply_overrides(FULL, {"latency.repeats": 100})) == ["int8", "measure", "diagnose"]
    assert stale(store, apply_overrides(FULL, {"latency.threads": 4}))[0] == "prune"
    fixed = apply_overrides(FULL, {"prune.round_to": 8})
    fill(store, fixed)
    assert "prune" not in stale(store, apply_overrides(fixed, {"latency.threads": 4}))


def test_a_changed_recovery_keeps_pruning_and_baseline_accuracy(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert stale(store, apply_overrides(FULL, {"recover.epochs": 3})) == [
        "finetuned", "export", "accuracy_onnx", "int8", "measure", "diagnose"]
    assert stale(store, apply_overrides(FULL, {"recover.epochs": 3, "recover.calibration_images": 512})) == [
        "recalibrated", "finetuned", "export", "accuracy_onnx", "int8", "measure", "diagnose"]


def test_folding_the_teacher_or_not_fine_tunes_again(tmp_path):
    """recover.fold_teacher is not one of ADDED_FIELDS: the folded teacher's logits differ in the last bits, so a
    run folder (or an interrupted fine-tune's checkpoint, tagged with the fingerprint) from before it fine-tunes
    again rather than resuming with another teacher."""
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert FULL.recover.fold_teacher
    assert stale(store, apply_overrides(FULL, {"recover.fold_teacher": False})) == [
        "finetuned", "export", "accuracy_onnx", "int8", "measure", "diagnose"]


def test_packed_batch_norm_at_its_default_keeps_earlier_fine_tunes(tmp_path):
    """recover.packed_batchnorm (the same arithmetic through faster kernels) is one of ADDED_FIELDS: at its default
    it is left out of the fingerprints, so a run folder from before it keeps its fine-tune; turned off, the
    fine-tune runs again."""
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert FULL.recover.packed_batchnorm
    assert "recover.packed_batchnorm" in _settled(FULL.model_dump(mode="json"))[1]
    assert stale(store, apply_overrides(FULL, {"recover.packed_batchnorm": False})) == [
        "finetuned", "export", "accuracy_onnx", "int8", "measure", "diagnose"]


def test_compile_at_auto_keeps_earlier_fine_tunes(tmp_path):
    """recover.compile is one of ADDED_FIELDS: at auto (whether to compile is the machine's timing) a run folder
    from before it keeps its fine-tune; told true or false, the fine-tune runs again."""
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert FULL.recover.compile == "auto"
    assert "recover.compile" in _settled(FULL.model_dump(mode="json"))[1]
    for setting in (True, False):
        assert stale(store, apply_overrides(FULL, {"recover.compile": setting})) == [
            "finetuned", "export", "accuracy_onnx", "int8", "measure", "diagnose"]


def test_a_run_timed_before_bounded_spinning_or_settled_turns_measures_again_but_keeps_its_pruning(tmp_path):
    """latency.ort_spin_us, turn_runs and settle_runs are ADDED_FIELDS, so a timed pruning decision (a latency
    target's) from before them stands; the measure stage's version makes the run's figures be taken again."""
    target = apply_overrides(FULL, {"prune.target_latency_ms": 1.0})
    added = {"latency.ort_spin_us": 0, "latency.turn_runs": 1, "latency.settle_runs": 0}  # each off its default
    assert set(added) <= _settled(target.model_dump(mode="json"))[1]
    store = StageStore(tmp_path)
    fill(store, target)
    measure = BY_NAME["measure"]
    assert measure.version >= 2
    for version in (0, 1):  # as the edgeprune of before each change stored it
        before = StageStore(tmp_path, tuple(s if s is not measure else replace(s, version=version) for s in STAGES))
        fill(before, target)
        assert stale(store, target) == ["measure", "diagnose"]
    for field, value in added.items():
        assert stale(store, apply_overrides(target, {field: value}))[0] == "prune"


def test_a_changed_target_recomputes_all_but_the_baseline_accuracy(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    redone = stale(store, apply_overrides(FULL, {"prune.ratio": 0.3}))
    assert redone == [n for n in names(FULL) if n != "accuracy_baseline"]


def test_int8_options_touch_only_the_int8_stage_and_a_missing_file_recomputes_its_stage(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert stale(store, apply_overrides(FULL, {"int8.calibration_images": 64})) == ["int8"]
    (tmp_path / "model.int8.onnx").unlink()
    assert stale(store, FULL) == ["int8"]


def test_latency_options_reach_the_pruning_only_with_a_latency_target(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert "prune" not in stale(store, apply_overrides(FULL, {"latency.repeats": 7}))
    target = apply_overrides(FULL, {"prune.target_latency_ms": 1.0})
    fill(store, target)
    assert stale(store, apply_overrides(target, {"latency.repeats": 9}))[0] == "prune"


def test_stages_no_longer_planned_are_forgotten(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    store.drop_unplanned(apply_overrides(FULL, {"int8.enabled": False}))
    assert store.record("int8") is None and not (tmp_path / "model.int8.onnx").exists()
    assert store.record("measure") is not None and (tmp_path / "model.onnx").exists()


def test_the_tracing_guard_limits_do_not_reach_the_result(tmp_path):
    store = StageStore(tmp_path)
    fill(store, FULL)
    assert stale(store, apply_overrides(FULL, {"prune.trace_memory_gb": 2.0, "prune.trace_timeout_s": 60})) == []
    assert stale(store, apply_overrides(FULL, {"prune.round_to": 8}))[0] == "prune"
