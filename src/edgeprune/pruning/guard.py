"""A memory and time limit around DepGraph tracing.

Torch-Pruning traces a model by running it under autograd and walking the graph in Python; on large
models (MaxViT-T: over 17 GB) that alone can exhaust the machine, and the kernel's OOM killer ends
the process without a word. `trace_guard` watches the process from a daemon thread and stops the
tracing thread with an exception instead, which becomes a one-line `EdgePruneError`.
"""
from __future__ import annotations

import ctypes
import functools
import os
import resource
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import torch_pruning as tp

from ..errors import EdgePruneError

POLL_S = 0.1  # how often the watchdog reads the process's memory and the clock
DEFAULT_MEMORY_SHARE = 0.8  # without prune.trace_memory_gb: this share of the memory available at entry
GB = 1024**3
ADVICE = "raise the limit, prune a smaller model, or ignore its heavy blocks"
TORCH_PRUNING_DIR = Path(tp.__file__).resolve().parent


class TracingLimitExceeded(EdgePruneError):
    """Raised asynchronously in the tracing thread when it passes a limit.

    The watchdog raises a subclass made at that moment whose class attribute `detail` is the message
    (an asynchronous exception is raised from its class, without arguments), so that even one
    escaping the guard reads as the one-line error it stands for.
    """

    detail = "DepGraph tracing passed its memory or time limit"

    def __str__(self) -> str:
        return self.detail


def rss_bytes() -> int:
    """The process's resident memory now (Linux), or its peak where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@functools.lru_cache(maxsize=4096)
def in_torch_pruning(filename: str) -> bool:
    """Whether `filename` (a code object's) is part of the Torch-Pruning package."""
    return Path(filename).resolve().is_relative_to(TORCH_PRUNING_DIR)


def memory_limit_bytes(memory_gb: float | None) -> float | None:
    """How much the process may grow while tracing: `memory_gb`, or by default DEFAULT_MEMORY_SHARE of the
    memory available now (None where that cannot be read: no memory limit)."""
    if memory_gb is not None:
        return memory_gb * GB
    available = available_bytes()
    return None if available is None else DEFAULT_MEMORY_SHARE * available


def _async_raise(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Schedule `exc_type` in thread `thread_id` (None: clear a scheduled one)."""
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)
    if done > 1:  # cannot happen for a live thread id; undo rather than hit other threads
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


class TraceGuard:
    """See `trace_guard`."""

    def __init__(self, what: str, memory_gb: float | None = None, timeout_s: float | None = None):
        self.what, self.memory_gb, self.timeout_s = what, memory_gb, timeout_s
        self.detail: str | None = None  # set by the watchdog when a limit is passed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = True
        self._frame: FrameType | None = None

    def __enter__(self) -> TraceGuard:
        self._thread_id = threading.get_ident()
        self._start_rss = rss_bytes()
        self._start = time.monotonic()
        self._limit_bytes = memory_limit_bytes(self.memory_gb)
        self._limit_text = ("(limit prune.trace_memory_gb)" if self.memory_gb is not None else
                            f"({DEFAULT_MEMORY_SHARE:.0%} of the memory available when it started; "
                            "set prune.trace_memory_gb)")
        if self._limit_bytes is None and self.timeout_s is None:
            return self  # nothing to watch
        self._frame = sys._getframe(1)  # the frame running the with statement
        self._closed = False
        threading.Thread(target=self._watch, name=f"trace-guard {self.what}", daemon=True).start()
        return self

    def _passed(self) -> str | None:
        if self.timeout_s is not None and time.monotonic() - self._start > self.timeout_s:
            return (f"tracing {self.what} with DepGraph took longer than {self.timeout_s:g} s "
                    f"(prune.trace_timeout_s); {ADVICE}")
        if self._limit_bytes is not None and rss_bytes() - self._start_rss > self._limit_bytes:
            return (f"tracing {self.what} with DepGraph used more than {self._limit_bytes / GB:.3g} GB of memory "
                    f"{self._limit_text}; {ADVICE}")
        return None

    def _where(self) -> tuple[bool, bool]:
        """(whether the guarded thread still runs the with statement's frame, and whether it is inside
        Torch-Pruning's code called from there)."""
        frame, tracing = sys._current_frames().get(self._thread_id), False
        while frame is not None and frame is not self._frame:
            tracing = tracing or in_torch_pruning(frame.f_code.co_filename)
            frame = frame.f_back
        return frame is not None, tracing

    def _watch(self) -> None:
        signal = None
        while not self._stop.wait(POLL_S):
            if signal is None:
                detail = self._passed()
                if detail is None:
                    continue
                signal = type("TracingLimitExceeded", (TracingLimitExceeded,), {"detail": detail})
            else:  # signalled before: again only while the tracer (which may have swallowed it) still runs
                running, tracing = self._where()
                if not running:
                    return
                if not tracing:
                    continue
            with self._lock:
                if self._closed:
                    return
                self.detail = signal.detail
                _async_raise(self._thread_id, signal)

    def _close(self) -> None:
        """Stop the watchdog and clear a scheduled exception; safe to repeat."""
        with self._lock:
            if not self._closed:
                self._closed = True
                _async_raise(self._thread_id, None)
        self._stop.set()
        self._frame = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._close()
        except TracingLimitExceeded as late:  # scheduled just before the lock was taken
            exc = exc if isinstance(exc, TracingLimitExceeded) else late
            self._close()
        if self.detail is None and not isinstance(exc, TracingLimitExceeded):
            return False
        # Passed a limit: whatever the block raised (or nothing, if tracing swallowed the signal), the
        # limit is the error; the exception it interrupted stays in the chain for --debug.
        raise EdgePruneError(self.detail or str(exc)) from exc


def trace_guard(what: str, memory_gb: float | None = None, timeout_s: float | None = None) -> TraceGuard:
    """`with trace_guard("resnet18", memory_gb, timeout_s): ...` stops the block with an
    `EdgePruneError` once the process's memory grows more than `memory_gb` above its level at entry
    (None: 80% of the memory available then) or the block runs longer than `timeout_s` (None: no limit).

    A daemon watchdog polls every POLL_S and raises `TracingLimitExceeded` in the entering thread,
    between Python bytecodes, of which tracing runs plenty. It raises it again at later polls while that
    thread is still inside Torch-Pruning's code, whose tracer has a bare `except:` that can swallow one,
    and never once the with statement's frame has returned. Leaving the block stops the watchdog under a
    lock and clears any exception still scheduled, so none can arrive after the block; one arriving
    while leaving is converted like one arriving inside it, and even one that escaped between the block's
    last bytecode and `__exit__` is an EdgePruneError with the same message.
    """
    return TraceGuard(what, memory_gb, timeout_s)
