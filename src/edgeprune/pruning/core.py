"""`prune`: a pruned copy of a model at a ratio, a MACs target or a measured latency target, with
what was done to it; and the checks that the result still runs."""
from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import EdgePruneError
from ..measure import count_macs, count_params
from ..quiet import quiet_stdout
from ..recipe import PruneOptions
from .guard import trace_guard
from .importance import GRADIENT_CRITERIA, calibration_grads, importance_for_grads
from .probe import LatencyProbe
from .rules import (
    TORCH_PRUNING_FAILURES,
    coupled_layers,
    model_name,
    out_channels,
    prunable_layers,
    raised_in_our_pruning,
    raised_in_torch_pruning,
    resolve_unpruned,
    unsupported,
)
from .search import search_allocation, search_allocation_latency, search_latency, search_macs
from .sensitivity import Sensitivity


@dataclass
class LayerWidth:
    name: str
    kind: str
    channels_before: int
    channels_after: int


@dataclass
class PruneResult:
    ratio: float
    importance: str
    global_pruning: bool
    round_to: int | None
    macs_target: int | None
    search_trials: int
    history: list = field(repr=False)
    layers: list[LayerWidth] = field(default_factory=list)
    unpruned: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    latency_search: dict | None = None  # with a latency target: the baseline and every measured trial
    allocation: str = "uniform"
    group_ratios: dict[str, float] | None = None  # allocation sensitivity: the ratio of each pruned group
    predicted_distortion: float | None = None  # allocation sensitivity: summed KL of the chosen points (nats)
    steps: int = 1  # prune.steps: the widths above reached in this many steps
    rounding: dict | None = None  # round_to auto: every multiple tried, timed, and why the chosen one won

    def to_dict(self) -> dict:
        return asdict(self)


def prune_copy(model: nn.Module, example: torch.Tensor, opts: PruneOptions, ratio: float,
               unpruned: Iterable[str], grads: dict[str, torch.Tensor],
               ratios: dict[str, float] | None = None) -> tuple[nn.Module, list]:
    """A copy of `model` pruned at `ratio` with `opts` (the layers in `unpruned` kept whole), ranked
    by `grads` for the gradient criteria; and its pruning history. `ratios` (group root layer: ratio)
    overrides `ratio` for those groups."""
    pruned = copy.deepcopy(model)
    for name, p in pruned.named_parameters():
        p.grad = grads[name].clone() if name in grads else None
    modules = dict(pruned.named_modules())
    importance = importance_for_grads(opts.importance)
    ignored = [modules[n] for n in unpruned]
    ratio_dict = {modules[n]: r for n, r in (ratios or {}).items()} or None
    try:
        with quiet_stdout(), trace_guard(model_name(pruned), opts.trace_memory_gb, opts.trace_timeout_s):
            pruner = tp.pruner.BasePruner(
                pruned, example, importance=importance, pruning_ratio=ratio,
                global_pruning=opts.global_pruning, round_to=opts.round_to,
                max_pruning_ratio=opts.max_layer_ratio, ignored_layers=ignored, pruning_ratio_dict=ratio_dict,
            )
            pruner.step()
    except TORCH_PRUNING_FAILURES as exc:  # Torch-Pruning raises bare errors on graphs it cannot handle
        if raised_in_our_pruning(exc):  # our importance criteria, which it calls back: a bug of ours
            raise
        raise unsupported(pruned, exc) from exc
    except TypeError as exc:
        if not raised_in_torch_pruning(exc):
            raise
        raise unsupported(pruned, exc) from exc
    finally:
        pruned.zero_grad(set_to_none=True)
    return pruned, pruner.pruning_history()


def check_runs(model: nn.Module, example: torch.Tensor, expected_shape: torch.Size) -> None:
    """The pruned model must still run and give the unpruned model's output shape."""
    try:
        with torch.no_grad():
            out = model(example)
    except TORCH_PRUNING_FAILURES as exc:
        raise unsupported(model, exc) from exc
    if out.shape != expected_shape:
        raise unsupported(model, RuntimeError(f"output shape {tuple(out.shape)} != {tuple(expected_shape)}"))


