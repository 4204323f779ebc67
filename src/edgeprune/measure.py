"""Measurements of a model: parameters, MACs, sizes on disk and latency (PyTorch, ONNX Runtime and,
when it is installed, OpenVINO).

MACs follow Torch-Pruning's counter (`tp.utils.count_ops_and_params`, ptflops convention): one
multiply-accumulate per weight use in conv/linear layers, plus BatchNorm, activation and pooling
element operations; functional ops (`torch.add`, `F.pad`) are not counted.
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from tqdm.auto import tqdm

from .errors import EdgePruneError
from .quiet import quiet_stdout
from .recipe import SPIN_BLOCK, SPIN_SETTLE_S, LatencyOptions


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    with quiet_stdout():
        macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights serialized as safetensors (what a checkpoint costs on disk)."""
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def onnx_bytes(path: str | Path) -> int:
    """Size of an ONNX model including the external data files it references (`*.onnx.data`)."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in proto.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _summarize(times_s: list[float]) -> Latency:
    ms = np.asarray(times_s) * 1e3
    return Latency(median_ms=float(statistics.median(ms)), p90_ms=float(np.percentile(ms, 90)), runs=len(ms))


@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_runner(model: nn.Module, input_size, batch_size: int, device: str = "cpu") -> Callable[[], None]:
    """One eager forward pass in eval mode on `device` (synchronized on CUDA)."""
    x = torch.randn(batch_size, *input_size, device=device)
    model = model.eval().to(device)

    def run():
        with torch.inference_mode():
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return run


def ort_session(path: str | Path, threads: int, provider: str = "CPUExecutionProvider", spinning: bool = False,
                spin_us: int = 0, profile_prefix: str | None = None):
    """An ONNX Runtime session with `threads` intra-op threads and every graph optimization.

    How its worker threads wait for work: with `spinning`, they busy-wait until the next run (ONNX Runtime's
    default; they keep the cores busy for 50-100 ms after a run, another model's included: see
    `time_interleaved`); else with `spin_us` > 0 they busy-wait that many microseconds, then sleep
    (`session.intra_op.spin_duration_us`): awake between a run's operators, as with ONNX Runtime's default,
    asleep within a fraction of a millisecond after the run; with 0 they sleep as soon as they are idle, and
    every operator pays for waking them. `profile_prefix` turns ONNX Runtime's profiler on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning or spin_us > 0 else "0")
    if not spinning and spin_us > 0:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if provider not in ort.get_available_providers():
        raise EdgePruneError(f"ONNX Runtime provider {provider} is not available here")
    return ort.InferenceSession(str(path), so, providers=[provider])


def ort_waiting(latency: LatencyOptions) -> dict:
    """`ort_session`'s and `ort_runner`'s keywords for how workers wait, as `latency` asks."""
    return {"spinning": latency.ort_spinning, "spin_us": latency.ort_spin_us}


def ort_runner(path: str | Path, input_size, batch_size: int, threads: int,
               provider: str = "CPUExecutionProvider", spinning: bool = False, spin_us: int = 0) -> Callable[[], None]:
    """One ONNX Runtime run of the model at `path` (`ort_session`'s options); its `spins` attribute tells
    `time_interleaved` whether the session's workers busy-wait between runs."""
    sess = ort_session(path, threads, provider, spinning, spin_us)
    feed = {sess.get_inputs()[0].name:
            np.random.default_rng(0).standard_normal((batch_size, *input_size)).astype(np.float32)}

    def run():
        sess.run(None, feed)
    run.spins = spinning
    return run


def openvino_available() -> bool:
    """Whether OpenVINO (the optional `openvino` extra) can be imported."""
    try:
        require_openvino()
    except EdgePruneError:
        return False
    return True


