"""The typed recipe: YAML + CLI overrides, validated once, then handed to the stages."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EdgePruneError

Importance = Literal["l1", "l2", "bn-scale", "taylor", "hessian", "lamp", "fpgm", "random"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name: str = "cifar_resnet56"
    weights: str = "default"
    num_classes: int | None = Field(default=None, gt=0)
    imgsz: int | None = Field(default=None, ge=32, description="YOLO detectors: the square input size (default: "
                              "the checkpoint's training size, else 640)")
    trust_pickle: bool = Field(default=False, description="load an Ultralytics .pt checkpoint, a pickle that can "
                               "run code: only for files from a source you trust")
    model_args: dict = Field(default_factory=dict, description="custom models (FILE.py:NAME or "
                             "package.module:NAME): keyword arguments of NAME")
    input_size: tuple[int, int, int] | None = Field(default=None, description="timm and custom models: the input "
                                                    "(C, H, W); default timm's, else 3x224x224")


SPIN_BLOCK = 10  # with spinning ONNX Runtime workers: at least this many timed runs per turn
SPIN_SETTLE_S = 0.15  # measured here: a session's workers spin on for 50-100 ms after its last run


class LatencyOptions(_Strict):
    threads: int = Field(default=2, ge=1)
    warmup: int = Field(default=5, ge=0)
    repeats: int = Field(default=30, ge=1, description="timed runs of each model; the median and p90 are reported")
    turn_runs: int = Field(
        default=10, ge=1, description="models are timed in turns, so load on a shared machine hits them alike; each "
        "turn times this many runs of one model back to back, after settle_runs untimed ones, as the model runs "
        "when it is called frame after frame and as the field's benchmark tools time it. 1 (with settle_runs 0): "
        "single runs in turn, each right after another model's, with its weights out of cache (edgeprune's timing "
        "before measure stage version 2); see ort_spinning for ONNX Runtime's turns when its workers spin")
    settle_runs: int = Field(default=5, ge=0, description="untimed runs at the start of each turn, which bring the "
                             "model's weights back into cache after the other models' turns")
    batch_size: int = Field(default=1, ge=1)
    cuda: bool = True  # also measure on a GPU when one exists
    ort_spinning: bool = Field(
        default=False, description="time ONNX Runtime with its worker threads busy-waiting between runs (its "
        "own default: faster on idle cores, erratic when anything else wants them); each turn's untimed "
        f"runs then last at least {SPIN_SETTLE_S:g} s, while the previous model's workers stop, and it times at "
        f"least {SPIN_BLOCK} runs. false: workers busy-wait ort_spin_us, then sleep")
    ort_spin_us: int = Field(
        default=20, ge=0, description="without ort_spinning: microseconds ONNX Runtime's workers busy-wait for "
        "work before they sleep (session.intra_op.spin_duration_us). They stay awake between a run's operators, as "
        "with ONNX Runtime's default, and sleep within a fraction of a millisecond after the run, so models timed in "
        "turns do not slow each other. 0: they sleep as soon as they are idle, and every operator pays for waking "
        "them (edgeprune's timing before 2026-12-01)")
    openvino: bool = Field(default=True, description="also time the exported model on OpenVINO (ov_cpu) and check "
                           "its parity there, when OpenVINO is installed (pip install -e '.[openvino]')")
    per_layer: bool = Field(default=True, description="profile every layer (ONNX Runtime and PyTorch) for the "
                            "'why isn't it faster?' diagnostics")


TARGETS = ("ratio", "macs_reduction", "target_latency_ms", "target_speedup", "max_drop")


class PruneOptions(_Strict):
    ratio: float | None = Field(default=None, description="channel ratio removed per layer, in (0, 1)")
    macs_reduction: float | None = Field(
        default=None, description="fraction of MACs to remove, in (0, 1); 0.5 halves the MACs")
    target_latency_ms: float | None = Field(
        default=None, gt=0, description="prune until the exported model runs in at most this many ms on "
        "latency_runtime (measured, with latency.threads)")
    target_speedup: float | None = Field(
        default=None, gt=1, description="prune until the exported model runs at least this many times faster than "
        "the unpruned one on latency_runtime, both timed side by side in the same process: a relative target, which "
        "holds where a load on a shared machine moves every reading in ms")
    max_drop: float | None = Field(
        default=None, gt=0, description="accuracy budget: the most pruned model (in MACs or in measured latency, "
        "see max_drop_by) whose recovered top-1 (mAP50-95 for detectors) stays within this many points of the "
        "unpruned model's; every trial is a full prune-and-recover run")
    max_drop_by: Literal["macs", "latency"] = Field(
        default="macs", description="max_drop: search the MACs reduction, or the latency on latency_runtime")
    max_drop_trials: int = Field(default=5, ge=1, le=20, description="max_drop: prune-and-recover trials at most")
    latency_runtime: Literal["ort_cpu", "torch_cpu", "ov_cpu"] = Field(
        default="ort_cpu", description="the runtime latency targets and budgets are measured on: ONNX Runtime, "
        "PyTorch eager, or OpenVINO (needs the openvino extra); all on the CPU")
    latency_margin: float = Field(default=0.1, ge=0, lt=0.5, description="the search aims this fraction below "
                                  "the target, so that re-measuring on a noisy machine stays under it")
    round_to_candidates: list[int] = Field(
        default_factory=lambda: [1, 8, 16, 32], description="round_to auto: the channel multiples tried (1: none); "
        "with a latency target the one keeping the most MACs within it wins, otherwise the fastest (see round_to)")
    importance: Importance = "l2"
    allocation: Literal["uniform", "global", "sensitivity"] = Field(
        default="uniform", description="how the target is spread over the layers: one ratio for every layer "
        "(uniform), one importance ranking over all of them (global), or per-group ratios from a sensitivity "
        "analysis on the data (sensitivity: the least predicted accuracy loss for the target's MACs, or for a latency "
        "target its milliseconds, each group's layers timed alone on latency_runtime)")
    global_pruning: bool = Field(default=False, description="the same as allocation: global (kept for old recipes)")
    sensitivity_ratios: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75], min_length=1,
        description="allocation sensitivity: the ratios each group is scored at, alone (the allocation "
        "interpolates between them)")
    sensitivity_images: int = Field(default=256, ge=1, description="allocation sensitivity: images per score (an "
                                    "even subset of sensitivity_split)")
    sensitivity_split: Literal["train", "eval"] = Field(
        default="train", description="allocation sensitivity: the images it scores on: training images (evaluation "
        "transforms) none of the trials re-calibrates on, so the split that reports accuracy plays no part in "
        "choosing the pruned model (train); or the evaluation split itself (eval)")
    sensitivity_calibration_images: int = Field(default=128, ge=1, description="allocation sensitivity: training "
                                                "images each trial re-calibrates BatchNorm on (the same for all)")
    round_to: int | Literal["auto"] | None = Field(
        default=None, description="keep each pruned layer's channel count a multiple of this (1 or null: any "
        "count); auto: prune at each of round_to_candidates, time them on latency_runtime and keep the fastest "
        "(of those within 3% of it, the one keeping the most MACs; a multiple only when it is 3% faster than the "
        "smallest candidate that meets the target, normally 1; the default in recipes and on the command line)")
    steps: int = Field(default=1, ge=1, le=50, description="prune in this many steps, each followed by BN "
                       "re-calibration and its share of recover.epochs (distilled); the last step lands on the "
                       "one-shot plan's widths")
    max_layer_ratio: float = Field(default=1.0, gt=0, le=1)
    ignore: list[str] = Field(default_factory=list, description="extra layer names (glob) never pruned")
    calibration_batches: int = Field(default=4, ge=1, description="batches for taylor/hessian gradients")
    tolerance: float = Field(default=0.01, gt=0, lt=1, description="relative tolerance on a MACs target")
    trace_memory_gb: float | None = Field(
        default=None, gt=0, description="stop DepGraph tracing once it grows the process's memory by more "
        "than this many GB (default: 80% of the memory available when tracing starts)")
    trace_timeout_s: float | None = Field(
        default=None, gt=0, description="stop DepGraph tracing (graph build, or pruner build and step) "
        "after this many seconds (default: no limit)")

    @field_validator("ratio", "macs_reduction")
    @classmethod
    def _open_unit(cls, v):
        if v is not None and not 0 < v < 1:
            raise ValueError(f"must be between 0 and 1 (exclusive), got {v}")
        return v

    @field_validator("round_to")
    @classmethod
    def _multiple(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be a positive channel multiple, 'auto' or null, got {v}")
        return None if v == 1 else v

    @field_validator("round_to_candidates")
    @classmethod
    def _candidates(cls, v):
        if any(m < 1 for m in v):
            raise ValueError(f"every channel multiple must be at least 1, got {v}")
        return sorted(set(v))

    def latency_targeted(self) -> bool:
        """A target in measured time: milliseconds or a speed-up."""
        return self.target_latency_ms is not None or self.target_speedup is not None

    def times_candidates(self) -> bool:
        """Whether pruning exports candidate models and times them on latency_runtime: for a latency target, and
        for round_to auto (except with a sensitivity allocation, whose curves are scored at unrounded widths)."""
        return self.latency_targeted() or (self.round_to == "auto" and self.allocation != "sensitivity")

    def latency_goal_ms(self, baseline_ms: float) -> float:
        """The latency target in ms: target_latency_ms, or the unpruned model's `baseline_ms` over target_speedup."""
        return self.target_latency_ms if self.target_latency_ms is not None else baseline_ms / self.target_speedup

    def latency_target_text(self, baseline_ms: float) -> str:
        """The target as the user gave it, in words ("1.5x faster (0.71 ms)" or "0.71 ms")."""
        ms = self.latency_goal_ms(baseline_ms)
        return f"{ms:.4g} ms" if self.target_speedup is None else f"{self.target_speedup:g}x faster ({ms:.4g} ms)"

    def fixed_round_to(self) -> int | None:
        """round_to as a number (None: no rounding); `auto` is only resolved by measuring, so it reads as None."""
        return None if self.round_to == "auto" else self.round_to

    @field_validator("sensitivity_ratios")
    @classmethod
    def _ratios(cls, v):
        if any(not 0 < r < 1 for r in v):
            raise ValueError(f"every ratio must be between 0 and 1 (exclusive), got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _one_target(self):
        if self.global_pruning and self.allocation == "sensitivity":
            raise ValueError("global_pruning and allocation sensitivity exclude each other; give allocation alone")
        if self.global_pruning and self.allocation == "uniform":
            self.allocation = "global"
        self.global_pruning = self.allocation == "global"
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(TARGETS)}, not "
                             f"{' and '.join(given)}")
        if not given:
            self.ratio = 0.5
        return self


