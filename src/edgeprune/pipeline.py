"""`run(recipe, out)`: every stage of `stages.STAGES` in one run folder, then the report.

A stage whose stored result still matches its inputs is skipped, so an interrupted run resumes
where it stopped and `export_run` recomputes only what a new export invalidates.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_type_hints

import torch
import torch.nn as nn
from pydantic import ValidationError

from . import artifact, report
from .accuracy import Accuracy, channels_last_copy, evaluate_model, evaluate_onnx_predictions
from .data import even_subset, load_split, loader, shard, unaugmented
from .diagnose import diagnose
from .distributed import Runtime, runtime, seed_everything
from .environment import environment
from .errors import EdgePruneError
from .export import check_parity, export_onnx, file_opset
from .fsio import TEMP_MARK, ensure_writable_dir, link_file, read_json, write_json, write_text
from .measure import count_macs, measure, onnx_bytes, openvino_available
from .models import create_model
from .pruning import OnnxLatencyProbe, PruneResult, prune
from .pruning.schedule import epoch_shares, layer_widths, prune_to_widths, step_widths
from .pruning.sensitivity import Sensitivity
from .quantize import calibration_data, compare_int8, quantize_int8, reduce_range, top1_of
from .recipe import Recipe, apply_overrides, build, same_recipe
from .recover import finetune, recalibrate_bn, recalibrate_bn_on
from .results import (
    Diagnosis,
    ExportResult,
    Finetuning,
    Int8Result,
    Measured,
    PruneStep,
    Recalibration,
    Schedule,
    from_json,
    to_json,
)
from .stages import (
    BY_NAME,
    FINETUNE_CHECKPOINT,
    INT8_NAME,
    ONNX_NAME,
    SENSITIVITY_NAME,
    Stage,
    StageStore,
    dependencies,
    final_model_stage,
    plan,
)

FINAL_REPEATS = 100  # timed runs behind a latency target's verdict: short load spikes cannot move the median


def stderr_logger(quiet: bool) -> Callable[[str], None]:
    from rich.console import Console

    console = Console(stderr=True, log_path=False)
    return (lambda msg: None) if quiet else (lambda msg: console.log(msg))


def open_run_folder(out: str | Path, recipe: Recipe, overwrite: bool = False, changing: bool = False) -> StageStore:
    """Prepare `out` for `recipe` (main process only): remove what a killed run left half-written, and
    refuse to mix two different recipes in one folder unless told to (`overwrite` starts afresh;
    `changing` keeps every stage result the change does not invalidate)."""
    root = ensure_writable_dir(out)
    # what a killed run left half-written, and only that: edgeprune's own temporary names, where a run writes
    # (trials and sweep points clean their own folders); never other files in a folder such as `--out .`
    folders = [root, *(d for d in [root / "stages", *root.glob("stages/*")] if d.is_dir())]
    for stale in [p for d in folders for p in d.glob(f".*{TEMP_MARK}*")]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    store = StageStore(root)
    resolved = recipe.model_dump(mode="json")
    recipe_path = root / "recipe.json"
    different = recipe_path.exists() and not same_recipe(read_json(recipe_path), recipe)
    # `edgeprune sensitivity` ran here: a run may build on it (a --max-drop search's folder has no stages either)
    analysis_only = store.done() <= {"sensitivity"} and not (root / "max_drop.json").exists()
    if different and not (overwrite or changing or analysis_only):
        raise EdgePruneError(f"{root} holds a run of a different recipe; choose another --out or pass --overwrite")
    if overwrite:
        store.clear()
    write_json(recipe_path, resolved)
    store.drop_unplanned(recipe)
    return store


class Runner:
    """Runs the stages of one recipe in one folder. Under torchrun every process takes part in the
    collective stages (evaluation, recovery); the main process alone runs the others and writes."""

    def __init__(self, recipe: Recipe, store: StageStore, rt: Runtime, quiet: bool, resume: bool,
                 baseline: nn.Module | None = None):
        self.recipe, self.store, self.rt, self.resume = recipe, store, rt, resume
        self.root = store.root
        self.quiet = quiet or not rt.is_main
        self.log = stderr_logger(self.quiet)
        self.baseline = baseline if baseline is not None else create_model(**recipe.model.model_dump())
        self.spec = self.baseline.edgeprune_spec
        self.detection = self.spec.task == "detect"
        self.models: dict[str, nn.Module] = {}
        self.fingerprints: dict[str, str] = {}  # of the stages run (or found done) in this process
        self.timings: dict[str, dict] = {}  # stage: {"seconds": wall time of its computation, "reused": bool}
        # model.onnx's accuracy and per-image classes on the recipe's dataset, when accuracy_onnx computed them in this
        # process: the INT8 comparison's FP32 side (nothing rewrites model.onnx between the two stages)
        self.onnx_classes: tuple[Accuracy, object] | None = None
        self.history: list | None = None
        self._splits: dict[tuple[str, bool], object] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="edgeprune-")
        self.scratch = Path(self._scratch.name)  # files of this process alone (the baseline's ONNX, candidates)
        self._baseline_onnx: Path | None = None

    # --- what stages share -----------------------------------------------------------------------
    def baseline_onnx(self) -> Path:
        """The unpruned model exported to ONNX once per run (latency search, measurement, profiling)."""
        if self._baseline_onnx is None:
            self._baseline_onnx = export_onnx(self.baseline, self.spec.input_size,
                                              self.scratch / "baseline.onnx", self.recipe.export)
        return self._baseline_onnx

    def split(self, train: bool, data: str | None = None):
        """A split of `data` (default: the recipe's dataset), loaded once per run."""
        key = (data or self.recipe.data.path, train)
        if key not in self._splits:
            self._splits[key] = load_split(key[0], self.spec, train, self.quiet)
        return self._splits[key]

    def detection_data(self, data: str | None = None):
        """The YOLO dataset `data` (default: the recipe's), read and checked once per run."""
        from .detection.data import load_detection_data

        key = (data or self.recipe.data.path, "detect")
        if key not in self._splits:
            self._splits[key] = check_detection_data(load_detection_data(key[0]), self.spec)
        return self._splits[key]

    def eval_set(self, data: str | None = None):
        return even_subset(self.split(False, data), self.recipe.data.eval_images)

    def accuracy(self, model: nn.Module, label: str) -> Accuracy:
        self.log(f"evaluating {label} on {self.recipe.data.path}")
        if self.detection:
            from .detection.metrics import evaluate_model as map_of

            return map_of(model, self.detection_data(), limit=self.recipe.data.eval_images, quiet=self.quiet,
                          desc=f"mAP {label}")
        ds = shard(self.eval_set(), self.rt.rank, self.rt.world_size)
        return evaluate_model(model, loader(ds, self.recipe.data.eval_batch_size, workers=self.recipe.data.workers),
                              self.rt, self.quiet, desc=f"evaluate {label}")

    def model_at(self, stage: str) -> nn.Module:
        """The pruned model as `stage` left it: in memory, or rebuilt from stages/<stage>/."""
        if stage not in self.models:
            self.models[stage] = artifact.load(self.store.folder / stage)
        return self.models[stage]

    def input_model(self, stage: str) -> nn.Module:
        """A copy of the model `stage` starts from (stages that change weights work on their own copy)."""
        return copy.deepcopy(self.model_at(dependencies(BY_NAME[stage], self.recipe)[0]))

    def keep_model(self, stage: str, model: nn.Module, history: list | None = None) -> None:
        self.models[stage] = model
        if self.rt.is_main:
            artifact.save(model, self.pruning_history() if history is None else history, self.store.folder / stage)

    def pruning_history(self) -> list:
        if self.history is None:
            self.history = self.result("prune").history
        return self.history

    def result(self, name: str):
        return from_json(RESULT_TYPES[name], self.store.record(name)["result"])

    def planned(self, name: str) -> bool:
        return BY_NAME[name] in plan(self.recipe)

    def recalibrate(self, model: nn.Module) -> int:
        """Re-estimate `model`'s BatchNorm statistics on training images (in place); the layers reset."""
        opts = self.recipe.recover
        self.log(f"re-calibrating BatchNorm on {opts.calibration_images} training images")
        if self.detection:
            from .detection.train import recalibrate

            return recalibrate(model, self.detection_data(), opts.calibration_images, opts.batch_size,
                               self.recipe.seed, self.quiet)
        return recalibrate_bn(model, self.split(True), opts.calibration_images, opts.batch_size, self.rt.device,
                              self.recipe.seed, self.quiet)

    def train(self, model: nn.Module, epochs: int, tag: str):
        """Fine-tune `model` in place for `epochs` with the recipe's recovery options, distilling from the
        unpruned model when asked; checkpointed each epoch under `tag` (what the fine-tune started from)."""
        opts = self.recipe.recover.model_copy(update={"epochs": epochs})
        teacher = self.baseline if opts.distill else None
        self.log(f"fine-tuning {epochs} epoch(s) on {self.rt.world_size} process(es), "
                 f"{'distilling from the unpruned model' if teacher else 'cross-entropy only'}")
        checkpoint = self.root / FINETUNE_CHECKPOINT
        if self.detection:
            from .detection.train import finetune as finetune_detector

            training = finetune_detector(model, teacher, self.detection_data(), opts, checkpoint, self.resume,
                                         self.recipe.seed, self.quiet, tag=tag,
                                         evaluate=(lambda m: self.accuracy(m, "the EMA model"))
                                         if opts.eval_every_epoch else None, log=self.log)
        else:
            training = finetune(model, teacher, self.split(True), self.eval_set() if opts.eval_every_epoch else None,
                                opts, self.rt, checkpoint, self.resume, self.recipe.seed, self.quiet, tag=tag,
                                log=self.log)
        return training  # the checkpoint stays until the caller has stored its result (`drop_checkpoint`)

    def drop_checkpoint(self) -> None:
        """Remove the fine-tune's checkpoint once the result of the stage (or step) that trained is stored: until
        then an interrupted evaluation resumes the finished fine-tune instead of training it again (main process;
        a barrier follows before any process reads it)."""
        (self.root / FINETUNE_CHECKPOINT).unlink(missing_ok=True)

    # --- running ---------------------------------------------------------------------------------
    def run(self) -> dict[str, object]:
        """Every planned stage, skipping those already done; the results by stage (main process)."""
        planned = plan(self.recipe)
        last_collective = max(i for i, s in enumerate(planned) if s.collective or s.name == "prune")
        final_model = final_model_stage(self.recipe)
        results: dict[str, object] = {}
        for i, stage in enumerate(planned):
            if i > last_collective and not self.rt.is_main:
                break
            if stage.collective or self.rt.is_main:
                results[stage.name] = self.execute(stage)
            if i <= last_collective:
                self.rt.barrier()
            if stage.name == final_model and self.rt.is_main:
                self.publish_model(stage.name)
        return results

    def execute(self, stage: Stage):
        fingerprint = self.fingerprints[stage.name] = self.store.fingerprint(stage, self.recipe)
        done = self.store.fresh_record(stage, fingerprint)
        if done is not None:
            try:
                result = from_json(RESULT_TYPES[stage.name], done["result"])
                self.timings[stage.name] = {"seconds": done.get("seconds"), "reused": True}
                return result
            except ValidationError:  # stored by an edgeprune whose result had other fields: compute it again
                self.log(f"{stage.name}: the stored result predates this edgeprune; computing it again")
        start = time.perf_counter()
        result = COMPUTE[stage.name](self)
        seconds = round(time.perf_counter() - start, 1)
        self.timings[stage.name] = {"seconds": seconds, "reused": False}
        if self.rt.is_main:
            self.store.save(stage, fingerprint, to_json(result), seconds)
            self.drop_checkpoint()
        return result

    def publish_model(self, stage: str) -> None:
        """The run folder's model.safetensors / model.json: the final model stage's files, hard-linked."""
        for name in (artifact.WEIGHTS, artifact.META):
            link_file(self.store.folder / stage / name, self.root / name)

    def close(self) -> None:
        self._scratch.cleanup()


def check_detection_data(data, spec):
    """A YOLO dataset matching the detector, both splits scanned (corrupt images, class ids) up front."""
    from .detection.data import dataset

    if data.nc != spec.num_classes:
        raise EdgePruneError(f"{data.yaml} has {data.nc} classes but {spec.name} outputs {spec.num_classes}; pass "
                             f"--num-classes {data.nc} with --weights none, or the dataset the weights were trained on")
    for split in ("train", "val"):
        dataset(data, split, spec.input_size[-1])
    return data


def check_data_kind(path: str, spec):
    """`path` checked against the model's task: a detector needs a YOLO data.yaml (returned loaded and
    scanned), a classifier anything else (its folders and classes checked; returns None)."""
    from .data import check_classification_data
    from .detection.data import is_detection_data, load_detection_data

    yolo = spec.task == "detect"
    if yolo and not is_detection_data(path):
        raise EdgePruneError(f"{spec.name} is a detector: --data must be a YOLO data.yaml, not {path}")
    if not yolo and is_detection_data(path):
        raise EdgePruneError(f"{path} is a detection dataset; {spec.name} is a classifier (pass a "
                             "YOLO model such as yolov8n.yaml, or an ImageFolder root)")
    if not yolo:
        check_classification_data(path, spec)
        return None
    return check_detection_data(load_detection_data(path), spec)


def check_sensitivity(recipe: Recipe, model: nn.Module) -> None:
    """What a sensitivity allocation needs, checked before anything runs or is written."""
    from .pruning import resolve_unpruned
    from .pruning.sensitivity import check_maskable

    opts = recipe.prune
    if not recipe.data.path:
        raise EdgePruneError("allocation sensitivity scores the layers on data: give --data (or use --allocation "
                             "uniform; in a recipe or with --set: prune.allocation=uniform)")
    if model.edgeprune_spec.task == "detect":
        raise EdgePruneError("allocation sensitivity is for classifiers for now; prune detectors with "
                             "--allocation uniform (in a recipe or with --set: prune.allocation=uniform)")
    if opts.importance in ("taylor", "hessian", "random"):
        raise EdgePruneError(f"allocation sensitivity needs a fixed ranking without gradients; choose --importance "
                             f"l2, l1, bn-scale, lamp or fpgm instead of {opts.importance}")
    example = model.edgeprune_spec.example_input()
    check_maskable(model, example, list(resolve_unpruned(model, example, opts)), opts)


def preflight(recipe: Recipe) -> nn.Module:
    """Check what a run reads before it writes anything: the model and its weights, and its dataset (a
    detector's images and labels; a classifier's folders and classes); returns the unpruned model."""
    from .measure import require_openvino

    opts = recipe.prune
    if opts.latency_runtime == "ov_cpu" and (opts.times_candidates() or opts.max_drop_by == "latency"):
        if not recipe.latency.openvino:
            raise EdgePruneError("prune.latency_runtime ov_cpu times OpenVINO: set latency.openvino true")
        require_openvino()
    model = create_model(**recipe.model.model_dump())
    for path in dict.fromkeys(p for p in (recipe.data.path, recipe.int8.data) if p):
        check_data_kind(path, model.edgeprune_spec)
    if recipe.prune.allocation == "sensitivity":
        check_sensitivity(recipe, model)
    return model


# --- the stages ----------------------------------------------------------------------------------
def _sensitivity(r: Runner) -> Sensitivity:
    """Every prunable group alone, masked at each of prune.sensitivity_ratios: top-1 on an even subset of
    prune.sensitivity_split after BN re-calibration (the same calibration images for every trial). On the
    train split the scored images are other training images than the calibration ones, with the evaluation
    transforms, so the evaluation split plays no part in choosing the pruned model."""
    import torch

    from .pruning import resolve_unpruned
    from .pruning.sensitivity import analyse

    opts, rec = r.recipe.prune, r.recipe.recover
    calibration = [x for x, _ in loader(r.split(True), rec.batch_size, shuffle=True,
                                        limit=opts.sensitivity_calibration_images, seed=r.recipe.seed)]
    scored = (even_subset(unaugmented(r.split(True), r.spec), opts.sensitivity_images,
                          besides=opts.sensitivity_calibration_images) if opts.sensitivity_split == "train" else
              even_subset(r.split(False), opts.sensitivity_images))
    if len(scored) == 0:
        raise EdgePruneError(f"the training split has {len(r.split(True))} images, all of them BatchNorm calibration "
                             "images of the sensitivity analysis: lower prune.sensitivity_calibration_images or set "
                             "prune.sensitivity_split=eval")
    evaluation = list(loader(scored, r.recipe.data.eval_batch_size, workers=r.recipe.data.workers))
    labels = torch.cat([y for _, y in evaluation])
    images = len(labels)

    device = r.rt.device
    fast = channels_last_copy(r.baseline, calibration[0].to(device))  # the trials' forwards run faster
    model, layout = ((fast, torch.channels_last) if fast is not None else
                     (copy.deepcopy(r.baseline).to(device), torch.contiguous_format))

    @torch.no_grad()
    def score(model: nn.Module) -> tuple[float, torch.Tensor]:
        recalibrate_bn_on(model, (x.contiguous(memory_format=layout) for x in calibration), device=device,
                          seed=r.recipe.seed)
        logits = torch.cat([model(x.to(device).contiguous(memory_format=layout)).float().cpu()
                            for x, _ in evaluation])
        return round(100 * float((logits.argmax(1) == labels).float().mean()), 3), logits

    example = r.spec.example_input()
    unpruned = resolve_unpruned(r.baseline, example, opts)
    r.log(f"sensitivity: every prunable group alone at ratios {', '.join(map(str, opts.sensitivity_ratios))} "
          f"({images} images)")
    sens = analyse(model, example.to(device), opts, list(unpruned), score, opts.sensitivity_ratios, quiet=r.quiet)
    sens.images, sens.split = images, opts.sensitivity_split
    write_json(r.root / SENSITIVITY_NAME, sens.to_dict())
    return sens


def _sensitivity_latency(r: Runner) -> Sensitivity:
    """For a latency target: what each point of the analysis saves on prune.latency_runtime, every layer it
    changes timed alone (see `pruning.layer_latency`); the analysis is stored again with the savings."""
    from .pruning.layer_latency import time_savings
    from .pruning.probe import runner

    runtime = r.recipe.prune.latency_runtime
    sens = r.result("sensitivity")
    r.log(f"timing every layer the sensitivity analysis changed, alone, on {runtime}")
    time_savings(r.baseline, r.spec.example_input(), sens, runtime,
                 lambda layer, size, name: runner(layer, size, runtime, r.recipe.latency, r.recipe.export,
                                                  r.scratch / "layers" / f"{name}.onnx"),
                 r.recipe.latency, quiet=r.quiet)
    write_json(r.root / SENSITIVITY_NAME, sens.to_dict())
    return sens


def _one_shot(r: Runner) -> tuple[nn.Module, PruneResult]:
    """The unpruned model pruned to the recipe's target in one step."""
    opts = r.recipe.prune
    r.log("pruning with DepGraph")
    probe = None
    if opts.times_candidates():
        probe = OnnxLatencyProbe(r.baseline, opts.latency_runtime, r.recipe.latency, r.recipe.export,
                                 r.scratch, baseline_onnx=r.baseline_onnx())
        r.log(f"unpruned: {probe.baseline_ms:.2f} ms on {opts.latency_runtime}; " +
              (f"searching for {opts.latency_target_text(probe.baseline_ms)}" if opts.latency_targeted() else
               f"timing channel multiples {', '.join(map(str, opts.round_to_candidates))} (round_to auto)"))
    sens = (None if opts.allocation != "sensitivity" else
            r.result("sensitivity_latency" if r.planned("sensitivity_latency") else "sensitivity"))
    return prune(r.baseline, opts, calibration=_gradient_batches(r), latency_probe=probe, log=r.log,
                 sensitivity=sens)


def _gradient_batches(r: Runner):
    """Training batches for the gradient criteria (taylor, hessian), else None."""
    opts = r.recipe.prune
    if r.recipe.data.path and opts.importance in ("taylor", "hessian"):
        return loader(r.split(True), 32, limit=32 * opts.calibration_batches)
    return None


def _prune_step(r: Runner, model: nn.Module, plan: PruneResult, widths: dict[str, int]) -> tuple[nn.Module, list]:
    """`model` (already pruned by earlier steps) pruned to `widths`, channels ranked on its own weights; the
    layers the one-shot `plan` kept whole stay whole."""
    from .pruning import calibration_grads, check_runs
    from .pruning.importance import GRADIENT_CRITERIA

    opts, example = r.recipe.prune, r.spec.example_input()
    grads = {}
    if opts.importance in GRADIENT_CRITERIA:
        grads, _ = calibration_grads(model, example, opts.importance, _gradient_batches(r), opts.calibration_batches)
    pruned, history = prune_to_widths(model.eval(), example, opts, widths, plan.unpruned, grads)
    with torch.no_grad():
        expected = r.baseline(example).shape
    check_runs(pruned, example, expected)
    pruned.edgeprune_spec = copy.deepcopy(r.spec)
    return pruned.eval(), history


def _steps(r: Runner) -> Schedule:
    """prune.steps = N: the one-shot plan's widths, then steps 1..N-1 (prune k/N of the way, re-calibrate BN,
    fine-tune for the step's share of the epochs). Each finished step is kept in stages/steps/step-K/, so an
    interrupted run resumes after the last one; under torchrun the main process prunes and the others load."""
    n = r.recipe.prune.steps
    shares = epoch_shares(r.recipe.recover.epochs, n)
    folder, fingerprint = r.store.folder / "steps", r.fingerprints["steps"]
    plan_file = folder / "plan.json"
    if r.rt.is_main:
        saved = read_json(plan_file) if plan_file.exists() else None
        if saved is None or saved.get("fingerprint") != fingerprint:  # other inputs: start the schedule afresh
            shutil.rmtree(folder, ignore_errors=True)
            one_shot, result = _one_shot(r)
            result.history = []  # the steps write their own; the plan keeps its target, widths and notes
            write_json(plan_file, {"fingerprint": fingerprint, "plan": to_json(result),
                                   "widths": layer_widths(one_shot)})
    r.rt.barrier()
    saved = read_json(plan_file)
    planned, final = from_json(PruneResult, saved["plan"]), saved["widths"]
    start = layer_widths(r.baseline)
    model, history, done = copy.deepcopy(r.baseline), [], []
    for k in range(n - 1, 0, -1):  # resume after the last finished step
        record = folder / f"step-{k}.json"
        if record.exists():
            model = artifact.load(folder / f"step-{k}")
            history = read_json(folder / f"step-{k}" / artifact.META)["pruning_history"]
            done = [from_json(PruneStep, d) for d in read_json(record)["steps"]]
            r.log(f"resuming the pruning schedule after step {k} of {n}")
            break
    example = r.spec.example_input()
    for k in range(len(done) + 1, n):
        t0 = time.time()
        r.log(f"pruning step {k} of {n}")
        work = folder / f"step-{k}-pruned"
        if r.rt.is_main:
            pruned, step_history = _prune_step(r, model, planned, step_widths(start, final, k, n, planned.round_to))
            artifact.save(pruned, history + step_history, work)
        r.rt.barrier()
        model = artifact.load(work)
        history = read_json(work / artifact.META)["pruning_history"]
        at_prune = r.accuracy(model, f"step {k}/{n}, pruned")
        r.recalibrate(model)
        at_recal = r.accuracy(model, f"step {k}/{n}, re-calibrated")
        at_tuned = None
        if shares[k - 1]:
            r.train(model, shares[k - 1], tag=f"{fingerprint}-step{k}")
            at_tuned = r.accuracy(model, f"step {k}/{n}, fine-tuned")
        done.append(PruneStep(step=k, macs=count_macs(model, example), params=sum(p.numel() for p in
                              model.parameters()), epochs=shares[k - 1], pruned=at_prune, recalibrated=at_recal,
                              finetuned=at_tuned, seconds=round(time.time() - t0, 1)))
        if r.rt.is_main:
            artifact.save(model, history, folder / f"step-{k}")
            write_json(folder / f"step-{k}.json", {"steps": [to_json(d) for d in done]})
            r.drop_checkpoint()
            shutil.rmtree(work, ignore_errors=True)
            (folder / f"step-{k - 1}.json").unlink(missing_ok=True)  # step k resumes everything step k-1 did
            shutil.rmtree(folder / f"step-{k - 1}", ignore_errors=True)
        r.rt.barrier()
    r.keep_model("steps", model.eval(), history)
    return Schedule(plan=planned, widths=final, epochs=shares, steps=done, history=history)


def _prune(r: Runner) -> PruneResult:
    if not r.planned("steps"):
        pruned, result = _one_shot(r)
    else:  # the last step of the schedule: from the steps' model to the planned widths
        schedule: Schedule = r.result("steps")
        n = len(schedule.epochs)
        r.log(f"pruning step {n} of {n}")
        pruned, history = _prune_step(r, r.model_at("steps"), schedule.plan, schedule.widths)
        result = copy.deepcopy(schedule.plan)
        result.history, result.steps = schedule.history + [list(h) for h in history], n
        result.notes.append(f"pruned in {n} steps to the widths of this one-shot plan, each step followed by BN "
                            f"re-calibration and fine-tuning ({', '.join(map(str, schedule.epochs))} epochs)")
    r.history = result.history
    r.keep_model("prune", pruned)
    return result


def _accuracy_baseline(r: Runner) -> Accuracy:
    acc = r.accuracy(r.baseline, "the baseline")
    if r.detection:
        return acc
    chance = 100 / r.spec.num_classes
    if r.recipe.model.weights != "none" and acc.top1 < 2 * chance:
        r.log(f"[bold red]warning:[/] the unpruned model scores {acc.top1:.1f}% (chance is {chance:.1f}%): do the "
              "dataset's class folders match the model's classes, in order?")
    return acc


def _accuracy_pruned(r: Runner) -> Accuracy:
    return r.accuracy(r.model_at("prune"), "the pruned model")


def _recalibrated(r: Runner) -> Recalibration:
    model = r.input_model("recalibrated")
    layers = r.recalibrate(model)
    r.keep_model("recalibrated", model)
    return Recalibration(accuracy=r.accuracy(model, "the re-calibrated model"), bn_layers=layers)


def _finetuned(r: Runner) -> Finetuning:
    model = r.input_model("finetuned")
    epochs = r.recipe.recover.epochs
    if r.planned("steps"):  # the last step's share of the budget
        epochs = r.result("steps").epochs[-1]
    training = r.train(model, epochs, tag=r.fingerprints["finetuned"])
    r.keep_model("finetuned", model)
    return Finetuning(accuracy=r.accuracy(model, "the fine-tuned model"), training=training)


def _export(r: Runner) -> ExportResult:
    r.log("exporting to ONNX and checking parity")
    model, opts = r.model_at(final_model_stage(r.recipe)), r.recipe.export
    fallback: list[str] = []
    path = export_onnx(model, r.spec.input_size, r.root / ONNX_NAME, opts, on_fallback=fallback.append)
    openvino = (check_parity(model, path, r.spec.input_size, opts, runtime="ov_cpu")
                if r.recipe.latency.openvino and openvino_available() else None)
    result = ExportResult(parity=check_parity(model, path, r.spec.input_size, opts), opset=file_opset(path),
                          exporter="dynamo" if opts.dynamo or fallback else "torchscript", onnx_bytes=onnx_bytes(path),
                          fallback_reason=fallback[0] if fallback else None, openvino_parity=openvino)
    for note in report.export_notes(result, opts.opset):
        r.log(note)
    return result


def _accuracy_onnx(r: Runner) -> Accuracy:
    r.log("evaluating the exported model with ONNX Runtime")
    if r.detection:
        from .detection.metrics import evaluate_onnx as map_of_onnx

        return map_of_onnx(r.root / ONNX_NAME, r.detection_data(), r.spec.input_size[-1], r.recipe.latency.threads,
                           limit=r.recipe.data.eval_images, quiet=r.quiet)
    r.onnx_classes = evaluate_onnx_predictions(r.root / ONNX_NAME, loader(r.eval_set(), r.recipe.data.eval_batch_size),
                                               r.recipe.latency.threads, r.quiet)
    return r.onnx_classes[0]


def _int8(r: Runner) -> Int8Result:
    """Quantize model.onnx to model.int8.onnx and compare the two on the evaluation split."""
    opts, data = r.recipe.int8, r.recipe.int8_data
    r.log(f"quantizing to INT8 (calibration on {opts.calibration_images} training images of {data})")
    fp32, int8 = r.root / ONNX_NAME, r.root / INT8_NAME
    if r.detection:
        from .detection import metrics

        det = r.detection_data(data)
        size = r.spec.input_size[-1]
        calibration = metrics.calibration_loader(det, size, opts.calibration_images, r.recipe.seed)
        quantize_int8(fp32, int8, calibration, opts, exclude=metrics.head_nodes(fp32), symbolic_shapes=False)
        compared = compare_int8(fp32, int8, lambda path: (metrics.evaluate_onnx(
            path, det, size, r.recipe.latency.threads, limit=r.recipe.data.eval_images, quiet=r.quiet), None),
            r.spec.input_size, r.recipe.latency, r.quiet)
    else:
        train = r.split(True, data)
        calibration = calibration_data(train, r.spec, opts.calibration_images)
        quantize_int8(fp32, int8, calibration, opts)
        batches = loader(r.eval_set(data), r.recipe.data.eval_batch_size)
        evaluate = top1_of(batches, r.recipe.latency.threads, r.quiet)
        known = r.onnx_classes if data == r.recipe.data.path else None  # model.onnx, on the same images

        def evaluate_once(path: Path):
            return known if known is not None and path == fp32 else evaluate(path)
        compared = compare_int8(fp32, int8, evaluate_once, r.spec.input_size, r.recipe.latency, r.quiet)
    return from_json(Int8Result, {**compared, "calibration_images": len(calibration.dataset),
                                  "method": opts.method, "per_channel": opts.per_channel,
                                  "reduce_range": reduce_range(opts)})


def _measure(r: Runner) -> Measured:
    r.log("measuring the baseline and the pruned model side by side")
    latency = r.recipe.latency
    if r.recipe.prune.latency_targeted():  # the verdict on the target: a median of many runs
        latency = latency.model_copy(update={"repeats": max(latency.repeats, FINAL_REPEATS)})
    pruned = r.model_at(final_model_stage(r.recipe))
    timed = measure({"baseline": (r.baseline, r.baseline_onnx()), "pruned": (pruned, r.root / ONNX_NAME)},
                    r.spec.input_size, latency, r.quiet)
    return Measured(baseline=timed["baseline"], pruned=timed["pruned"])


def _diagnose(r: Runner) -> Diagnosis:
    r.log("profiling every layer of both models (ONNX Runtime and PyTorch)")
    measured: Measured = r.result("measure")
    before, after = measured.baseline.latency_ms, measured.pruned.latency_ms
    speedup = {k: v / after[k] for k, v in before.items() if after.get(k)}
    return diagnose(r.baseline, r.baseline_onnx(), r.model_at(final_model_stage(r.recipe)), r.root / ONNX_NAME,
                    r.recipe.latency, speedup)


COMPUTE: dict[str, Callable[[Runner], object]] = {
    "sensitivity": _sensitivity, "sensitivity_latency": _sensitivity_latency,
    "steps": _steps, "prune": _prune, "accuracy_baseline": _accuracy_baseline,
    "accuracy_pruned": _accuracy_pruned,
    "recalibrated": _recalibrated, "finetuned": _finetuned, "export": _export, "accuracy_onnx": _accuracy_onnx,
    "int8": _int8, "measure": _measure, "diagnose": _diagnose,
}
# What each stage's result is, read off its function's return annotation.
RESULT_TYPES: dict[str, type] = {name: get_type_hints(fn)["return"] for name, fn in COMPUTE.items()}
assert set(COMPUTE) == set(BY_NAME)


# --- the public entry points ---------------------------------------------------------------------
def run(recipe: Recipe, out: str | Path, quiet: bool = False, overwrite: bool = False,
        resume: bool = False) -> dict | None:
    """Run every stage of `recipe` in the folder `out`; returns the report (also in out/report.json).

    Under torchrun every process joins evaluation and fine-tuning; only rank 0 prunes, writes files,
    exports and measures, and only rank 0 returns the report (the others return None).

    With an accuracy budget (`prune.max_drop`), `out` holds one run per trial (`edgeprune.budget`) and the
    chosen one's report and files.
    """
    if recipe.prune.max_drop is not None:
        from .budget import search

        return search(recipe, out, quiet=quiet, overwrite=overwrite, resume=resume)
    return run_stages(recipe, out, quiet=quiet, overwrite=overwrite, resume=resume)


def run_stages(recipe: Recipe, out: str | Path, quiet: bool, overwrite: bool = False, resume: bool = False,
               changing: bool = False) -> dict | None:
    """Every stage of `recipe` in the run folder `out` (`run` without the accuracy-budget search);
    `changing` keeps the stored results a changed recipe does not invalidate."""
    rt = runtime()
    seed_everything(recipe.seed)
    baseline = preflight(recipe)
    if rt.distributed and baseline.edgeprune_spec.task == "detect":
        raise EdgePruneError("detectors are evaluated and fine-tuned in one process for now; run without torchrun")
    store = open_run_folder(out, recipe, overwrite, changing) if rt.is_main else StageStore(Path(out))
    rt.barrier()
    runner = Runner(recipe, store, rt, quiet, resume, baseline)
    try:
        results = runner.run()
    finally:
        runner.close()
    if not rt.is_main:
        return None
    final = report.build(recipe, results, environment(), runner.timings)
    write_report(store.root, final)
    return final


def sensitivity_run(recipe: Recipe, out: str | Path, quiet: bool = False, overwrite: bool = False) -> dict:
    """The sensitivity analysis of `recipe`'s model alone, in the run folder `out` (out/sensitivity.json);
    a later `run` of the recipe with allocation sensitivity in the same folder reuses it."""
    recipe = apply_overrides(recipe, {"prune.allocation": "sensitivity"})
    if runtime().distributed:
        raise EdgePruneError("run edgeprune sensitivity in one process (without torchrun)")
    seed_everything(recipe.seed)
    baseline = preflight(recipe)
    store = open_run_folder(out, recipe, overwrite)  # a folder holding another finished run is refused
    runner = Runner(recipe, store, runtime(), quiet, resume=False, baseline=baseline)
    try:
        return to_json(runner.execute(BY_NAME["sensitivity"]))
    finally:
        runner.close()


def share_sensitivity(source: Path, dest: Path) -> bool:
    """Copy the sensitivity analysis of run folder `source` (sensitivity.json and its stage records) into run
    folder `dest` when `dest` holds none, so that a run there reuses it instead of repeating it (a sweep's
    points differ in their target only). The stage fingerprints still decide: a run whose recipe reads other
    analysis settings runs its own. Returns whether anything was copied."""
    names = [n for n in ("sensitivity", "sensitivity_latency") if (source / "stages" / f"{n}.json").is_file()]
    if "sensitivity" not in names or not (source / SENSITIVITY_NAME).is_file() or \
            (dest / "stages" / "sensitivity.json").exists():
        return False
    for name in names:
        write_json(dest / "stages" / f"{name}.json", read_json(source / "stages" / f"{name}.json"))
    write_json(dest / SENSITIVITY_NAME, read_json(source / SENSITIVITY_NAME))
    return True


def write_report(root: Path, final: dict) -> None:
    """report.json, report.md and the self-contained report.html of a run folder."""
    from .report_html import page

    write_json(root / "report.json", final)
    write_text(root / "report.md", report.markdown(final))
    write_text(root / "report.html", page(final))


def read_run(root: Path) -> Recipe:
    """The recipe of the finished prune run in `root` (a clear error when `root` holds none)."""
    if not (root / "recipe.json").is_file() or not (root / artifact.META).is_file():
        raise EdgePruneError(f"{root} holds no finished prune run (recipe.json and {artifact.META}); "
                             "run edgeprune prune or run first")
    return build(Recipe, read_json(root / "recipe.json"))


def export_run(out: str | Path, opset: int | None = None, simplify: bool | None = None, int8: bool = False,
               data: str | None = None, quiet: bool = True) -> dict:
    """Re-export the pruned model of a finished run (for example at another opset), with `int8` also
    quantized (calibrated on `data`, default the run's dataset). Every stage computed from the old
    export (accuracy through ONNX Runtime, INT8, measurement, diagnostics) is computed again, so the
    report describes the new files; returns the report."""
    from .budget import chosen_trial, publish

    root = Path(out)
    trial = chosen_trial(root)  # a --max-drop search: its chosen trial is the run, published again afterwards
    recipe = read_run(trial or root)
    overrides: dict = {k: v for k, v in (("export.opset", opset), ("export.simplify", simplify)) if v is not None}
    if int8:
        if not (data or recipe.int8_data):
            raise EdgePruneError("--int8 needs --data: INT8 calibration reads a few hundred training images")
        overrides["int8.enabled"] = True
        if data:
            overrides["int8.data"] = data
    final = run_stages(apply_overrides(recipe, overrides), trial or root, quiet, changing=True)
    assert final is not None  # export runs in one process
    return final if trial is None else publish(root, trial, final)


def profile_model(model: nn.Module, recipe: Recipe, quiet: bool = True):
    """Params, MACs, sizes and latency of one model (exported to a temporary ONNX file)."""
    with tempfile.TemporaryDirectory(prefix="edgeprune-") as tmp:
        size = model.edgeprune_spec.input_size
        path = export_onnx(model, size, Path(tmp) / "model.onnx", recipe.export)
        return measure({"model": (model, path)}, size, recipe.latency, quiet)["model"]
