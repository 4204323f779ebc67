"""The memory and time guard around DepGraph tracing: real tracing, real limits, no stray exceptions."""
import mmap
import threading
import time

import pytest
import torch
import torch.nn as nn

from edgeprune import EdgePruneError, create_model, prune
from edgeprune.pruning import TracingLimitExceeded, build_graph, trace_guard
from edgeprune.pruning.guard import POLL_S, available_bytes, memory_limit_bytes, rss_bytes
from edgeprune.recipe import PruneOptions

# Sixteen images: tracing resnet18 then takes several polls and grows the process by hundreds of MB,
# even on a fast machine whose allocator holds memory freed by earlier tests.
X224 = torch.randn(16, 3, 224, 224)


def busy(seconds: float) -> int:
    """Run Python bytecode (where an asynchronous exception is delivered) for `seconds`."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        n += 1
    return n


def test_a_tiny_memory_limit_stops_tracing_resnet18_with_one_line():
    with pytest.raises(EdgePruneError) as err:
        prune(create_model("resnet18"), PruneOptions(ratio=0.5, trace_memory_gb=0.005), example=X224)
    assert str(err.value) == ("tracing resnet18 with DepGraph used more than 0.005 GB of memory (limit "
                              "prune.trace_memory_gb); raise the limit, prune a smaller model, or ignore its heavy "
                              "blocks")
    assert isinstance(err.value.__cause__, TracingLimitExceeded)  # where tracing was, for --debug
    busy(3 * POLL_S)  # no stray exception arrives afterwards


def test_a_tiny_timeout_stops_tracing_resnet18_with_one_line():
    with pytest.raises(EdgePruneError) as err:
        prune(create_model("resnet18"), PruneOptions(ratio=0.5, trace_timeout_s=0.01), example=X224)
    assert str(err.value) == ("tracing resnet18 with DepGraph took longer than 0.01 s (prune.trace_timeout_s); "
                              "raise the limit, prune a smaller model, or ignore its heavy blocks")
    busy(3 * POLL_S)


def test_generous_limits_change_nothing_and_leave_no_watchdog():
    model = create_model("cifar_resnet20")
    before = {t.name for t in threading.enumerate()}
    _, free = prune(model, PruneOptions(ratio=0.5))
    pruned, guarded = prune(model, PruneOptions(ratio=0.5, trace_memory_gb=16, trace_timeout_s=600))
    assert guarded.history == free.history and pruned.layer1[0].conv1.out_channels == 8
    busy(3 * POLL_S)
    assert not [t for t in threading.enumerate() if t.name.startswith("trace-guard") and t.name not in before]


def test_the_default_memory_limit_is_a_share_of_the_available_memory():
    available = available_bytes()
    assert available > 2**28 and rss_bytes() > 2**24  # read from /proc: more than 256 MB free, 16 MB resident
    assert memory_limit_bytes(None) == pytest.approx(0.8 * available, rel=0.05)
    assert memory_limit_bytes(0.5) == 0.5 * 2**30


def resident(nbytes: int) -> mmap.mmap:
    """`nbytes` of fresh anonymous memory, every page touched: resident growth whatever malloc holds
    from earlier tests (a bytearray may reuse freed heap pages that are already resident)."""
    block = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_memory_growth_is_measured_from_the_level_at_entry():
    """A 64 MB block made and touched before the guard passes a 32 MB limit; one made inside does not."""
    held = resident(64 * 2**20)
    with trace_guard("held", 0.03125):
        busy(3 * POLL_S)
    grown = []
    with pytest.raises(EdgePruneError, match=r"tracing grow with DepGraph used more than 0.0312 GB of memory "
                                             r"\(limit prune.trace_memory_gb\)"):
        with trace_guard("grow", 0.03125):
            grown.append(resident(64 * 2**20))  # the guard stops the block here or in busy()
            busy(10)
    held.close()


def test_a_timeout_stops_pure_python_promptly():
    start = time.monotonic()
    with pytest.raises(EdgePruneError, match=r"tracing loop with DepGraph took longer than 0.2 s"):
        with trace_guard("loop", None, 0.2):
            busy(10)
    assert time.monotonic() - start < 0.2 + 5 * POLL_S


class SlowForward(nn.Module):
    """A conv whose every forward pass first runs Python for 3 s."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        busy(3)
        return self.conv(x)


def test_a_limit_torch_pruning_swallows_is_raised_again():
    """DependencyGraph's tracer runs the first forward pass inside a bare `except:` and, on any
    exception, runs it a second time: the limit is raised again there, not 3 s later."""
    model = SlowForward()
    start = time.monotonic()
    with pytest.raises(EdgePruneError, match="tracing SlowForward with DepGraph took longer than 0.2 s"):
        build_graph(model, torch.randn(1, 3, 8, 8), timeout_s=0.2)
    assert model.calls == 2  # the first signal was swallowed
    assert time.monotonic() - start < 0.2 + 10 * POLL_S
    busy(3 * POLL_S)


def test_a_swallowed_limit_is_still_reported_and_never_raised_again_outside_torch_pruning():
    with pytest.raises(EdgePruneError, match="took longer than 0.2 s"):
        with trace_guard("swallow", None, 0.2):
            try:
                busy(0.5)
            except BaseException:  # noqa: B036 - what the tracer does
                pass
            start = time.monotonic()
            busy(0.5)  # not Torch-Pruning's code: not interrupted again
            assert time.monotonic() - start >= 0.5
    with pytest.raises(EdgePruneError, match="took longer than 0.2 s"):
        with trace_guard("swallow-all", None, 0.2):  # finishes although it swallows every signal
            end = time.monotonic() + 1
            while time.monotonic() < end:
                try:
                    busy(end - time.monotonic())
                except BaseException:  # noqa: B036
                    pass


def test_no_exception_arrives_after_the_block_ends():
    """Blocks ending just before, at and after the limit: whatever happened inside, nothing fires outside."""
    outcomes = set()
    for i in range(16):
        limit = 0.1
        try:
            with trace_guard("race", None, limit):
                busy(limit + (i % 4 - 1.5) * POLL_S / 2)  # from 0.075 s before to 0.075 s after the limit
            outcomes.add("finished")
        except EdgePruneError:
            outcomes.add("stopped")
        busy(2 * POLL_S)  # an exception scheduled late would arrive here and fail the test
    assert outcomes == {"finished", "stopped"}


def test_build_graph_takes_the_limits():
    with pytest.raises(EdgePruneError, match="tracing resnet18 with DepGraph took longer than 0.01 s"):
        build_graph(create_model("resnet18"), X224, timeout_s=0.01)
    graph = build_graph(create_model("cifar_resnet20"), torch.randn(1, 3, 32, 32), memory_gb=8, timeout_s=600)
    assert len([m for m in graph.module2node if isinstance(m, torch.nn.Conv2d)]) == 19
    busy(3 * POLL_S)
