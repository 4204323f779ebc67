"""The stages of a run, declared once: what each reads, what it depends on, what it writes.

A stage's result is stored in `stages/<name>.json` with a fingerprint of its inputs: the recipe
fields it reads and the stored records of the stages it depends on. A stored result is reused only
while its fingerprint matches and the files it wrote are still there. A changed input therefore
recomputes the stage, which changes its record and so the fingerprint of every stage computed from
it: invalidation follows from this table, nothing lists it by hand.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsio import read_json, write_json
from .recipe import LatencyOptions, Recipe

MODEL = "model"  # a dependency on the latest stage before this one that produced the pruned weights
ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
FINETUNE_CHECKPOINT = "finetune-checkpoint.pt"
SENSITIVITY_NAME = "sensitivity.json"

Reads = tuple[str, ...] | Callable[[Recipe], tuple[str, ...]]


@dataclass(frozen=True)
class Stage:
    name: str
    reads: Reads  # recipe sections or dotted fields ("recover.batch_size")
    after: tuple[str, ...] = ()  # stages whose results it uses; MODEL: the latest model stage
    writes: tuple[str, ...] = ()  # files it produces, relative to the run folder
    makes_model: bool = False  # writes a new version of the pruned weights (stages/<name>/)
    collective: bool = False  # every torchrun process takes part (evaluation, training)
    wanted: Callable[[Recipe], bool] = lambda recipe: True  # does the recipe ask for it?
    # bumped when the stage computes differently from the same inputs and results stored before must not be reused
    version: int = 0

    def fields(self, recipe: Recipe) -> tuple[str, ...]:
        return self.reads(recipe) if callable(self.reads) else self.reads


def _has_data(recipe: Recipe) -> bool:
    return bool(recipe.data.path)


def _prune_reads(recipe: Recipe) -> tuple[str, ...]:
    # Every pruning option but the tracing guard's limits, which change whether it runs, not its result, the
    # accuracy budget's (it decides which runs happen, each with its own target), and the allocation's fields
    # unless it is a sensitivity one (global_pruning tells uniform from global).
    skip = ("trace_", "max_drop")
    if recipe.prune.allocation != "sensitivity":
        skip += ("allocation", "sensitivity_")
    reads = ("model", "seed", *(f"prune.{k}" for k in type(recipe.prune).model_fields if not k.startswith(skip)))
    if recipe.prune.latency_targeted():  # candidates are exported and timed
        reads += ("latency", "export")
    elif recipe.prune.times_candidates():
        # the multiple is chosen by timing for these threads and batch; more repeats or another opset do not
        # re-prune (and re-train) a model
        reads += ("latency.threads", "latency.batch_size")
    if recipe.prune.importance in ("taylor", "hessian"):  # gradients from training images
        reads += ("data.path",)
    return reads


def _sensitive(recipe: Recipe) -> bool:
    return recipe.prune.allocation == "sensitivity"


SENSITIVITY_READS = ("model", "data.path", "seed", "prune.importance", "prune.round_to", "prune.ignore",
                     "prune.sensitivity_ratios", "prune.sensitivity_images", "prune.sensitivity_split",
                     "prune.sensitivity_calibration_images",
                     "recover.batch_size")

def _times_layers(recipe: Recipe) -> bool:
    """A sensitivity allocation for a latency target: what each point saves in ms, its layers timed alone."""
    return _sensitive(recipe) and recipe.prune.latency_targeted()


STAGES: tuple[Stage, ...] = (
    Stage("sensitivity", SENSITIVITY_READS, writes=(SENSITIVITY_NAME,), wanted=_sensitive),
    Stage("sensitivity_latency", ("prune.latency_runtime", "latency.threads", "latency.batch_size",
                                  "latency.ort_spinning", "latency.ort_spin_us", "latency.warmup", "latency.repeats",
                                  "latency.turn_runs", "latency.settle_runs", "export"),
          # it rewrites the analysis's sensitivity.json with the savings, but does not own the file: dropping this
          # stage (another target) must not delete the analysis
          after=("sensitivity",), wanted=_times_layers),
    Stage("steps", lambda r: (*_prune_reads(r), "data", "recover"), after=("sensitivity", "sensitivity_latency"),
          writes=("stages/steps/model.safetensors",), makes_model=True, collective=True,
          wanted=lambda r: r.prune.steps > 1),
    Stage("prune", _prune_reads, after=("sensitivity", "sensitivity_latency", "steps"),
          writes=("stages/prune/model.safetensors",), makes_model=True),
    Stage("accuracy_baseline", ("model", "data"), collective=True, wanted=_has_data),
    Stage("accuracy_pruned", ("data",), after=("prune",), collective=True, wanted=_has_data),
    Stage("recalibrated", ("data", "recover.calibration_images", "recover.batch_size", "seed"), after=("prune",),
          writes=("stages/recalibrated/model.safetensors",), makes_model=True, collective=True,
          wanted=lambda r: _has_data(r) and r.recover.recalibrate),
    Stage("finetuned", ("model", "data", "recover", "seed"), after=(MODEL,),
          writes=("stages/finetuned/model.safetensors",), makes_model=True, collective=True,
          wanted=lambda r: _has_data(r) and r.recover.epochs > 0),
    Stage("export", ("export", "latency.openvino"), after=(MODEL,), writes=(ONNX_NAME,)),
    Stage("accuracy_onnx", ("data", "latency.threads"), after=("export",), wanted=_has_data),
    Stage("int8", ("int8", "data", "latency"), after=("export",), writes=(INT8_NAME,),
          wanted=lambda r: r.int8.enabled),
    Stage("measure", ("model", "export", *(f"latency.{k}" for k in LatencyOptions.model_fields if k != "per_layer"),
                      "prune.target_latency_ms", "prune.target_speedup"), after=("export",),
          # 1: ONNX Runtime timed with latency.ort_spin_us; 2: in settled turns (latency.turn_runs, settle_runs)
          version=2),
    Stage("diagnose", ("latency",), after=("measure",), wanted=lambda r: r.latency.per_layer),
)
BY_NAME = {s.name: s for s in STAGES}


def plan(recipe: Recipe, table: tuple[Stage, ...] = STAGES) -> list[Stage]:
    """The stages this recipe asks for, in order."""
    return [s for s in table if s.wanted(recipe)]


def dependencies(stage: Stage, recipe: Recipe, table: tuple[Stage, ...] = STAGES) -> tuple[str, ...]:
    """The stages `stage` reads, with MODEL resolved to the latest model stage the recipe runs before it."""
    planned = plan(recipe, table)
    before = [s.name for s in planned[: planned.index(stage)] if s.makes_model]
    names = {s.name for s in planned}  # a stage the recipe does not run is no input (no sensitivity when uniform)
    return tuple(before[-1] if d == MODEL else d for d in stage.after if d == MODEL or d in names)


def final_model_stage(recipe: Recipe) -> str:
    return [s.name for s in plan(recipe) if s.makes_model][-1]


# Recipe fields added after run folders existed, with their defaults: at the default a field is left out of
# the fingerprints, so that stages computed before it existed stay valid (no re-pruning, no re-training).
# recover.fold_teacher (2026-12-01) is deliberately not one: the folded teacher's logits differ in the last bits,
# so a fine-tune from before it runs again instead of resuming its checkpoint with another teacher.
# recover.packed_batchnorm (2026-12-01) is one: the same arithmetic through faster kernels, like a machine change.
# When detectors began to honour recover.amp, channels_last and packed_batchnorm (2026-12-01) their fingerprints
# stayed: a detector fine-tune interrupted before then resumes in bf16 where the CPU has it, as it would on
# another machine, and each epoch's precision in the report says which ran how.
# latency.ort_spin_us (2026-12-01) is one: a pruning decision timed before it (round_to auto, a latency target)
# stands, as one timed on a quieter machine would; the measure stage's version makes its figures be taken again.
# latency.turn_runs and settle_runs (2026-12-01), the same way.
# recover.compile (2026-12-02) is one: at auto, whether a fine-tune compiles is the machine's timing, like recover.amp's
# precision; a fine-tune from before it stands, and its interrupted checkpoint (which records no choice) resumes eager.
ADDED_FIELDS: dict[str, Any] = {"prune.target_speedup": None, "recover.packed_batchnorm": True,
                                "latency.ort_spin_us": 20, "latency.turn_runs": 10, "latency.settle_runs": 5,
                                "recover.compile": "auto"}


def _settled(recipe_json: dict) -> tuple[dict, set[str]]:
    """`recipe_json` without the ADDED_FIELDS that hold their default, and the names of those left out."""
    unset = set()
    for dotted, default in ADDED_FIELDS.items():
        *path, key = dotted.split(".")
        section = _field(recipe_json, ".".join(path)) if path else recipe_json
        if section[key] == default:
            del section[key]
            unset.add(dotted)
    return recipe_json, unset


def _field(recipe_json: dict, dotted: str) -> Any:
    value: Any = recipe_json
    for key in dotted.split("."):
        value = value[key]
    return value


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class StageStore:
    """The `stages/` folder of a run: one record (fingerprint + result) per finished stage."""

    def __init__(self, root: Path, table: tuple[Stage, ...] = STAGES):
        self.root = Path(root)
        self.folder = self.root / "stages"
        self.table = table

    def done(self) -> set[str]:
        """The stages with a stored record."""
        return {p.stem for p in self.folder.glob("*.json")} if self.folder.is_dir() else set()

    def record(self, name: str) -> dict | None:
        path = self.folder / f"{name}.json"
        return read_json(path) if path.exists() else None

    def fingerprint(self, stage: Stage, recipe: Recipe) -> str:
        recipe_json, unset = _settled(recipe.model_dump(mode="json"))
        deps = {}
        for dep in dependencies(stage, recipe, self.table):
            record = self.record(dep)  # what it computed, not how long it took
            deps[dep] = _digest({k: v for k, v in record.items() if k != "seconds"}) if record is not None else None
        reads = {f: _field(recipe_json, f) for f in stage.fields(recipe) if f not in unset}
        return _digest({"reads": reads, "after": deps, **({"version": stage.version} if stage.version else {})})

    def fresh(self, stage: Stage, fingerprint: str) -> dict | None:
        """The stored result when it was computed from inputs with this fingerprint and its files are all there."""
        record = self.fresh_record(stage, fingerprint)
        return record["result"] if record is not None else None

    def fresh_record(self, stage: Stage, fingerprint: str) -> dict | None:
        """`fresh`'s whole record: the result, and the `seconds` it took when the edgeprune that stored it said."""
        record = self.record(stage.name)
        if record is None or record.get("fingerprint") != fingerprint:
            return None
        if not all((self.root / f).exists() for f in stage.writes):
            return None
        return record

    def save(self, stage: Stage, fingerprint: str, result: dict, seconds: float | None = None) -> None:
        record = {"fingerprint": fingerprint, "result": result}
        if seconds is not None:
            record["seconds"] = seconds
        write_json(self.folder / f"{stage.name}.json", record)

    def drop_unplanned(self, recipe: Recipe) -> None:
        """Forget stages the recipe no longer asks for, so the report cannot show them."""
        wanted = {s.name for s in plan(recipe, self.table)}
        for stage in self.table:
            if stage.name not in wanted:
                (self.folder / f"{stage.name}.json").unlink(missing_ok=True)
                shutil.rmtree(self.folder / stage.name, ignore_errors=True)  # a model stage's weights
                for path in stage.writes:
                    (self.root / path).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.root / FINETUNE_CHECKPOINT).unlink(missing_ok=True)
