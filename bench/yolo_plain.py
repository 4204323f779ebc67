"""Plain Ultralytics fine-tuning of an already-built (e.g. structurally pruned) YOLO ``DetectionModel``.

``plain_ultralytics_finetune`` runs Ultralytics' own ``DetectionTrainer`` (its loss, optimizer choice,
augmentation, schedule, EMA and validator) on a model *object*: the model is never rebuilt from its YAML
and no weights are re-loaded by name, so a model whose channel counts were changed by Torch-Pruning keeps
its pruned shapes.  Everything else is Ultralytics' defaults (``optimizer='auto'``, mosaic,
``close_mosaic=10``, warm-up, ...), with these fixed choices: FP32 (``amp=False``, so no AMP check and no
``yolo26n.pt`` download), ``plots=False``, ``workers=0``, ``deterministic=True``, ``val=True`` (validation
after every epoch), device ``cpu`` on ``torch.get_num_threads()`` threads (Ultralytics alone would take one core fewer).

Usage::

    from bench.yolo_plain import offline_env, plain_ultralytics_finetune
    offline_env("/tmp/run")          # optional, but call it *before* the first ``import ultralytics``
    history, model = plain_ultralytics_finetune(model, "/path/data.yaml", epochs=1, imgsz=256, batch=32,
                                                workdir="/tmp/run", fraction=0.05)

Returns ``(history, model)``:

* ``history``: one dict per epoch, ``{"epoch", "map50_95", "map50", "precision", "recall", "fitness",
  "train_loss", "val_loss", "lr", "train_images", "val_images", "train_s", "epoch_s"}``; mAP, precision
  and recall in percent (0-100), read from ``trainer.metrics`` in an ``on_fit_epoch_end`` callback.
  ``train_s`` is the training pass of the epoch, ``epoch_s`` the whole epoch (train + val + checkpoint).
* ``model``: the EMA model as it was validated at the last epoch (``trainer.ema.ema``), FP32, in eval
  mode, taken from memory (never re-loaded from a pickle).  It is the model the last ``history`` entry
  measures.  Its ``requires_grad`` flags are restored to those of the input model, its loss criterion
  and cached Detect anchors (inference-mode tensors made during validation) are dropped, so it can be
  pruned / trained again.  ``model.args`` is the trainer's ``IterableSimpleNamespace`` of hyperparameters,
  ``model.names`` / ``model.nc`` come from the dataset YAML.

The input ``model`` object itself is trained in place (it is ``trainer.model``: raw, non-EMA weights,
left in train mode); treat it as consumed and use the returned model.

Files: everything Ultralytics writes goes under ``workdir``: ``runs/finetune/`` (``args.yaml``,
``results.csv``, ``weights/last.pt`` and ``best.pt``: Ultralytics' FP16 pickles of the EMA),
``label_cache/`` (the dataset's ``*.cache`` label-scan files), and, when ultralytics is first imported
after ``offline_env``/this function set ``YOLO_CONFIG_DIR``, ``ultralytics_config/`` (``settings.json``).
The dataset folder is never written: Ultralytics would save ``labels/train.cache`` next to the dataset's
``labels/train`` folder; here the dataset class is swapped (only while the trainer builds it) for a subclass
whose ``_load_or_scan_cache`` loads and saves that cache under ``workdir/label_cache/`` instead.
Nothing touches the network: ``YOLO_OFFLINE=1``, settings ``sync`` and all logger integrations off in
memory (never written to the user's settings file), the anonymous-events sender disabled, the platform
API key hidden, ``check_font`` (which would download Arial.ttf into the config dir) replaced by a no-op,
``amp=False``.  All of these are restored when the function returns.  The trainer reseeds the global
RNGs and switches torch's deterministic mode on and then off; both are restored afterwards too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics reads it at import; harmless for everything else

_RUN_NAME = "finetune"
_MODEL_PLACEHOLDER = "in_memory_detection_model"  # trainer.args.model must be a string; never loaded


def offline_env(workdir: str | os.PathLike) -> dict[str, str]:
    """Set the environment variables that make Ultralytics offline and keep its config dir under workdir.

    Ultralytics reads them when it is first imported (it creates ``<YOLO_CONFIG_DIR>/Ultralytics/
    settings.json`` on import if it is missing), so call this before anything imports ``ultralytics``.
    A ``YOLO_CONFIG_DIR`` already set by the user is kept. Returns the values in effect.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    if "ultralytics" not in sys.modules:
        os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(workdir).resolve() / "ultralytics_config"))
    return {k: os.environ.get(k, "") for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR")}


@contextlib.contextmanager
def _offline_sandbox():
    """Turn off every Ultralytics network path in memory for the duration; restore everything after."""
    import torch
    import ultralytics.data.utils as data_utils
    import ultralytics.utils.plotting as plotting
    import ultralytics.utils.torch_utils as torch_utils
    from ultralytics.utils import SETTINGS, events

    off = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")}
    off["api_key"] = ""
    saved_settings = {k: SETTINGS[k] for k in off if k in SETTINGS}
    saved_events = getattr(events.events, "enabled", None)
    saved_key = os.environ.pop("ULTRALYTICS_API_KEY", None)
    saved_fonts = (data_utils.check_font, plotting.check_font)
    dict.update(SETTINGS, off)  # dict.update: in memory only, SettingsManager.update would rewrite settings.json
    events.events.enabled = False
    data_utils.check_font = plotting.check_font = lambda *a, **k: None  # would download Arial.ttf
    # Ultralytics trains on cpu_count - 1 threads (1 on 2 cores); use the caller's count, as edgeprune does
    saved_threads, torch_utils.NUM_THREADS = torch_utils.NUM_THREADS, torch.get_num_threads()
    try:
        yield
    finally:
        torch_utils.NUM_THREADS = saved_threads
        dict.update(SETTINGS, saved_settings)
        events.events.enabled = saved_events
        data_utils.check_font, plotting.check_font = saved_fonts
        if saved_key is not None:
            os.environ["ULTRALYTICS_API_KEY"] = saved_key


@contextlib.contextmanager
def _preserve_global_state():
    """Restore RNG states and torch's determinism switches that the trainer changes globally."""
    import numpy as np
    import torch

    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    env = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")}
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        torch.utils.deterministic.fill_uninitialized_memory = fill
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _make_trainer_class():
    """Build the DetectionTrainer subclass (imports ultralytics lazily, after the environment is set)."""
    import ultralytics.data.build as data_build
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import LOGGER

    class _RedirectedCacheDataset(data_build.YOLODataset):
        """YOLODataset whose label-scan ``*.cache`` lives in ``label_cache_dir``, not next to the labels."""

        label_cache_dir: Path | None = None

        def _load_or_scan_cache(self, cache_path, cache_hash):
            src = str(Path(cache_path).resolve())
            target = self.label_cache_dir / f"{hashlib.sha1(src.encode()).hexdigest()[:12]}_{Path(src).name}"
            return super()._load_or_scan_cache(target, cache_hash)

    class InMemoryDetectionTrainer(DetectionTrainer):
        """DetectionTrainer that trains a given DetectionModel object instead of building one from YAML/.pt."""

        def __init__(self, model, label_cache_dir: Path, lr0: float | None, overrides: dict[str, Any]):
            self._given_model = model
            self._label_cache_dir = Path(label_cache_dir)
            self._lr0 = lr0
            super().__init__(overrides=overrides)

        # --- model: use the object, never rebuild, never load weights by name, no checkpoint/resume --------
        def get_model(self, cfg=None, weights=None, verbose=True):
            return self._given_model

        def setup_model(self):
            model = self.get_model()
            head = model.model[-1]
            if int(head.nc) != int(self.data["nc"]):
                raise ValueError(f"model has nc={head.nc} but dataset has nc={self.data['nc']}")
            head.export = False  # export mode makes eval forward return only y: the val loss needs (y, preds)
            model.criterion = None  # rebuilt lazily from model.args, which set_model_attributes() sets to self.args
            self.model = model
            return None  # no checkpoint: resume_training() and optimizer/EMA state restore are skipped

        # --- dataset: keep Ultralytics' label cache out of the dataset folder -------------------------------
        def build_dataset(self, img_path, mode="train", batch=None):
            cls = type("YOLODataset", (_RedirectedCacheDataset,), {"label_cache_dir": self._label_cache_dir})
            self._label_cache_dir.mkdir(parents=True, exist_ok=True)
            orig, data_build.YOLODataset = data_build.YOLODataset, cls
            try:
                return super().build_dataset(img_path, mode, batch)
            finally:
                data_build.YOLODataset = orig

        # --- optimizer: 'auto' ignores lr0; honour an explicit lr0 by rescaling the auto choice -------------
        def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
            optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
            if self._lr0 is not None and float(self.args.lr0) != float(self._lr0):
                scale = float(self._lr0) / float(self.args.lr0)  # keeps MuSGD's 3x head groups proportional
                for group in optimizer.param_groups:
                    group["lr"] *= scale
                LOGGER.info(f"optimizer: lr0={self._lr0} given, scaling {type(optimizer).__name__} lr by {scale:.4g}")
                self.args.lr0 = float(self._lr0)
            return optimizer

        # --- final eval: Ultralytics re-loads best.pt (an FP16 pickle) and validates it again; skip it ------
        def final_eval(self):
            return None

    return InMemoryDetectionTrainer


def plain_ultralytics_finetune(
    model,
    data_yaml: str,
    epochs: int,
    imgsz: int,
    batch: int,
    workdir: str,
    lr0: float | None = None,
    seed: int = 0,
    fraction: float = 1.0,
    *,
    device: str = "cpu",
) -> tuple[list[dict], Any]:
    """Fine-tune ``model`` (an ``ultralytics.nn.tasks.DetectionModel`` object) with Ultralytics' trainer.

    Args:
        model: the DetectionModel to train; trained in place (see module docstring), never rebuilt.
        data_yaml: Ultralytics dataset YAML; its ``nc`` must equal the model head's ``nc``.
        epochs, imgsz, batch: as Ultralytics' ``epochs``, ``imgsz``, ``batch``.
        workdir: every file Ultralytics writes goes below it (created if missing).
        lr0: initial learning rate. None keeps Ultralytics' 'auto' choice (AdamW at lr 0.002*5/(4+nc) below
            10k iterations, otherwise MuSGD at 0.01); a value rescales the auto-chosen optimizer's lr to it.
        seed: Ultralytics ``seed`` (deterministic=True).
        fraction: Ultralytics ``fraction``: the first ``round(fraction * N)`` training images (sorted by
            name); validation always uses the whole val split.
        device: torch device string, 'cpu' by default; training stays FP32 (amp=False) anywhere.

    Returns:
        ``(history, model)``: one dict per epoch (mAP in percent) and the final EMA model (FP32, eval mode).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    offline_env(workdir)

    import torch

    trainer_cls = _make_trainer_class()
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    overrides = {
        "task": "detect",
        "mode": "train",
        "model": _MODEL_PLACEHOLDER,
        "data": str(Path(data_yaml).resolve()),
        "epochs": int(epochs),
        "imgsz": int(imgsz),
        "batch": int(batch),
        "fraction": fraction,
        "seed": int(seed),
        "deterministic": True,
        "device": device,
        "workers": 0,
        "amp": False,
        "plots": False,
        "val": True,
        "cache": False,
        "project": str(workdir / "runs"),
        "name": _RUN_NAME,
        "exist_ok": True,
    }
    if lr0 is not None:
        overrides["lr0"] = float(lr0)

    history: list[dict] = []
    marks: dict[str, float] = {}

    def on_train_epoch_start(trainer):
        marks["train_start"] = time.perf_counter()

    def on_train_epoch_end(trainer):
        marks["train_end"] = time.perf_counter()

    def on_fit_epoch_end(trainer):
        m = trainer.metrics or {}
        loss_items = trainer.tloss or {}
        history.append(
            {
                "epoch": int(trainer.epoch) + 1,
                "map50_95": 100.0 * float(m.get("metrics/mAP50-95(B)", float("nan"))),
                "map50": 100.0 * float(m.get("metrics/mAP50(B)", float("nan"))),
                "precision": 100.0 * float(m.get("metrics/precision(B)", float("nan"))),
                "recall": 100.0 * float(m.get("metrics/recall(B)", float("nan"))),
                "fitness": None if trainer.fitness is None else float(trainer.fitness),
                "train_loss": {k: float(v) for k, v in loss_items.items()},
                "val_loss": {k: float(v) for k, v in m.items() if k.startswith("val/")},
                "lr": dict(getattr(trainer, "lr", {}) or {}),
                "train_images": len(trainer.train_loader.dataset),
                "val_images": len(trainer.test_loader.dataset),
                "train_s": marks.get("train_end", float("nan")) - marks.get("train_start", float("nan")),
                "epoch_s": float(trainer.epoch_time) if trainer.epoch_time is not None else float("nan"),
            }
        )

    with _preserve_global_state(), _offline_sandbox():
        trainer = trainer_cls(model, workdir / "label_cache", lr0, overrides)
        trainer.add_callback("on_train_epoch_start", on_train_epoch_start)
        trainer.add_callback("on_train_epoch_end", on_train_epoch_end)
        trainer.add_callback("on_fit_epoch_end", on_fit_epoch_end)
        trainer.train()
        final = trainer.ema.ema

    # Make the returned EMA model reusable outside Ultralytics' validator (see module docstring).
    final.criterion = None  # built inside validation under inference_mode: its tensors can't join autograd
    head = final.model[-1]
    head.shape = None  # force anchors/strides to be rebuilt; the cached ones are inference tensors
    for attr in ("anchors", "strides"):
        if isinstance(getattr(head, attr, None), torch.Tensor):
            setattr(head, attr, torch.empty(0))
    for name, p in final.named_parameters():
        p.requires_grad_(grad_flags.get(name, True))
    final.float().eval()
    return history, final
