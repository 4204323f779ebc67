"""Recovering accuracy after pruning: BatchNorm re-calibration, then fine-tuning with knowledge
distillation from the unpruned model, on one process or many (torchrun, DistributedDataParallel).

Fine-tuning writes a checkpoint after every epoch; resuming from it ends where an uninterrupted run
would, because each epoch's shuffling and augmentation are seeded from (seed, epoch).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .accuracy import channels_last_copy, evaluate_model
from .batchnorm import use_packed_batch_norm
from .data import loader, shard
from .distributed import Runtime
from .environment import cpu_has_bf16
from .errors import EdgePruneError, first_line
from .fsio import atomic_path
from .quiet import quiet_logger
from .recipe import RecoverOptions


def recalibrate_bn(model: nn.Module, train_ds: Dataset, images: int, batch_size: int, device: str = "cpu",
                   seed: int = 0, quiet: bool = True) -> int:
    """Re-estimate every BatchNorm's running statistics on `images` training images (cumulative
    average, not momentum); returns the number of BatchNorm layers reset."""
    batches = (x for x, _ in loader(train_ds, batch_size, shuffle=True, limit=images, seed=seed))
    return recalibrate_bn_on(model, batches, device, seed, quiet)


@torch.no_grad()
def recalibrate_bn_on(model: nn.Module, batches: Iterable[torch.Tensor], device: str = "cpu", seed: int = 0,
                      quiet: bool = True, total: int | None = None) -> int:
    """`recalibrate_bn` over any iterable of input batches (detectors: letterboxed images)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    model.eval().to(device)
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    torch.manual_seed(seed)
    try:
        for x in tqdm(batches, desc="BN re-calibration", disable=quiet, leave=False, total=total):
            model(x.to(device))
    finally:
        for bn, momentum in zip(bns, saved, strict=True):
            bn.momentum = momentum
        model.eval()
    return len(bns)


def distillation_loss(student_logits, teacher_logits, targets, alpha: float, temperature: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T) (Hinton et al. 2015)."""
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * t * t * kl


def _optimizer(params, opts: RecoverOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, nesterov=opts.nesterov,
                           weight_decay=opts.weight_decay)


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class EpochResult:
    epoch: int
    loss: float
    lr: float
    seconds: float
    top1: float | None = None
    top5: float | None = None
    map50_95: float | None = None  # detectors
    map50: float | None = None
    precision: str | None = None  # the epoch's arithmetic (a resumed fine-tune may have changed machine)


@dataclass
class FinetuneResult:
    epochs: list[EpochResult] = field(default_factory=list)
    resumed_from_epoch: int = 0
    world_size: int = 1
    channels_last: bool = False  # trained in the channels-last memory layout
    packed_batchnorms: int = 0  # of them, BatchNorm layers trained by `batchnorm.packed_batch_norm`
    teacher_folded_batchnorms: int = 0  # the teacher's BatchNorm layers folded into its convolutions
    precision: str = "fp32"  # the arithmetic of the forward and backward passes: fp32, or bf16/fp16 under autocast
    # recover.amp on a CPU with native bf16: the median seconds of a training step in each precision, as timed to
    # choose (`choose_precision`); None when nothing was timed
    precision_step_s: dict[str, float] | None = None
    compiled: bool = False  # the training steps ran through torch.compile (`choose_compile`)
    # recover.compile when it compiled: the median seconds of an eager and a compiled training step, timed side by
    # side; None when nothing was timed
    compile_step_s: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def read_checkpoint(checkpoint: Path | None, tag: str | None, resume: bool, rt: Runtime | None = None,
                    device: str = "cpu") -> dict | None:
    """The interrupted fine-tune's state in `checkpoint` (tensors only, loaded with weights_only), or None when
    there is none. One written under another `tag` belongs to other inputs: it is removed (by the main process,
    once every process has read it) and the fine-tune starts afresh. One under this tag without `resume` is an
    error that says how to go on."""
    if checkpoint is None or not checkpoint.exists():
        return None
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    if state.get("tag") != tag:
        rt = rt or Runtime()
        rt.barrier()  # every process has read it before the main one removes it
        if rt.is_main:
            checkpoint.unlink()
        return None
    if not resume:
        raise EdgePruneError(f"{checkpoint} holds an interrupted fine-tune; pass --resume to continue it or "
                             "--overwrite to start again")
    return state


def resume_training(state: dict, result: FinetuneResult, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load a `read_checkpoint` state into the fine-tune's model, optimizer, scheduler and `result`; the epoch to
    continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.epochs = [EpochResult(**e) for e in state["epochs"]]
    result.resumed_from_epoch = int(state["epoch"])
    return result.resumed_from_epoch


def write_checkpoint(checkpoint: Path, tag: str | None, result: FinetuneResult, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     **extra) -> None:
    """Atomically write what `resume_training` needs after the epoch `result` ends with, the choices a resume
    must keep (precision, compile, with their timings) and the loop's `extra` tensors (a loss scaler, an EMA)."""
    with atomic_path(checkpoint) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": result.epochs[-1].epoch,
                    "epochs": [asdict(e) for e in result.epochs], "precision": result.precision,
                    "precision_step_s": result.precision_step_s, "compiled": result.compiled,
                    "compile_step_s": result.compile_step_s, "tag": tag, **extra}, tmp)