def prune(model: nn.Module, opts: PruneOptions, example: torch.Tensor | None = None,
          calibration: Iterable | None = None, latency_probe: LatencyProbe | None = None,
          log: Callable[[str], None] | None = None,
          sensitivity: Sensitivity | None = None) -> tuple[nn.Module, PruneResult]:
    """Return a pruned copy of `model` (the original is untouched) and what was done to it.

    `opts.allocation == "sensitivity"` needs `sensitivity`, the curves of `sensitivity.analyse` for this
    model and these options.

    A latency target (`opts.target_latency_ms` or `opts.target_speedup`) needs `latency_probe`, which measures
    a candidate model on the target runtime (see `edgeprune.pruning.OnnxLatencyProbe`); so does `round_to="auto"`
    with a ratio or MACs target, which prunes at each of `opts.round_to_candidates` and keeps the fastest.
    """
    if opts.round_to == "auto" and not opts.latency_targeted():
        return _auto_round_to(model, opts, example, calibration, latency_probe, log, sensitivity)
    if opts.latency_targeted() and latency_probe is None:
        raise EdgePruneError("a latency target needs a latency probe (edgeprune.pruning.OnnxLatencyProbe)")
    if opts.allocation == "sensitivity" and sensitivity is None:
        raise EdgePruneError("allocation sensitivity needs a sensitivity analysis: give --data (or use "
                             "--allocation uniform)")
    spec = getattr(model, "edgeprune_spec", None)
    if example is None:
        if spec is None:
            raise EdgePruneError("pass example inputs for a model not built by edgeprune.create_model")
        example = spec.example_input()
    model = model.eval()
    with torch.no_grad():
        expected_shape = model(example).shape
    with warnings.catch_warnings(record=True) as caught, torch.enable_grad():  # DepGraph traces autograd
        warnings.simplefilter("always")
        pruned, result = _prune(model, example, expected_shape, opts, calibration, latency_probe,
                                log or (lambda msg: None), sensitivity)
    result.notes += list(dict.fromkeys(f"Torch-Pruning: {str(w.message).splitlines()[0]}" for w in caught
                                       if issubclass(w.category, UserWarning)))
    if spec is not None:
        pruned.edgeprune_spec = copy.deepcopy(spec)
    return pruned.eval(), result


AUTO_MIN_GAIN = 0.03  # round_to auto: rounding must make the model this much faster than unrounded; rounded
# candidates timed within it of the fastest count as equally fast
AUTO_MACS_SLACK = 0.05  # round_to auto: a rounded model's MACs within this share of the target's, either way