class RecipePruneOptions(PruneOptions):
    """A recipe's pruning options: as PruneOptions, but channel rounding is measured unless a recipe or
    --round-to says otherwise."""

    round_to: int | Literal["auto"] | None = Field(
        default="auto", description=PruneOptions.model_fields["round_to"].description)


class ExportOptions(_Strict):
    opset: int = Field(default=17, ge=11)
    simplify: bool = True
    dynamo: bool = False  # the TorchScript exporter: 4x faster here and writes a single file
    parity_batch: int = Field(default=8, ge=1)
    parity_atol: float = Field(default=1e-4, gt=0)
    parity_rtol: float = Field(default=1e-4, ge=0)


class Int8Options(_Strict):
    enabled: bool = Field(default=False, description="also write model.int8.onnx (needs data for calibration)")
    calibration_images: int = Field(default=256, ge=1, description="training images the activation ranges come from")
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = Field(default=True, description="one weight scale per output channel")
    reduce_range: bool | None = Field(
        default=None, description="7-bit weights; None: on where the CPU lacks VNNI (x86 without AVX512-VNNI or "
        "AVX-VNNI), whose u8s8 kernels saturate on full-range 8-bit weights")
    data: str | None = Field(default=None, description="dataset for calibration and INT8 evaluation "
                             "(default: data.path)")