def finetune(student: nn.Module, teacher: nn.Module | None, train_ds: Dataset, eval_ds: Dataset | None,
             opts: RecoverOptions, rt: Runtime, checkpoint: Path | None = None, resume: bool = False,
             seed: int = 0, quiet: bool = True, tag: str | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune `student` in place (distilling from `teacher` when given); returns per-epoch results.

    `checkpoint` is written after every epoch with `tag` (what the fine-tune started from); one
    with another tag belongs to other inputs and is discarded rather than resumed. `log` hears the arithmetic
    chosen, and why."""
    device = rt.device
    student.to(device)
    sample = _sample_batch(train_ds, device)  # one image batch, or None when the samples are not images
    with training_layout(opts, student, teacher, sample, device) as (layout, teacher, packed):
        folded = 0
        if teacher is not None and opts.fold_teacher and sample is not None:
            teacher, folded = fold_batchnorms(teacher, sample, layout)
        result = _finetune(student, teacher, train_ds, eval_ds, opts, rt, checkpoint, resume, seed, quiet, tag, layout,
                           log)
    result.channels_last, result.packed_batchnorms = layout == torch.channels_last, packed
    result.teacher_folded_batchnorms = folded
    return result


@contextlib.contextmanager
def training_layout(opts: RecoverOptions, student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor | None,
                    device: str):
    """The memory layout fine-tuning runs in, for classifiers and detectors alike: channels-last when
    `_to_channels_last` allows it (the student converted in place), with the packed batch norm where it applies.
    Yields (layout, the teacher to distil from: a channels-last copy, or the caller's model in eval mode on
    `device`, None without one; how many BatchNorm layers train packed). On exit, even on an error, every
    BatchNorm has its own forward back and the student is contiguous again (the caller's layout; safetensors saves
    no other)."""
    channels_last, teacher_cl = _to_channels_last(opts, student, teacher, sample)
    if teacher is not None:  # it runs under no_grad: its parameters (the caller's model) are left as they are
        teacher = teacher_cl if channels_last else teacher.eval().to(device)
    packed = packed_batchnorms(student, device) if channels_last and opts.packed_batchnorm else []
    try:
        yield torch.channels_last if channels_last else torch.contiguous_format, teacher, len(packed)
    finally:
        for handle in packed:
            handle.remove()
        student.to(memory_format=torch.contiguous_format)


def autocast_context(precision: str, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for `precision` (`training_precision`) on `device`: nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.split(":")[0],
                             dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def fold_batchnorms(model: nn.Module, x: torch.Tensor,
                    memory_format: torch.memory_format = torch.contiguous_format) -> tuple[nn.Module, int]:
    """For inference only (the distillation teacher, which never trains): an eval-mode copy of `model` in
    `memory_format` with each BatchNorm that directly follows a convolution or linear layer, as that layer's only
    user, folded into its weights (torch.fx), and how many were folded. It skips the normalization's
    memory-bound passes over every activation (bench/results/allocation.md: the teacher's forward and the pruned
    model's distillation timed with and without it). The copy's outputs on `x` must match the model's (in eval
    mode, TF32 off) to 1e-4 of their scale. (`model`, 0) when torch.fx cannot trace the model, when nothing
    folds, or when the outputs differ (a forward hook on a folded layer, say). `model` is left as it was."""
    from torch.fx.experimental.optimization import fuse

    reference = copy.deepcopy(model).eval()
    try:
        traced = torch.fx.symbolic_trace(reference)
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError):  # what tracing raises on Python it cannot follow:
        return model, 0  # control flow on tensor values, len() of a tensor, shapes used as integers
    before = _batchnorm_calls(traced)
    if not before:
        return model, 0
    folded = fuse(traced, inplace=True, no_trace=True)  # new convolutions; `reference`'s own are left as they are
    count = before - _batchnorm_calls(folded)
    if not count:
        return model, 0
    folded = folded.to(x.device, memory_format=memory_format).eval()
    with torch.no_grad(), _without_tf32():
        want, got = reference(x), folded(x.contiguous(memory_format=memory_format))
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.shape == got.shape
            and (want - got).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())):
        return model, 0
    return folded, count


def _batchnorm_calls(graph_module: torch.fx.GraphModule) -> int:
    """How many BatchNorm modules the traced forward calls (a module it never calls does not count)."""
    modules = dict(graph_module.named_modules())
    return sum(node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm)
               for node in graph_module.graph.nodes)


@contextlib.contextmanager
def _without_tf32():
    """CUDA convolutions and matmuls in full FP32 (cuDNN's TF32 default rounds folded and unfolded weights
    differently, past the check's tolerance); nothing changes on the CPU."""
    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _sample_batch(train_ds: Dataset, device: str) -> torch.Tensor | None:
    """A batch of the training set's first image, or None when its samples are not image tensors."""
    x = train_ds[0][0] if len(train_ds) else None
    return x.unsqueeze(0).to(device) if isinstance(x, torch.Tensor) and x.dim() == 3 else None


def packed_batchnorms(student: nn.Module, device: str) -> list:
    """Channels-last fine-tuning on an AVX-512 CPU: each BatchNorm2d whose width is not a multiple of 16 trains through
    `batchnorm.packed_batch_norm` (its statistics summed over rows of several pixels, so that the channels fill
    the vector lanes). PyTorch's own channels-last batch norm vectorizes along the channels, and at such widths
    (4 to 45) it ran 1.4-7x slower than at 16 (`python bench/batchnorm_layout.py` on 2 cores of an Intel Xeon,
    forward and backward at batch 128, 32x32). Elsewhere (AVX2, ARM, GPUs) not measured: nothing changes.
    Returns handles whose `remove()` gives each module its own forward back."""
    if device != "cpu" or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return []
    return use_packed_batch_norm(student)


def training_precision(device: str, amp: bool) -> str:
    """The arithmetic `recover.amp` gives on `device`: bf16 autocast on CUDA where it has bf16 (fp16 with loss
    scaling where not) and on CPUs with native bf16 (`cpu_has_bf16`); fp32 when amp is off or the CPU would
    emulate bf16."""
    kind = device.split(":")[0]
    if not amp:
        return "fp32"
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if kind == "cpu" and cpu_has_bf16() else "fp32"


# recover.amp on a CPU with native bf16 instructions: bf16 autocast is not faster everywhere. The pruned CIFAR
# ResNet-56's fine-tuning steps, timed side by side (bench/allocation.py --train-rate), ran 1.5x faster in bf16
# than in FP32 on an AMD EPYC with AVX512-BF16 and 1.6x on an Intel Xeon with AMX, but 0.83x on an Intel Xeon whose
# AMX the hypervisor hides (AVX512-BF16 alone, beside two full-width FP32 FMA units). So the fine-tune times it.
AMP_PROBE_STEPS = 3  # timed training steps in each precision, taking turns, after one untimed step of each
AMP_PROBE_MIN_STEPS = 100  # a shorter fine-tune is not worth timing (the probe costs 8 steps): bf16 where native
AMP_MIN_GAIN = 0.05  # bf16 must be this much faster than FP32 to be chosen: FP32 is the exact arithmetic


def choose_precision(device: str, amp: bool, steps: int, make_step: Callable[[], Callable[[str], None]],
                     model: nn.Module, rt: Runtime | None = None,
                     resumed: dict | None = None) -> tuple[str, dict[str, float] | None]:
    """The fine-tune's arithmetic: `training_precision`, except on a CPU with native bf16, where a fine-tune of at
    least AMP_PROBE_MIN_STEPS `steps` (all its epochs') times the step `make_step()` returns (one training step of
    its own on `model`, in the precision given; built only when it is timed) in FP32 and in bf16, and keeps bf16
    only when it is AMP_MIN_GAIN faster. A fine-tune `resumed` from a checkpoint that recorded its choice
    (`precision`, `precision_step_s`) keeps it when this machine can run it, so that it ends where an
    uninterrupted one would. With `rt`, every process times (or none does) and the times are summed, so that all
    choose alike. Returns (the precision, the median seconds of a step in each, or None when nothing was
    timed)."""
    precision = training_precision(device, amp)
    if resumed is not None and resumed.get("precision") in ("fp32", precision):
        return resumed["precision"], resumed.get("precision_step_s")
    wanted = precision == "bf16" and device.split(":")[0] == "cpu" and steps >= AMP_PROBE_MIN_STEPS
    if rt is not None and rt.distributed:  # a process whose CPU differs must not leave the others waiting
        wanted = rt.all_sum([float(wanted)])[0] == rt.world_size
    if not wanted:
        return precision, None
    times = time_steps(make_step(), model, ("fp32", "bf16"))
    if rt is not None:
        times = dict(zip(times, rt.all_sum(list(times.values())), strict=True))
    seconds = {p: round(t / (rt.world_size if rt is not None else 1), 4) for p, t in times.items()}
    return ("bf16" if times["bf16"] < times["fp32"] * (1 - AMP_MIN_GAIN) else "fp32"), seconds


def time_steps(step: Callable[[str], None], model: nn.Module, precisions: Iterable[str],
               repeats: int = AMP_PROBE_STEPS) -> dict[str, float]:
    """The median seconds of `step(precision)` for each of `precisions`, taking turns after one untimed step of
    each; `model`'s weights and BatchNorm statistics are restored afterwards and its gradients cleared, so that
    the steps leave no trace on the fine-tune. With `repeats` 0 it only takes the untimed steps (a warm-up, a
    compile) and returns no times."""
    saved = copy.deepcopy(model.state_dict())
    times: dict[str, list[float]] = {p: [] for p in precisions}
    cuda = any(p.is_cuda for p in model.parameters())  # a GPU step ends when its kernels have

    def timed(precision: str) -> float:
        t0 = time.perf_counter()
        step(precision)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    try:
        for precision in times:
            timed(precision)
        for _ in range(repeats):
            for precision, seconds in times.items():
                seconds.append(timed(precision))
    finally:
        model.load_state_dict(saved)
        for p in model.parameters():
            p.grad = None
    return {p: statistics.median(t) for p, t in times.items() if t}  # none for repeats=0 (a warm-up alone)


def precision_note(precision: str, seconds: dict[str, float] | None) -> str:
    """One line on the fine-tune's arithmetic and, when it was timed, why."""
    if seconds is None:
        return f"fine-tuning in {precision}"
    return (f"fine-tuning in {precision}: a training step took {seconds['bf16']:.3f} s under bf16 autocast and "
            f"{seconds['fp32']:.3f} s in FP32, timed side by side (recover.amp keeps bf16 only when it is at least "
            f"{AMP_MIN_GAIN:.0%} faster)")


# recover.compile: torch.compile (Inductor) generates fused kernels for the memory-bound batch norm, ReLU and
# residual-add work of a training step, which pruning inside the blocks leaves at full width. On 2 cores of an Intel
# Xeon with AVX-512 (AMX hidden) the default recipe's distilling FP32 step ran 1.12x faster compiled (0.522 against
# 0.586 s); in bench/allocation.py --train-rate the steps ran 1.06-1.25x faster compiled, pruned and unpruned, FP32
# and bf16. Compiling and timing took 58 s there (Inductor then caches its kernels on disk). So a long fine-tune
# compiles, and times it.
COMPILE_MIN_STEPS = 1000  # at 0.06 s saved a step, 1000 steps win back a cold compile of about a minute
COMPILE_MIN_GAIN = 0.05  # the compiled step must be this much faster than the eager one to be kept


def choose_compile(setting: bool | str, steps: int, make_step: Callable[[], Callable[[nn.Module], None]],
                   model: nn.Module, rt: Runtime, resumed: dict | None = None,
                   log: Callable[[str], None] | None = None) -> tuple[nn.Module | None, dict[str, float] | None]:
    """The module the fine-tune's full batches train through: `torch.compile(model)` or None (eager).
    `setting` is recover.compile: "auto" compiles a fine-tune on the CPU of at least COMPILE_MIN_STEPS `steps` (all
    its epochs' full batches), times `make_step()(net)` (one training step of the fine-tune's own on its first
    batch) eager and compiled (`time_steps`: the first compiled step compiles, untimed), and keeps the compiled
    module only when it is COMPILE_MIN_GAIN faster; True compiles and times whatever the length and keeps it;
    False never compiles; nor does a fine-tune without a full batch (`steps` 0). Single processes only: under
    torchrun (DistributedDataParallel) the fine-tune runs eager. A fine-tune `resumed` from a checkpoint keeps
    the choice it recorded (eager for one written before recover.compile existed) and its times, compiling with
    one untimed step, so that it ends as an uninterrupted one would. A machine that cannot compile (no C++
    compiler, a model Dynamo cannot trace) falls back to eager. `log` hears what was chosen and why. Returns (the
    module or None, the median seconds of an eager and a compiled step, or None when nothing was timed)."""
    say = log if log is not None and rt.is_main else (lambda _: None)
    if resumed is not None:
        wanted = bool(resumed.get("compiled", False))
    else:
        wanted = steps > 0 and (setting is True or (setting == "auto" and steps >= COMPILE_MIN_STEPS
                                                    and rt.device == "cpu"))
    if wanted and rt.distributed:
        say("training step eager: torchrun fine-tunes without torch.compile (it is for one process)")
        return None, None
    if not wanted:
        if resumed is not None and setting is True:
            say("training step eager, as the interrupted fine-tune ran")
        return None, None
    import torch._dynamo.exc
    compiled = torch.compile(model, dynamic=False)  # the last, smaller batch of an epoch runs eager: no recompiling
    step = make_step()
    say("compiling the training step (torch.compile: about a minute the first time, then cached)")
    try:  # Inductor's C++ build warns that it found no CUDA runtime, which a CPU fine-tune does not need
        with quiet_logger("torch.utils.cpp_extension"):
            # a resume keeps its recorded choice and times: one untimed step compiles (or fails to)
            times = time_steps(lambda mode: step(compiled if mode == "compiled" else model), model,
                               ("compiled",) if resumed is not None else ("eager", "compiled"),
                               repeats=0 if resumed is not None else AMP_PROBE_STEPS)
    except torch._dynamo.exc.TorchDynamoException as e:  # Inductor's build (no C++ compiler), Dynamo's tracing
        say(f"torch.compile failed, fine-tuning eagerly: {type(e).__name__}: {first_line(e)}")
        return None, None
    if resumed is not None:
        seconds, keep, why = resumed.get("compile_step_s"), True, "as the interrupted fine-tune did"
    else:
        seconds = {mode: round(t, 4) for mode, t in times.items()}
        keep = setting is True or times["compiled"] < times["eager"] * (1 - COMPILE_MIN_GAIN)
        why = "recover.compile true" if setting is True else \
            f"recover.compile keeps it when it is at least {COMPILE_MIN_GAIN:.0%} faster"
    say(f"training step {'compiled' if keep else 'eager'}" + (
        f": {seconds['compiled']:.3f} s compiled against {seconds['eager']:.3f} s eager, timed side by side"
        if seconds else "") + f" ({why})")
    return (compiled if keep else None), seconds


def _to_channels_last(opts: RecoverOptions, student: nn.Module, teacher: nn.Module | None,
                      x: torch.Tensor | None) -> tuple[bool, nn.Module | None]:
    """Convert `student` in place to the channels-last layout, and return (True, a channels-last copy of
    `teacher` on `x`'s device), when fine-tuning can run that way: asked for, image batches (`x`, a sample one;
    None when the samples are not images), and both models run a channels-last batch (`channels_last_copy`).
    Otherwise (False, None), with `student` as it was."""
    if not opts.channels_last or x is None:
        return False, None
    if channels_last_copy(student, x) is None:
        return False, None
    teacher_cl = None
    if teacher is not None and (teacher_cl := channels_last_copy(teacher, x)) is None:
        return False, None
    student.to(memory_format=torch.channels_last)
    return True, teacher_cl


def _finetune(student: nn.Module, teacher: nn.Module | None, train_ds: Dataset, eval_ds: Dataset | None,
              opts: RecoverOptions, rt: Runtime, checkpoint: Path | None, resume: bool, seed: int, quiet: bool,
              tag: str | None, layout: torch.memory_format, log: Callable[[str], None] | None) -> FinetuneResult:
    device = rt.device
    per_rank_batch = max(1, opts.batch_size // rt.world_size)
    train_images = min(opts.train_images or len(train_ds), len(train_ds))
    steps_per_epoch = math.ceil(math.ceil(train_images / rt.world_size) / per_rank_batch)
    optimizer = _optimizer(student.parameters(), opts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opts.epochs * steps_per_epoch,
                                                                           opts.warmup))
    result = FinetuneResult(world_size=rt.world_size)
    state = read_checkpoint(checkpoint, tag, resume, rt, device)
    start = resume_training(state, result, student, optimizer, scheduler) if state is not None else 0

    def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
        with autocast():
            with torch.no_grad():
                t_logits = teacher(x).float() if teacher is not None else None
            return distillation_loss(net(x).float(), t_logits, y, opts.distill_alpha if teacher is not None else 0,
                                     opts.temperature, opts.label_smoothing)

    def make_probe() -> Callable[[str], None]:  # steps on the student itself, before DistributedDataParallel wraps it
        x, y = next(iter(loader(Subset(train_ds, range(min(per_rank_batch, len(train_ds)))), per_rank_batch)))
        x, y = (x.to(device).contiguous(memory_format=layout) if x.dim() == 4 else x.to(device)), y.to(device)
        opt = _optimizer(student.parameters(), opts)  # its state is thrown away

        def step(precision: str, net: nn.Module = student) -> None:
            loss = loss_of(net, x, y, autocast_context(precision, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    student.train()
    result.precision, result.precision_step_s = choose_precision(
        device, opts.amp, opts.epochs * steps_per_epoch, make_probe, student, rt, state)
    if log and rt.is_main:
        log(precision_note(result.precision, result.precision_step_s))
    full_batches = opts.epochs * (math.ceil(train_images / rt.world_size) // per_rank_batch)  # what would compile
    compiled, result.compile_step_s = choose_compile(
        opts.compile, full_batches,
        lambda: functools.partial(make_probe(), result.precision), student, rt, state, log)
    result.compiled = compiled is not None
    model = student
    if rt.distributed:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device] if device != "cpu" else None)
    # Weights, optimizer state and BatchNorm statistics stay FP32; autocast runs convolutions in 16 bits.
    autocast = autocast_context(result.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=result.precision == "fp16")
    if state is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])  # the loss scale it had reached
    eval_loader = loader(shard(eval_ds, rt.rank, rt.world_size), opts.eval_batch_size) if eval_ds is not None else None

    for epoch in range(start, opts.epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)  # augmentation: the same whether or not we resumed
        subset = Subset(train_ds, torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(
            seed * 7919 + epoch))[:train_images].tolist())
        train_loader = loader(shard(subset, rt.rank, rt.world_size), per_rank_batch, workers=opts.workers)
        model.train()
        t0, total, seen = time.time(), 0.0, 0
        for x, y in tqdm(train_loader, desc=f"fine-tune {epoch + 1}/{opts.epochs}", disable=quiet, leave=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=layout)
            net = compiled if compiled is not None and len(y) == per_rank_batch else model
            loss = loss_of(net, x, y, autocast)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        total, seen = rt.all_sum([total, seen])
        epoch_result = EpochResult(epoch=epoch + 1, loss=total / seen, lr=scheduler.get_last_lr()[0],
                                   seconds=round(time.time() - t0, 2), precision=result.precision)
        if eval_loader is not None:
            acc = evaluate_model(student, eval_loader, rt)
            epoch_result.top1, epoch_result.top5 = acc.top1, acc.top5
        result.epochs.append(epoch_result)
        if checkpoint is not None and rt.is_main:
            write_checkpoint(checkpoint, tag, result, student, optimizer, scheduler, scaler=scaler.state_dict())
        rt.barrier()
    student.eval()
    if compiled is not None:  # Dynamo's cache on the model's code: the next student (a trial, a step) starts afresh
        torch.compiler.reset()
    return result