def _auto_round_to(model: nn.Module, opts: PruneOptions, example, calibration, probe: LatencyProbe | None,
                   log: Callable[[str], None] | None, sensitivity: Sensitivity | None) -> tuple[nn.Module, PruneResult]:
    """round_to auto for a ratio or MACs target: the target pruned without rounding, then each layer's width
    rounded to a multiple of each candidate (at least one multiple, at most its unpruned width), so that the
    allocation stays the target's: to the nearest multiple, or when that moves the MACs more than
    AUTO_MACS_SLACK from the target's, some widths the other way (`_balanced_widths`); a candidate that still
    misses does not meet the target. The others are timed side by side on the probe's runtime (`_choose`)."""
    if opts.allocation == "sensitivity":  # its curves are scored without rounding
        pruned, result = prune(model, opts.model_copy(update={"round_to": None}), example, calibration, None, log,
                               sensitivity)
        result.rounding = {"chosen": 1, "candidates": [], "runtime": None,
                           "why": "round_to auto: no channel rounding with sensitivity allocation (its per-group "
                                  "curves are scored at unrounded widths); set prune.round_to to round"}
        result.notes.append(result.rounding["why"])
        return pruned, result
    if probe is None:
        raise EdgePruneError("round_to auto times each channel multiple: pass a latency probe "
                             "(edgeprune.pruning.OnnxLatencyProbe) or a number")
    from .importance import GRADIENT_CRITERIA, calibration_grads
    from .schedule import layer_widths, prune_to_widths

    ex = example if example is not None else model.edgeprune_spec.example_input()
    plain, plain_result = prune(model, opts.model_copy(update={"round_to": None}), ex, calibration, None, log,
                                sensitivity)
    full, widths = layer_widths(model), layer_widths(plain)
    grads = {}
    if opts.importance in GRADIENT_CRITERIA:
        grads, _ = calibration_grads(model, ex, opts.importance, calibration, opts.calibration_batches)
    with torch.no_grad():
        expected = model.eval()(ex).shape
    base_macs, plain_macs = count_macs(model, ex), count_macs(plain, ex)
    base_params = count_params(model)
    # The target's MACs: a MACs target's; for a ratio, what the ratio leaves without rounding.
    goal = base_macs * (1 - opts.macs_reduction) if opts.macs_reduction is not None else plain_macs

    def build(rounded: dict[str, int]) -> _Built:
        with torch.enable_grad():
            pruned, history = prune_to_widths(model, ex, opts, rounded, plain_result.unpruned, grads)
        check_runs(pruned, ex, expected)
        return _Built(rounded, pruned.eval(), history, count_macs(pruned, ex))

    @functools.cache
    def groups() -> list[list[str]]:  # traced once, when a nearest rounding first misses the target
        return coupled_layers(model, ex, plain_result.unpruned, opts)

    tried, macs, nearest = {}, {}, {}
    for multiple in opts.round_to_candidates:
        if multiple == 1:
            tried[1], macs[1], nearest[1] = (plain, plain_result), plain_macs, True
            continue
        nearest[multiple], (rounded, pruned, history, macs[multiple]) = _balanced_widths(
            widths, full, multiple, goal, build, groups)
        result = copy.deepcopy(plain_result)
        result.history, result.round_to = [list(h) for h in history], multiple
        result.layers = [LayerWidth(la.name, la.kind, la.channels_before, rounded[la.name]) for la in result.layers]
        tried[multiple] = (pruned, result)
    eligible = ([m for m in sorted(tried) if m == 1 or abs(macs[m] / goal - 1) <= AUTO_MACS_SLACK]
                or [min(tried)])
    compare = getattr(probe, "compare", None)
    models = {str(m): tried[m][0] for m in eligible}
    times = compare(models) if compare else {k: probe(m) for k, m in models.items()}
    first = eligible[0]
    chosen, tied = _choose(eligible, {m: times[str(m)] for m in eligible}, macs)

    params = {m: count_params(tried[m][0]) for m in tried}

    def removed(m: int) -> str:
        return f"{100 * (1 - macs[m] / base_macs):.1f}% of the MACs"

    def removed_params(m: int) -> str:
        return f"{100 * (1 - params[m] / base_params):.1f}% of the parameters"

    listed = ", ".join(f"{m}: {times[str(m)]:.2f} ms" for m in eligible) + f" on {probe.runtime}"
    missed = [m for m in sorted(tried) if m not in eligible]
    if missed:
        listed += (f"; {', '.join(map(str, missed))} moved the MACs more than {AUTO_MACS_SLACK:.0%} from the "
                   "target's, not timed")
    how = ("" if nearest[chosen] else
           f"; the nearest multiples of {chosen} moved the MACs more than {AUTO_MACS_SLACK:.0%}, so some widths "
           "were rounded the other way")
    if chosen == first:
        why = (f"round_to auto kept {'no rounding' if first == 1 else first} ({listed}): no "
               f"larger multiple was {AUTO_MIN_GAIN:.0%} faster{how}")
    else:
        others = [m for m in tied if m != chosen]
        tie = "" if not others else (
            f"; {', '.join(map(str, others))} timed within {AUTO_MIN_GAIN:.0%} of it but "
            f"{'keeps' if len(others) == 1 else 'keep'} fewer MACs: as fast, the least pruned won")
        why = (f"round_to auto chose {chosen}: {times[str(chosen)]:.2f} ms on {probe.runtime} against "
               f"{times[str(first)]:.2f} ms {'unrounded' if first == 1 else f'at {first}'} ({listed}); rounding "
               f"removes {removed(chosen)} against {removed(first)}, and {removed_params(chosen)} against "
               f"{removed_params(first)}{tie}{how}")
    if log:
        log(why)
    pruned, result = tried[chosen]
    result.rounding = {"chosen": chosen, "runtime": probe.runtime, "why": why,
                       "candidates": [{"round_to": m, "latency_ms": times.get(str(m)), "macs": macs[m],
                                       "params": params[m], "ratio": tried[m][1].ratio, "meets_target": m in eligible,
                                       "nearest": nearest[m]}
                                      for m in sorted(tried)]}
    result.notes.append(why)
    return pruned, result