class DataOptions(_Strict):
    path: str | None = Field(default=None, description="cifar10, an ImageFolder root with train/ and val/, or "
                             "(YOLO detectors) an Ultralytics data.yaml")
    eval_images: int | None = Field(default=None, ge=1, description="evaluate on an even subset (quick runs)")
    eval_batch_size: int = Field(default=500, ge=1)
    workers: int = Field(default=0, ge=0)


class RecoverOptions(_Strict):
    recalibrate: bool = True
    calibration_images: int = Field(default=1024, ge=1, description="training images for BN re-calibration")
    epochs: int = Field(default=1, ge=0, description="fine-tuning epochs (0: none)")
    train_images: int | None = Field(default=None, ge=1, description="images per epoch (default: all)")
    batch_size: int = Field(default=128, ge=1, description="global batch, split across torchrun processes")
    eval_batch_size: int = Field(default=500, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.02, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup: float = Field(default=0.15, ge=0, lt=1, description="fraction of steps warming up before cosine")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    distill: bool = Field(default=True, description="distil from the unpruned model")
    distill_alpha: float = Field(default=0.7, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(default=4.0, gt=0)
    distill_gain: float = Field(default=1.0, gt=0, description="detectors: scale of the distillation term "
                                "against Ultralytics' detection loss")
    close_mosaic: int = Field(default=2, ge=0, description="detectors: last epochs trained without mosaic "
                              "augmentation")
    amp: bool = Field(default=True, description="mixed precision fine-tuning (bf16 autocast) where it is faster: "
                      "on CPUs with native bf16 (AVX512-BF16 or AMX) a fine-tune of 100 steps or more first times its "
                      "own training step in bf16 and in FP32 and keeps bf16 only when it is 5% faster (report.json: "
                      "finetuned.precision_step_s; a shorter one runs bf16 there untimed); for classifiers on CUDA "
                      "bf16 (fp16 with loss scaling where bf16 is missing); FP32 elsewhere, and for re-calibration, "
                      "evaluation and export everywhere; detectors keep their loss, distillation and EMA in FP32 "
                      "(measured on 2 cores: bf16 fine-tuning 1.5-1.7x faster than FP32 on an Intel Xeon with AMX "
                      "and an AMD EPYC with AVX512-BF16, 0.83x on an Intel Xeon with AVX512-BF16 but no AMX)")
    channels_last: bool = Field(default=True, description="fine-tune (student and teacher) in the "
                                "channels-last memory layout, which oneDNN and cuDNN convolutions run faster "
                                "(measured in FP32 on 2 cores of an AMD EPYC: 1.14-1.20x faster fine-tuning)")
    fold_teacher: bool = Field(default=True, description="classifiers: distil from a copy of the unpruned model "
                               "with each BatchNorm that directly follows a convolution folded into it (torch.fx; "
                               "the teacher never trains), which runs its forward faster; a model torch.fx cannot "
                               "trace, or whose folded copy's outputs differ, is used as it is")
    packed_batchnorm: bool = Field(default=True, description="channels-last on AVX-512 CPUs: train each "
                                   "BatchNorm whose width is not a multiple of 16 through edgeprune's packed batch "
                                   "norm (the same arithmetic; 1.2-4x faster than PyTorch's at 4-11 channels, "
                                   "bench/batchnorm_layout.py); false: PyTorch's own")
    compile: bool | Literal["auto"] = Field(
        default="auto", description="classifiers in one process: run the student's training forward and backward "
        "through torch.compile (Inductor fuses the batch norm, ReLU and residual work that pruning inside the "
        "blocks leaves at full width). auto: a fine-tune of 1000 steps or more compiles (about a minute the first "
        "time, then cached) and times the compiled step against the eager one side by side, keeping it only when "
        "it is 5% faster (report.json: finetuned.compile_step_s); true: compile whatever the length, timed but "
        "kept; false: never. A machine that cannot compile (no C++ compiler), or a model Dynamo cannot trace, "
        "fine-tunes eagerly and says why; a resumed fine-tune keeps its checkpoint's choice")
    eval_every_epoch: bool = Field(default=False, description="evaluate after every epoch, not only the last")
    workers: int = Field(default=0, ge=0)


class Recipe(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    prune: RecipePruneOptions = Field(default_factory=RecipePruneOptions)
    export: ExportOptions = Field(default_factory=ExportOptions)
    int8: Int8Options = Field(default_factory=Int8Options)
    latency: LatencyOptions = Field(default_factory=LatencyOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    recover: RecoverOptions = Field(default_factory=RecoverOptions)
    seed: int = 0

    @property
    def int8_data(self) -> str | None:
        """The dataset INT8 calibrates and is evaluated on."""
        return self.int8.data or self.data.path

    @model_validator(mode="after")
    def _int8_needs_data(self):
        if self.int8.enabled and not self.int8_data:
            raise ValueError("INT8 calibration needs a dataset: set data.path (--data)")
        if self.prune.max_drop is not None and not self.data.path:
            raise ValueError("max_drop compares recovered accuracy with the unpruned model's: set data.path (--data)")
        if self.prune.steps > 1 and not self.data.path:
            raise ValueError("prune.steps > 1 re-calibrates and fine-tunes between steps: set data.path (--data)")
        return self


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    return f"{where}: {first['msg']}"


def build(cls, data: dict):
    """Validate `data` as `cls`; a mistake becomes one clear line."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise EdgePruneError(f"invalid {cls.__name__} option {_one_line(err)}") from None


def same_recipe(stored: dict, recipe: Recipe) -> bool:
    """Whether a run folder's recipe.json describes `recipe`, read through today's Recipe: a field added since
    the folder was written takes its default there, so the folder does not read as another recipe's."""
    try:
        return build(Recipe, stored).model_dump(mode="json") == recipe.model_dump(mode="json")
    except EdgePruneError:  # a field since removed or renamed: another recipe
        return False


DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"
DETECTION_RECIPE = Path(__file__).parent / "recipes" / "yolov8n-cifar10det.yaml"  # also the detectors' defaults


def load_recipe(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Recipe:
    """A YAML recipe (the built-in default when `path` is None), with `overrides` such as
    {"prune.ratio": 0.7} applied on top."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if not path.is_file():
        raise EdgePruneError(f"recipe {path} does not exist; pass a YAML file or no recipe for the default")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EdgePruneError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise EdgePruneError(f"recipe {path} is not a YAML text file; a checkpoint goes to --weights (or the "
                             "recipe's model.weights)") from None
    if not isinstance(data, dict):
        raise EdgePruneError(f"recipe {path} must be a mapping of sections (model, data, prune, recover, "
                             "export, int8, latency)")
    return apply_overrides(build(Recipe, data), overrides or {})


def apply_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """A new recipe with dotted overrides ({"prune.ratio": 0.7}) applied and validated."""
    if not overrides:
        return recipe
    merged = recipe.model_dump()
    sections = [k for k, v in merged.items() if isinstance(v, dict)]
    fields = [k for k in merged if k not in sections]
    for dotted, value in overrides.items():
        *path, key = dotted.split(".")
        if not path and key in sections:
            raise EdgePruneError(f"{dotted!r} names a whole section; give one of its fields, e.g. {key}.<field>=value")
        if path and path[0] not in sections:
            raise EdgePruneError(f"unknown recipe section {path[0]!r} in {dotted!r}; sections are "
                                 f"{', '.join(sections)} (top-level fields: {', '.join(fields)})")
        node = merged
        for i, part in enumerate(path):  # a nested mapping (model.model_args.width) is created when unset
            if node.get(part) is None and i > 0:
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise EdgePruneError(f"{'.'.join(path[:i + 1])} is not a section or mapping in {dotted!r}")
            node = node[part]
        node[key] = value
    if overrides.get("prune.allocation") is not None and "prune.global_pruning" not in overrides:
        merged["prune"]["global_pruning"] = overrides["prune.allocation"] == "global"  # the alias follows
    elif overrides.get("prune.global_pruning") is not None and "prune.allocation" not in overrides:
        on, was = overrides["prune.global_pruning"], merged["prune"].get("allocation", "uniform")
        merged["prune"]["allocation"] = "global" if on else ("uniform" if was == "global" else was)
    chosen = [t for t in TARGETS if overrides.get(f"prune.{t}") is not None]
    if len(chosen) == 1:  # a target given on top of a recipe replaces the recipe's target
        merged["prune"].update({t: None for t in TARGETS if t != chosen[0]})
    return build(Recipe, merged)
