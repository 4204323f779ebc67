"""A memory and time limit around DepGraph tracing.

Torch-Pruning traces a model by running it under autograd and walking the graph in Python; on large
models (MaxViT-T: over 17 GB) that alone can exhaust the machine, and the kernel's OOM killer ends
the process without a word. `trace_guard` watches the process from a daemon thread and stops the
tracing thread with an exception instead, which becomes a one-line `EdgePruneError`.
"""
from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
import time
from pathlib import Path

from ..errors import EdgePruneError

POLL_S = 0.1  # how often the watchdog reads the process's memory and the clock
DEFAULT_MEMORY_SHARE = 0.8  # without prune.trace_memory_gb: this share of the memory available at entry
GB = 1024**3
ADVICE = "raise the limit, prune a smaller model, or ignore its heavy blocks"


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


def _async_raise(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Schedule `exc_type` in thread `thread_id` (None: clear a scheduled one)."""
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)
    if done > 1:  # cannot happen for a live thread id; undo rather than hit other threads
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


class trace_guard:  # noqa: N801 - used as a context manager, like contextlib's
    """`with trace_guard("resnet18", memory_gb, timeout_s): ...` stops the block with an
    `EdgePruneError` once the process's memory grows more than `memory_gb` above its level at entry
    (None: 80% of the memory available then) or the block runs longer than `timeout_s` (None: no limit).

    The limit is raised in the entering thread between Python bytecodes, which tracing runs plenty of.
    It is raised again at every poll while the block still runs, since Torch-Pruning's tracer has a bare
    `except:` that can swallow one. Leaving the block stops the watchdog under a lock and clears any
    exception still scheduled, so none can arrive after the block; one arriving while leaving is
    converted like one arriving inside it.
    """

    def __init__(self, what: str, memory_gb: float | None = None, timeout_s: float | None = None):
        self.what, self.memory_gb, self.timeout_s = what, memory_gb, timeout_s
        self.detail: str | None = None  # set by the watchdog when a limit is passed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False

    def __enter__(self) -> trace_guard:
        self._thread_id = threading.get_ident()
        self._start_rss = rss_bytes()
        self._start = time.monotonic()
        if self.memory_gb is not None:
            self._limit_bytes, self._limit_text = self.memory_gb * GB, "(limit prune.trace_memory_gb)"
        else:
            available = available_bytes()
            self._limit_bytes = None if available is None else DEFAULT_MEMORY_SHARE * available
            self._limit_text = (f"({DEFAULT_MEMORY_SHARE:.0%} of the memory available when it started; "
                                "set prune.trace_memory_gb)")
        if self._limit_bytes is None and self.timeout_s is None:
            self._closed = True  # nothing to watch
            return self
        self._watchdog = threading.Thread(target=self._watch, name=f"trace-guard {self.what}", daemon=True)
        self._watchdog.start()
        return self

    def _passed(self) -> str | None:
        if self.timeout_s is not None and time.monotonic() - self._start > self.timeout_s:
            return (f"tracing {self.what} with DepGraph took longer than {self.timeout_s:g} s "
                    f"(prune.trace_timeout_s); {ADVICE}")
        if self._limit_bytes is not None and rss_bytes() - self._start_rss > self._limit_bytes:
            return (f"tracing {self.what} with DepGraph used more than {self._limit_bytes / GB:.3g} GB of memory "
                    f"{self._limit_text}; {ADVICE}")
        return None

    def _watch(self) -> None:
        signal = None
        while not self._stop.wait(POLL_S):
            if signal is None:
                detail = self._passed()
                if detail is None:
                    continue
                signal = type("TracingLimitExceeded", (TracingLimitExceeded,), {"detail": detail})
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