def _choose(eligible: list[int], ms: dict[int, float], macs: dict[int, int]) -> tuple[int, list[int]]:
    """round_to auto's choice among the multiples that meet the target (`eligible`, smallest first; 1, unrounded,
    when it is one) from their timed `ms`: the first when no other is AUTO_MIN_GAIN faster than it (rounding
    moves the target, so it must buy speed); else, of the others that are, those timed within AUTO_MIN_GAIN of
    the fastest count as equally fast, and the one keeping the most MACs (the least pruned; on a tie, the
    smaller multiple) wins: as fast, with more of the model. Returns (the choice, those equally fast)."""
    first = eligible[0]
    faster = [m for m in eligible[1:] if ms[m] < ms[first] * (1 - AUTO_MIN_GAIN)]
    if not faster:
        return first, [first]
    best = min(ms[m] for m in faster)
    tied = [m for m in faster if ms[m] * (1 - AUTO_MIN_GAIN) <= best]
    return max(tied, key=lambda m: (macs[m], -m)), tied


class _Built(NamedTuple):
    """A candidate rounding pruned: its widths, the model, its pruning history and its MACs."""
    widths: dict[str, int]
    model: nn.Module
    history: list
    macs: int


def _balanced_widths(widths: dict[str, int], full: dict[str, int], multiple: int, goal: float,
                     build: Callable[[dict[str, int]], _Built],
                     groups: Callable[[], list[list[str]]]) -> tuple[bool, _Built]:
    """Each pruned width as a multiple of `multiple` (at least one, at most the unpruned width; layers left
    whole stay whole), with MACs close to `goal`: the nearest multiple when that lands within AUTO_MACS_SLACK
    of it. Otherwise each group of coupled layers (`groups()`) is rounded up or down by rank: the groups
    ordered by remainder, the first k rounded up and the others down (MACs only grow with k; the nearest
    rounding is one such k), k found by bisection towards the goal, and of the two either side of it the one
    landing closer wins. `build(widths)` prunes to them. Returns whether the nearest rounding was kept, and
    what `build` gave for the chosen widths."""
    def rounded(up: set[str]) -> dict[str, int]:
        return {n: w if w == full[n] else
                min(full[n], max(multiple, multiple * (-(-w // multiple) if n in up else w // multiple)))
                for n, w in widths.items()}

    kept = build(rounded({n for n, w in widths.items() if w != full[n] and 2 * (w % multiple) >= multiple}))
    if abs(kept.macs / goal - 1) <= AUTO_MACS_SLACK:
        return True, kept
    odd = {n for n, w in widths.items() if w != full[n] and w % multiple}
    units, placed = [], set()
    for names in groups():
        names = [n for n in names if n in odd and n not in placed]
        placed.update(names)
        units += [[n for n in names if widths[n] == w] for w in dict.fromkeys(widths[n] for n in names)]
    units += [[n] for n in sorted(odd - placed)]  # a group's layers share one width; others stand alone
    units.sort(key=lambda names: (-(widths[names[0]] % multiple), -widths[names[0]], names[0]))
    nearest = sum(2 * (widths[names[0]] % multiple) >= multiple for names in units)

    @functools.cache
    def at(k: int) -> _Built:  # the first k units rounded up, the others down
        return kept if k == nearest else build(rounded({n for names in units[:k] for n in names}))

    # Too many MACs: fewer groups rounded up than the nearest rounding does; too few: more.
    lo, hi = (0, nearest) if kept.macs > goal else (nearest + 1, len(units) + 1)
    while lo < hi:  # the fewest groups rounded up whose MACs pass the goal (len(units) + 1: none)
        mid = (lo + hi) // 2
        if at(mid).macs > goal:
            hi = mid
        else:
            lo = mid + 1
    best = at(min((k for k in (lo - 1, lo) if 0 <= k <= len(units)), key=lambda k: abs(at(k).macs / goal - 1)))
    return best.widths == kept.widths, best


def _prune(model: nn.Module, example: torch.Tensor, expected_shape: torch.Size, opts: PruneOptions,
           calibration: Iterable | None, probe: LatencyProbe | None,
           log: Callable[[str], None], sensitivity: Sensitivity | None = None) -> tuple[nn.Module, PruneResult]:
    unpruned = resolve_unpruned(model, example, opts)
    grads, synthetic = ({}, False)
    if opts.importance in GRADIENT_CRITERIA:
        grads, synthetic = calibration_grads(model, example, opts.importance, calibration, opts.calibration_batches)
    notes = []
    if synthetic:
        notes.append(f"{opts.importance} gradients came from random inputs labelled by the model itself; "
                     "pass calibration data for a meaningful ranking")

    def prune_at(source: nn.Module, trial_opts: PruneOptions, ratio: float, trial_grads: dict):
        return prune_copy(source, example, trial_opts, ratio, unpruned, trial_grads)

    def count(candidate: nn.Module) -> int:
        return count_macs(candidate, example)

    macs_target = None
    search = None
    allocation = None
    round_to = opts.round_to
    if opts.allocation == "sensitivity" and opts.latency_targeted():
        fixed = opts.model_copy(update={"round_to": opts.fixed_round_to()})  # auto: unrounded, as analysed
        allocation, search = search_allocation_latency(
            sensitivity, fixed, probe,
            lambda ratios: prune_copy(model, example, fixed, 0.0, unpruned, grads, ratios), count, log)
        ratio, pruned, history, trials = 0.0, allocation.model, allocation.history, allocation.trials
        round_to = opts.fixed_round_to()
        if allocation.note:
            notes.append(allocation.note)
        if opts.round_to == "auto":
            notes.append("round_to auto: no channel rounding with sensitivity allocation (its per-group curves "
                         "are scored at unrounded widths); set prune.round_to to round")
    elif opts.allocation == "sensitivity":
        if opts.ratio is not None:  # the MACs a uniform ratio would leave, spread by sensitivity instead
            macs_target = count(prune_at(model, opts.model_copy(update={"allocation": "uniform"}), opts.ratio,
                                         grads)[0])
        else:
            macs_target = int(count(model) * (1 - opts.macs_reduction))
        allocation = search_allocation(sensitivity, macs_target, opts,
                                       lambda ratios: prune_copy(model, example, opts, 0.0, unpruned, grads, ratios),
                                       count)
        ratio, pruned, history, trials = opts.ratio or 0.0, allocation.model, allocation.history, allocation.trials
        if allocation.note:
            notes.append(allocation.note)
    elif opts.ratio is not None:
        ratio = opts.ratio
        pruned, history = prune_copy(model, example, opts, ratio, unpruned, grads)
        trials = 1
    elif opts.latency_targeted():
        best, search = search_latency(model, opts, grads, probe, prune_at, count, log)
        ratio, pruned, history = best.ratio, best.model, best.history
        round_to = None if best.round_to == 1 else best.round_to
        trials = len(search["trials"])
    else:
        macs_target = int(count(model) * (1 - opts.macs_reduction))
        found = search_macs(model, opts, grads, macs_target, prune_at, count)
        ratio, pruned, history, trials = found.best.ratio, found.best.model, found.best.history, found.trials
        if found.note:
            notes.append(found.note)
    check_runs(pruned, example, expected_shape)
    before = prunable_layers(model)
    after = prunable_layers(pruned)
    layers = [LayerWidth(n, type(m).__name__, out_channels(m), out_channels(after[n])) for n, m in before.items()]
    if round_to and opts.allocation == "uniform" and not opts.latency_targeted():
        whole = [la.name for la in layers if la.name not in unpruned and la.channels_after == la.channels_before
                 and la.channels_before * (1 - ratio) < round_to]
        if whole:
            notes.append(f"{len(whole)} layers kept all their channels although they may be pruned (e.g. "
                         f"{', '.join(whole[:3])}): at ratio {ratio:.2f} their remaining width, under {round_to} "
                         f"channels, rounds down to zero with round_to {round_to}, and Torch-Pruning then leaves "
                         "them whole; lower the ratio or the multiple")
    result = PruneResult(ratio=ratio, importance=opts.importance, global_pruning=opts.global_pruning,
                         round_to=round_to, macs_target=macs_target, search_trials=trials,
                         history=[list(h) for h in history], layers=layers, unpruned=unpruned, notes=notes,
                         latency_search=search, allocation=opts.allocation,
                         group_ratios=allocation.ratios if allocation else None,
                         predicted_distortion=allocation.predicted_distortion if allocation else None)
    return pruned, result
