import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import edgeprune.environment as environment
import edgeprune.recover as recover
from edgeprune import EdgePruneError, create_model, prune
from edgeprune.accuracy import evaluate_model as evaluate
from edgeprune.data import load_split, loader
from edgeprune.distributed import Runtime
from edgeprune.environment import cpu_has_bf16
from edgeprune.recipe import PruneOptions, RecoverOptions
from edgeprune.recover import distillation_loss, finetune, fold_batchnorms, recalibrate_bn, training_precision


def setup_pruned():
    teacher = create_model("cifar_resnet20", weights="cifar10-jpeg")
    student, _ = prune(teacher, PruneOptions(ratio=0.5))
    spec = teacher.edgeprune_spec
    return teacher, student, load_split("cifar10", spec, True), load_split("cifar10", spec, False)


def test_bn_recalibration_recovers_accuracy():
    _, student, train, val = setup_pruned()
    data = loader(val, 500, limit=1000)
    before = evaluate(student, data).top1
    assert recalibrate_bn(student, train, 512, 128) == 19
    after = evaluate(student, data).top1
    assert after > before + 15, (before, after)


def test_distillation_loss_terms():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(distillation_loss(s, None, y, 0.7, 4.0), F.cross_entropy(s, y))
    assert distillation_loss(t, t, y, 1.0, 4.0).abs() < 1e-6  # identical logits: KL is zero
    # By hand: KL(p_t || p_s) = sum p_t (log p_t - log p_s), on temperature-softened distributions.
    p_t, log_p_s = F.softmax(t / 2.0, 1), F.log_softmax(s / 2.0, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * 4.0 * kl
    assert torch.allclose(distillation_loss(s, t, y, 0.5, 2.0), expected, atol=1e-6)


def test_finetune_improves_and_resumes_exactly(tmp_path):
    teacher, student, train, val = setup_pruned()
    recalibrate_bn(student, train, 256, 128)
    opts = RecoverOptions(epochs=2, train_images=512, batch_size=64, lr=0.02)
    eval_ds = torch.utils.data.Subset(val, range(0, 10_000, 20))
    before = evaluate(student, loader(eval_ds, 500)).top1
    ckpt = tmp_path / "ft.pt"
    resumed = copy.deepcopy(student)
    full = finetune(student, teacher, train, eval_ds, opts, Runtime(), ckpt, seed=3)
    assert [e.epoch for e in full.epochs] == [1, 2] and full.epochs[-1].top1 > before
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's model is left trainable
    # Trained channels-last (the default), handed back contiguous (safetensors saves nothing else); the
    # teacher (the caller's model) was never converted.
    assert opts.channels_last and all(p.is_contiguous() for p in student.parameters())
    assert all(p.is_contiguous() for p in teacher.parameters())
    # it distilled from a copy of the teacher with every BatchNorm folded into its convolution (the teacher's
    # own BatchNorm layers are still there)
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    assert bns == 19 and full.teacher_folded_batchnorms == bns

    # Interrupt during epoch 2, then resume from the epoch-1 checkpoint: the result equals the
    # uninterrupted run.
    ckpt2 = tmp_path / "ft2.pt"
    with pytest.raises(KeyboardInterrupt):
        finetune(resumed, teacher, InterruptAfter(train, 512 + 100), None, opts, Runtime(), ckpt2, seed=3)
    assert torch.load(ckpt2, weights_only=True)["epoch"] == 1
    with pytest.raises(EdgePruneError, match="--resume"):
        finetune(resumed, teacher, train, None, opts, Runtime(), ckpt2, seed=3)
    result = finetune(resumed, teacher, train, None, opts, Runtime(), ckpt2, resume=True, seed=3)
    assert result.resumed_from_epoch == 1 and [e.epoch for e in result.epochs] == [1, 2]
    assert [e.precision for e in result.epochs] == [result.precision] * 2  # each epoch records its arithmetic
    # On AVX-512 the BatchNorm layers whose width is not a multiple of 16 train through
    # batchnorm.packed_batch_norm, their own forward given back afterwards (the state dict's keys above are the
    # model's own)
    odd = sum(isinstance(m, torch.nn.BatchNorm2d) and m.num_features % 16 != 0 for m in student.modules())
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert odd > 0 and result.packed_batchnorms == full.packed_batchnorms == (odd if avx512 else 0)
    assert not any("forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks for m in student.modules())
    off = finetune(copy.deepcopy(student), None, train, None, opts.model_copy(
        update={"packed_batchnorm": False, "epochs": 1, "train_images": 64}), Runtime())
    assert off.packed_batchnorms == 0  # recover.packed_batchnorm false: PyTorch's own batch norm
    for (name, a), b in zip(student.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_channels_last_trains_the_same_model():
    """The memory layout changes the kernels, not the arithmetic: one epoch either way gives the same
    losses and the same weights to float32 round-off."""
    teacher, student, train, _ = setup_pruned()
    other = copy.deepcopy(student)
    runs, layouts = [], []

    def record(module, args):
        layouts.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

    for model, channels_last in ((student, True), (other, False)):
        opts = RecoverOptions(epochs=1, train_images=256, batch_size=64, lr=0.02, channels_last=channels_last,
                              amp=False)  # FP32 arithmetic: the two layouts agree to its round-off
        hook = model.conv1.register_forward_pre_hook(record)
        result = finetune(model, teacher, train, None, opts, Runtime(), seed=1)
        hook.remove()
        assert result.channels_last == channels_last and set(layouts) == {channels_last}, layouts
        layouts.clear()
        runs.append(result.epochs[0].loss)
    assert runs[0] == pytest.approx(runs[1], rel=1e-3), runs
    for (name, a), b in zip(student.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3), name


def test_mixed_precision_on_a_cpu_with_bf16_trains_like_fp32():
    """recover.amp on the CPU: bf16 autocast where the CPU has bf16 instructions (AMX on the Intel machines
    here), FP32 on those without (the AVX2 EPYCs); the weights stay FP32, and one short epoch lands where
    FP32's does."""
    teacher, student, train, val = setup_pruned()
    other = copy.deepcopy(student)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()  # PyTorch's own view
    assert cpu_has_bf16() == native
    eval_ds = torch.utils.data.Subset(val, range(0, 10_000, 20))
    runs = {}
    for model, amp in ((student, True), (other, False)):
        dtypes: set[torch.dtype] = set()

        def record(module, args, out, seen=dtypes):
            if module.training:
                seen.add(out.dtype)

        hook = model.conv1.register_forward_hook(record)
        opts = RecoverOptions(epochs=1, train_images=512, batch_size=64, lr=0.02, amp=amp)
        runs[amp] = finetune(model, teacher, train, eval_ds, opts.model_copy(update={"eval_every_epoch": True}),
                             Runtime(), seed=1)
        hook.remove()
        assert runs[amp].precision == ("bf16" if amp and native else "fp32")
        assert dtypes == {torch.bfloat16 if runs[amp].precision == "bf16" else torch.float32}, dtypes
        assert all(p.dtype == torch.float32 for p in model.parameters())
    bf16, fp32 = runs[True].epochs[0], runs[False].epochs[0]
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.03), (bf16, fp32)
    assert abs(bf16.top1 - fp32.top1) <= 2.0, (bf16, fp32)  # 500 images: one image is 0.2 points


def test_training_precision_follows_the_device_and_amp(monkeypatch):
    """The CUDA branches with the GPU's bf16 support set by hand (no GPU here), the CPU's by its flags."""
    for bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, v=bf16, **k: v)
        assert training_precision("cuda", True) == training_precision("cuda:1", True) == expected
        assert training_precision("cuda:0", False) == "fp32"
    for flags, expected in (({"avx2", "amx_bf16"}, "bf16"), ({"avx512_bf16"}, "bf16"), ({"avx2", "avx512f"}, "fp32"),
                            (None, "fp32")):
        monkeypatch.setattr(environment, "cpu_flags", lambda v=flags: v)
        assert training_precision("cpu", True) == expected and training_precision("cpu", False) == "fp32"


def test_amp_times_both_precisions_and_leaves_no_trace(monkeypatch, tmp_path):
    """recover.amp on a CPU with native bf16 times the fine-tune's own step in bf16 and in FP32 and keeps bf16 only
    when it is AMP_MIN_GAIN faster (an Intel Xeon whose AMX is hidden ran it 0.83x as fast). The CPU is made to
    report AVX512-BF16 (PyTorch emulates bf16 where it lacks it, so the timing runs on any CPU) and the probe's
    floor lowered to this short fine-tune. The probe's steps change nothing: the fine-tune then matches, bit for
    bit, one told that precision without a probe."""
    monkeypatch.setattr(environment, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    teacher, student, train, _ = setup_pruned()
    other = copy.deepcopy(student)
    opts = RecoverOptions(epochs=1, train_images=256, batch_size=64, lr=0.02)
    steps = 256 // 64
    notes: list[str] = []
    monkeypatch.setattr(recover, "AMP_PROBE_MIN_STEPS", steps)
    probed = finetune(student, teacher, train, None, opts, Runtime(), seed=1, log=notes.append)
    seconds = probed.precision_step_s
    assert set(seconds) == {"bf16", "fp32"} and all(s > 0 for s in seconds.values()), seconds
    assert probed.precision == ("bf16" if seconds["bf16"] < seconds["fp32"] * (1 - recover.AMP_MIN_GAIN) else "fp32")
    assert [e.precision for e in probed.epochs] == [probed.precision]
    assert notes == [recover.precision_note(probed.precision, seconds)] and "timed side by side" in notes[0]

    monkeypatch.setattr(recover, "AMP_PROBE_MIN_STEPS", steps + 1)  # too short to time: bf16 where native
    told = finetune(other, teacher, train, None, opts.model_copy(update={"amp": probed.precision == "bf16"}),
                    Runtime(), seed=1, log=notes.append)
    assert told.precision == probed.precision and told.precision_step_s is None
    assert notes[-1] == f"fine-tuning in {told.precision}"
    assert told.epochs[0].loss == probed.epochs[0].loss
    for (name, a), b in zip(student.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # Interrupted in its second epoch, a timed fine-tune resumes with the arithmetic its checkpoint recorded, not
    # timed again, and ends where one told that precision from the start does.
    two = opts.model_copy(update={"epochs": 2})
    monkeypatch.setattr(recover, "AMP_PROBE_MIN_STEPS", 2 * steps)
    resumed, uninterrupted = copy.deepcopy(student), copy.deepcopy(student)
    ckpt = tmp_path / "ft.pt"
    with pytest.raises(KeyboardInterrupt):  # the probe's batch (64 images), epoch 1, then 100 of epoch 2
        finetune(resumed, teacher, InterruptAfter(train, 64 + 256 + 100), None, two, Runtime(), ckpt, seed=2)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and set(saved["precision_step_s"]) == {"bf16", "fp32"}
    again = finetune(resumed, teacher, train, None, two, Runtime(), ckpt, resume=True, seed=2)
    assert (again.precision, again.precision_step_s) == (saved["precision"], saved["precision_step_s"])
    monkeypatch.setattr(recover, "AMP_PROBE_MIN_STEPS", 2 * steps + 1)
    finetune(uninterrupted, teacher, train, None, two.model_copy(update={"amp": saved["precision"] == "bf16"}),
             Runtime(), seed=2)
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_compiled_fine_tune_trains_like_eager_and_resumes_exactly(tmp_path):
    """recover.compile: the student's full batches train through torch.compile (Inductor's fused kernels), the
    epoch's last, smaller batch eagerly (no recompiling); FP32 lands where the eager fine-tune does to round-off.
    The checkpoint records the choice: a compiled fine-tune interrupted in its second epoch compiles again when
    resumed, even where recover.compile auto would not for so short a fine-tune, and ends bit for bit where the
    uninterrupted compiled one does."""
    teacher, student, train, _ = setup_pruned()
    eager, resumed, start = copy.deepcopy(student), copy.deepcopy(student), copy.deepcopy(student.state_dict())
    opts = RecoverOptions(epochs=2, train_images=288, batch_size=64, lr=0.02, amp=False, compile=True)  # 4 + 1 of 32
    notes: list[str] = []
    full = finetune(student, teacher, train, None, opts, Runtime(), seed=4, log=notes.append)
    seconds = full.compile_step_s
    assert full.compiled and set(seconds) == {"eager", "compiled"} and all(s > 0 for s in seconds.values())
    assert "torch.compile" in notes[1] and notes[2] == (
        f"training step compiled: {seconds['compiled']:.3f} s compiled against {seconds['eager']:.3f} s eager, "
        "timed side by side (recover.compile true)"), notes
    auto = finetune(eager, teacher, train, None, opts.model_copy(update={"compile": "auto"}), Runtime(), seed=4)
    assert not auto.compiled and auto.compile_step_s is None  # 10 steps: far below COMPILE_MIN_STEPS
    assert [e.loss for e in full.epochs] == pytest.approx([e.loss for e in auto.epochs], rel=1e-3)
    # Inductor fuses and reorders the sums: the weights part by round-off, amplified over 10 steps, far less than
    # training moved them (by hand, eager in the contiguous layout parted from channels-last by as much: up to 0.11
    # of a small BatchNorm's update)
    moved = parted = 0.0
    for a, b, c in zip(student.state_dict().values(), eager.state_dict().values(), start.values(), strict=True):
        if a.is_floating_point():
            moved, parted = moved + (b - c).square().sum(), parted + (a - b).square().sum()
    assert 0 < parted.sqrt() < 0.1 * moved.sqrt(), (parted.sqrt(), moved.sqrt())  # 0: it never ran compiled

    ckpt = tmp_path / "ft.pt"
    with pytest.raises(KeyboardInterrupt):  # the probe's batch (64 images), epoch 1, then 100 of epoch 2
        finetune(resumed, teacher, InterruptAfter(train, 64 + 288 + 100), None, opts, Runtime(), ckpt, seed=4)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and saved["compiled"] and not any("_orig_mod" in k for k in saved["model"])
    again = finetune(resumed, teacher, train, None, opts.model_copy(update={"compile": "auto"}), Runtime(), ckpt,
                     resume=True, seed=4)
    assert again.compiled and again.resumed_from_epoch == 1 and again.compile_step_s == saved["compile_step_s"]
    for (name, a), b in zip(resumed.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_resumed_fine_tune_keeps_its_recorded_choice_without_timing():
    """choose_compile on a resume: the checkpoint's choice stands, and one written before recover.compile existed
    (no "compiled" key) resumes eager even where auto would compile so long a fine-tune; nothing is timed. A
    fine-tune too short for auto, or told false, is not timed either; torchrun runs eager."""
    model = torch.nn.Linear(2, 2)

    def never() -> None:
        raise AssertionError("timed a step it should not have")
    for setting, steps, resumed in (("auto", 10_000, {"epoch": 1}), (True, 10_000, {"epoch": 1, "compiled": False}),
                                    ("auto", recover.COMPILE_MIN_STEPS - 1, None), (False, 10_000, None)):
        notes: list[str] = []
        assert recover.choose_compile(setting, steps, never, model, Runtime(), resumed, notes.append) == (None, None)
        assert notes == (["training step eager, as the interrupted fine-tune ran"] if setting is True else [])
    notes = []
    assert recover.choose_compile(True, 10_000, never, model, Runtime(world_size=2), None, notes.append) == (None, None)
    assert notes == ["training step eager: torchrun fine-tunes without torch.compile (it is for one process)"]


def test_a_machine_that_cannot_compile_fine_tunes_eagerly(tmp_path):
    """Where Inductor finds no C++ compiler (CXX pointing nowhere, an empty kernel cache), recover.compile true
    fine-tunes eagerly and the log says why, in a real process."""
    script = """
import json
from edgeprune import create_model
from edgeprune.data import load_split
from edgeprune.distributed import Runtime
from edgeprune.recipe import RecoverOptions
from edgeprune.recover import finetune
model = create_model("cifar_resnet20", weights="cifar10-jpeg")
train = load_split("cifar10", model.edgeprune_spec, True)
notes = []
opts = RecoverOptions(epochs=1, train_images=128, batch_size=64, amp=False, compile=True)
result = finetune(model, None, train, None, opts, Runtime(), log=notes.append)
print(json.dumps({"compiled": result.compiled, "seconds": result.compile_step_s, "notes": notes,
                  "epochs": len(result.epochs)}))
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["compiled"] and result["seconds"] is None and result["epochs"] == 1
    assert result["notes"][-1].startswith("torch.compile failed, fine-tuning eagerly: ") and \
        "C++ compiler" in result["notes"][-1], result["notes"]


class Flattens(torch.nn.Module):
    """A model that reshapes a 4-D activation with .view(), which a channels-last tensor refuses."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * 32 * 32, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_folding_the_teachers_batchnorms_keeps_its_outputs():
    teacher, student, train, val = setup_pruned()
    teacher.train()  # as a caller may hand it: the folded copy is in eval mode, the caller's model as it was
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = next(iter(loader(val, 64)))[0]
    for layout in (torch.channels_last, torch.contiguous_format):
        folded, n = fold_batchnorms(teacher, x, layout)
        assert n == 19 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert folded.conv1.weight.is_contiguous(memory_format=layout) and not folded.training
        with torch.no_grad():
            want, got = copy.deepcopy(teacher).eval()(x), folded(x.contiguous(memory_format=layout))
        assert (want - got).abs().max() < 1e-4 and torch.equal(want.argmax(1), got.argmax(1))
    assert teacher.training and all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())
    # used as it is: a model torch.fx cannot trace, one without BatchNorm, and one whose folded copy would
    # compute something else (torch.fx keeps no hook of a layer it folds away)
    branchy, plain = Branchy().eval(), torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert fold_batchnorms(branchy, x) == (branchy, 0) and fold_batchnorms(plain, x) == (plain, 0)
    hooked = copy.deepcopy(teacher).eval()
    hooked.bn1.register_forward_hook(lambda module, args, out: out + 1)
    assert fold_batchnorms(hooked, x) == (hooked, 0)
    # recover.fold_teacher false: distilled from the teacher as given
    opts = RecoverOptions(epochs=1, train_images=64, batch_size=32, lr=0.01, fold_teacher=False)
    assert finetune(student, teacher, train, None, opts, Runtime(), seed=0).teacher_folded_batchnorms == 0


class Branchy(torch.nn.Module):
    """Python control flow on a tensor's value, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)


def test_a_model_that_cannot_run_channels_last_trains_contiguous():
    _, _, train, _ = setup_pruned()
    model = Flattens()
    opts = RecoverOptions(epochs=1, train_images=64, batch_size=32, lr=0.01)
    result = finetune(model, None, train, None, opts, Runtime(), seed=0)
    assert opts.channels_last and not result.channels_last and result.epochs[0].loss > 0


class InterruptAfter(torch.utils.data.Dataset):
    """A dataset that stops the process (as Ctrl-C would) after `n` samples."""

    def __init__(self, ds, n):
        self.ds, self.n, self.seen = ds, n, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.seen += 1
        if self.seen > self.n:
            raise KeyboardInterrupt
        return self.ds[i]


def test_a_checkpoint_is_resumed_only_for_its_own_inputs_and_when_asked(tmp_path):
    """recover.read_checkpoint, shared by the classifier and detector fine-tunes: a checkpoint written under another
    tag (other inputs) is removed and the fine-tune starts afresh; one under this tag needs --resume."""
    from edgeprune.recover import read_checkpoint

    path = tmp_path / "finetune-checkpoint.pt"
    torch.save({"tag": "old inputs", "epoch": 1}, path)
    assert read_checkpoint(path, "new inputs", resume=True) is None and not path.exists()
    torch.save({"tag": "new inputs", "epoch": 1}, path)
    with pytest.raises(EdgePruneError, match="pass --resume to continue it or --overwrite"):
        read_checkpoint(path, "new inputs", resume=False)
    assert read_checkpoint(path, "new inputs", resume=True)["epoch"] == 1 and path.exists()
    assert read_checkpoint(tmp_path / "absent.pt", "new inputs", resume=True) is None