def require_openvino():
    """The openvino module, or a one-line error saying how to install it.

    `import openvino` sends an "import" event to Google Analytics through the openvino-telemetry package
    unless the user opted out (measured with openvino 2026.4.1: a DNS lookup of www.google-analytics.com and
    ~/intel/openvino_ga_cid written). OpenVINO runs without that package (its model converter falls back to a
    stub), so edgeprune hides it from the import when OpenVINO is not loaded yet: nothing calls out."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: `import` raises ImportError
    try:
        import openvino
    except ImportError as exc:
        raise EdgePruneError("OpenVINO is not installed: pip install -e '.[openvino]' (or pip install openvino), "
                             "or pick another runtime") from exc
    return openvino


def ov_compiled(path: str | Path, threads: int, shape: tuple[int, ...] | None = None):
    """The ONNX model at `path` compiled by OpenVINO for the CPU: `threads` threads, one stream, FP32
    arithmetic wherever the model is in float (no bf16 or f16 shortcuts on CPUs that have them; a QDQ
    model's quantized ops still run in INT8). `shape` fixes the input's shape (faster than a dynamic batch)."""
    ov = require_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    if shape is not None:
        model.reshape(list(shape))
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                             "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})


def ov_runner(path: str | Path, input_size, batch_size: int, threads: int) -> Callable[[], None]:
    """One OpenVINO CPU inference of the model at `path`, its input shape fixed at (batch_size, *input_size)."""
    shape = (batch_size, *input_size)
    request = ov_compiled(path, threads, shape).create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return lambda: request.infer({0: x})


ONNX_RUNTIMES = {"ort_cpu": "ONNX Runtime", "ov_cpu": "OpenVINO"}


def onnx_runner(runtime: str, path: str | Path, input_size, opts: LatencyOptions) -> Callable[[], None]:
    """One CPU run of the ONNX file at `path` on `runtime` (`ort_cpu`, or `ov_cpu`), with `opts`' batch size,
    threads and ONNX Runtime waiting policy."""
    if runtime == "ov_cpu":
        return ov_runner(path, input_size, opts.batch_size, opts.threads)
    return ort_runner(path, input_size, opts.batch_size, opts.threads, **ort_waiting(opts))


def onnx_predictor(path: str | Path, runtime: str = "ort_cpu", threads: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """`predict(x)`: the first output of the ONNX model at `path` run by `runtime` (`ort_cpu` or
    `ov_cpu`) on a float32 batch, as a NumPy array of its own."""
    if runtime == "ov_cpu":
        request = ov_compiled(path, threads).create_infer_request()
        return lambda x: np.array(request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[0], copy=True)
    if runtime != "ort_cpu":
        raise ValueError(f"no ONNX runtime {runtime!r}; use one of {list(ONNX_RUNTIMES)}")
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: np.asarray(sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0])


def time_interleaved(runners: dict[str, Callable[[], None]], opts: LatencyOptions, quiet: bool = True,
                     desc: str = "latency") -> dict[str, Latency]:
    """Time several runners in turn, so load on a shared machine hits them all alike.

    Ratios between models measured in one call are what to compare; absolute ms drift between runs.
    After `opts.warmup` untimed runs of each, every turn runs one model `opts.settle_runs` times untimed (its
    weights back in cache after the others' turns), then times `opts.turn_runs` runs back to back, until each
    has `opts.repeats` timed runs. When a runner spins (`ort_runner(..., spinning=True)`: ONNX Runtime's workers
    busy-wait after a run for the next, its default) the untimed runs of a turn last at least SPIN_SETTLE_S and
    it times at least SPIN_BLOCK runs, so that no model is timed while the one before it still spins on the
    same cores.
    """
    spinning = any(getattr(fn, "spins", False) for fn in runners.values())
    block = max(opts.turn_runs, SPIN_BLOCK) if spinning else opts.turn_runs
    settle_s = SPIN_SETTLE_S if spinning and len(runners) > 1 else 0.0
    times: dict[str, list[float]] = {key: [] for key in runners}
    with torch_threads(opts.threads):
        for fn in runners.values():
            for _ in range(opts.warmup):
                fn()
        for turn in tqdm(range(math.ceil(opts.repeats / block)), desc=desc, leave=False, disable=quiet):
            for key, fn in runners.items():
                settle = time.perf_counter() + settle_s
                for _ in range(opts.settle_runs):
                    fn()
                while time.perf_counter() < settle:
                    fn()
                for _ in range(min(block, opts.repeats - turn * block)):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
    if spinning:
        time.sleep(SPIN_SETTLE_S)  # whatever is timed next does not pay for our workers' spinning
    return {key: _summarize(t) for key, t in times.items()}


@dataclass
class Measurement:
    """Everything `measure` reports about one model. Latencies are medians (p90 alongside)."""

    params: int
    macs: int
    state_dict_bytes: int
    onnx_bytes: int
    latency_ms: dict[str, float]
    latency_p90_ms: dict[str, float]
    latency_runs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def measure(models: dict[str, tuple[nn.Module, Path]], input_size, opts: LatencyOptions,
            quiet: bool = True) -> dict[str, Measurement]:
    """Params, MACs, sizes and latency of each `(model, exported onnx path)`, timed side by side.

    Latency keys: `torch_cpu`, `ort_cpu`, `ov_cpu` when OpenVINO is installed (and `opts.openvino`), and
    `torch_cuda` / `ort_cuda` when a GPU is there.
    """
    use_openvino = opts.openvino and openvino_available()
    runners: dict[str, Callable[[], None]] = {}
    cuda_runners: dict[str, Callable[[], None]] = {}
    use_cuda = opts.cuda and torch.cuda.is_available()
    for label, (model, onnx_path) in models.items():
        runners[f"{label}/torch_cpu"] = torch_runner(model, input_size, opts.batch_size)
        runners[f"{label}/ort_cpu"] = onnx_runner("ort_cpu", onnx_path, input_size, opts)
        if use_openvino:
            runners[f"{label}/ov_cpu"] = onnx_runner("ov_cpu", onnx_path, input_size, opts)
        if use_cuda:
            import onnxruntime as ort

            # A copy on the GPU: the CPU runner above keeps using the model itself, on the CPU.
            cuda_runners[f"{label}/torch_cuda"] = torch_runner(copy.deepcopy(model), input_size, opts.batch_size,
                                                               "cuda")
            if "CUDAExecutionProvider" in ort.get_available_providers():
                cuda_runners[f"{label}/ort_cuda"] = ort_runner(onnx_path, input_size, opts.batch_size,
                                                               opts.threads, "CUDAExecutionProvider")
    # Interleave models within one runtime only: PyTorch's OpenMP workers spin after a run, so
    # alternating runtimes would make each pay for the other's spinning.
    timed: dict[str, Latency] = {}
    for runtime in ("torch_cpu", "ort_cpu", "ov_cpu", "torch_cuda", "ort_cuda"):
        group = {k: fn for k, fn in {**runners, **cuda_runners}.items() if k.endswith("/" + runtime)}
        if group:
            timed.update(time_interleaved(group, opts, quiet, runtime))
    example = torch.randn(1, *input_size)
    results = {}
    for label, (model, onnx_path) in models.items():
        mine = {key.split("/", 1)[1]: lat for key, lat in timed.items() if key.split("/", 1)[0] == label}
        results[label] = Measurement(
            params=count_params(model), macs=count_macs(model, example),
            state_dict_bytes=state_dict_bytes(model), onnx_bytes=onnx_bytes(onnx_path),
            latency_ms={k: v.median_ms for k, v in mine.items()},
            latency_p90_ms={k: v.p90_ms for k, v in mine.items()}, latency_runs=opts.repeats,
        )
    return results
