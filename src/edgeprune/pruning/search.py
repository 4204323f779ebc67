"""Finding the channel ratio for a target: MACs (bisection, then a global touch-up) or measured latency
(regula falsi on milliseconds, per channel multiple, with re-checks of the winner).

The searches do not prune themselves: they call `prune_at(model, opts, ratio, grads)`, which returns a
pruned copy and its pruning history, and `count(model)`, which returns its MACs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import EdgePruneError, UnreachableTarget
from ..recipe import PruneOptions
from .importance import GRADIENT_CRITERIA
from .probe import LatencyProbe

PruneAt = Callable[[nn.Module, PruneOptions, float, dict], tuple[nn.Module, list]]
CountMacs = Callable[[nn.Module], int]

# MACs target
BISECT_STEPS = 20  # bisection steps per pass
ALLOCATION_STEPS = 8  # budget rescalings of a sensitivity allocation
LATENCY_BUDGET_RESOLUTION = 0.05  # a latency allocation's budget bracket stops halving this narrow (relative)
RATIO_RESOLUTION = 1e-4  # a pass stops once its ratio bracket is this narrow
GLOBAL_MAX_RATIO = 0.99  # upper end of the ratio under global pruning (max_layer_ratio bounds local pruning)
TOUCH_UP_MAX_RATIO = 0.5  # upper end of the global touch-up's ratio, applied to the uniformly pruned model
TOUCH_UP_IMPORTANCE = "l2"  # the touch-up's criterion when the recipe's needs gradients (it has none)

# latency target
FAR_RATIO_CAP = 0.9  # the most pruned candidate measured first, whatever max_layer_ratio allows
PROBE_GRID_OFFSETS = (0.1, 0.2)  # with channel rounding, also try the far ratio less these (fewest MACs wins)
REGULA_FALSI_STEPS = 8  # measured trials per channel multiple, at most
LATENCY_RATIO_RESOLUTION = 0.02  # stop narrowing once the ratio bracket is this narrow
BRACKET_CLAMP = 0.15  # keep each guess this share of the bracket away from its ends
MS_EPSILON = 1e-9  # guards the regula falsi slope against equal readings
RECHECKS = 5  # measurements of the winner, pruning it further while it misses the target
RECHECK_STEP = 0.02  # ratio added each time a re-check misses the target


@dataclass
class Trial:
    """One pruned candidate: its ratio, the model and its pruning history, and how it measured."""

    ratio: float
    model: nn.Module = field(repr=False)
    history: list = field(repr=False)
    macs: int
    distance: float | None = None  # MACs search: |macs - target| / target
    latency_ms: float | None = None  # latency search: the probe's reading
    round_to: int | None = None  # latency search: the channel multiple (1: none)


def closer(best: Trial | None, trial: Trial) -> Trial:
    """The trial nearer the MACs target; the earlier one on a tie."""
    return trial if best is None or trial.distance < best.distance else best


@dataclass
class Bisection:
    above: Trial | None  # the trial closest to the target among those with more MACs
    below: Trial | None  # ... among those with at most the target's MACs
    trials: int

    @property
    def best(self) -> Trial:
        return min((t for t in (self.above, self.below) if t), key=lambda t: t.distance)


def bisect(prune_at: Callable[[float], tuple[nn.Module, list]], count: CountMacs, target: int, hi: float,
           tolerance: float, steps: int = BISECT_STEPS) -> Bisection:
    """Bisect a pruning ratio in (0, hi) for MACs within `tolerance` of `target`."""
    lo, above, below, trials = 0.0, None, None, 0
    for _ in range(steps):
        ratio = (lo + hi) / 2
        model, history = prune_at(ratio)
        macs = count(model)
        trials += 1
        trial = Trial(ratio, model, history, macs, distance=abs(macs - target) / target)
        if macs > target:
            lo, above = ratio, closer(above, trial)
        else:
            hi, below = ratio, closer(below, trial)
        if trial.distance <= tolerance or hi - lo < RATIO_RESOLUTION:
            break
    return Bisection(above, below, trials)


@dataclass
class MacsSearch:
    best: Trial  # its ratio is the uniform one; after a touch-up, model and history include both passes
    trials: int
    note: str | None


def search_macs(model: nn.Module, opts: PruneOptions, grads: dict, target: int, prune_at: PruneAt,
                count: CountMacs) -> MacsSearch:
    """Bisect the channel ratio until the pruned model's MACs are within `tolerance` of `target`.

    A uniform (local) ratio moves in coarse steps: every layer loses a channel at once. When that
    misses the target, the closest model above it is pruned further by a global ranking, which
    removes single channels where they matter least, until the target is met. Detectors get no
    touch-up: on the trained YOLOv8n a global ranking left 0.0 mAP50-95 after BN re-calibration (12.6
    after an epoch) where the uniform model kept 13.1; the closest uniform model is kept instead.
    """
    hi = opts.max_layer_ratio if not opts.global_pruning else GLOBAL_MAX_RATIO
    uniform = bisect(lambda r: prune_at(model, opts, r, grads), count, target, hi, opts.tolerance)
    best, trials, note = uniform.best, uniform.trials, None
    detector = getattr(getattr(model, "edgeprune_spec", None), "task", "classify") == "detect"
    if best.distance > opts.tolerance and uniform.above is not None and not opts.global_pruning and not detector:
        first = uniform.above
        touch_up = opts.model_copy(update={"global_pruning": True, "importance": (
            opts.importance if opts.importance not in GRADIENT_CRITERIA else TOUCH_UP_IMPORTANCE)})
        more = bisect(lambda r: prune_at(first.model, touch_up, r, {}), count, target, TOUCH_UP_MAX_RATIO,
                      opts.tolerance)
        trials += more.trials
        refined = more.best
        if refined.distance < best.distance:
            best = Trial(first.ratio, refined.model, list(first.history) + list(refined.history), refined.macs,
                         distance=refined.distance)
            note = (f"a uniform ratio of {first.ratio:.4f} left {first.macs:,} MACs; a global {touch_up.importance} "
                    f"ranking removed channels down to {refined.macs:,}")
    if best.distance > opts.tolerance:
        note = (f"MACs target {target:,} not reachable within {opts.tolerance:.0%}; closest is {best.macs:,} "
                f"(channel rounding or un-prunable layers limit the granularity"
                f"{'; detectors are not touched up by a global ranking, which destroys them' if detector else ''})")
    return MacsSearch(best, trials, note)


def _target_and_goal(opts: PruneOptions, base: float, runtime: str) -> tuple[float, float]:
    """The latency target in ms (a speed-up target resolved against the unpruned model's `base` ms) and the
    search's goal, latency_margin below it; refused when the unpruned model already meets it."""
    target = opts.latency_goal_ms(base)
    if base <= target:
        raise EdgePruneError(f"the unpruned model already runs in {base:.2f} ms <= {target:g} ms on {runtime}; "
                             "nothing to prune (set a lower --target-latency-ms)")
    return target, target * (1 - opts.latency_margin)


def _aim(opts: PruneOptions, goal: float) -> str:
    """Where the search aims, when latency_margin puts it below the target."""
    return f" (aiming {opts.latency_margin:.0%} below it: {goal:.3g} ms)" if opts.latency_margin else ""


def _relax(opts: PruneOptions) -> str:
    return "ask for a smaller speed-up" if opts.target_speedup is not None else "raise the target"


def search_latency(model: nn.Module, opts: PruneOptions, grads: dict, probe: LatencyProbe, prune_at: PruneAt,
                   count: CountMacs, log: Callable[[str], None]) -> tuple[Trial, dict]:
    """The least-pruned model whose measured latency is within the target, and the search's record
    (JSON: target_ms, goal_ms, runtime, baseline_ms, chosen, trials; chosen's latency_ms is its last reading,
    after the re-checks).

    For each channel multiple (`round_to`, or with `auto` each of `round_to_candidates`), the most pruned model
    (ratio `max_layer_ratio`, at most FAR_RATIO_CAP, or less where rounding undoes it) is measured
    first, so an unreachable target fails fast; then the ratio is narrowed by regula falsi on measured
    milliseconds to LATENCY_RATIO_RESOLUTION. The candidate keeping the most MACs wins; it is measured
    again and pruned a little further while it misses the target.
    """
    base = probe.baseline_ms
    runtime = probe.runtime
    target, goal = _target_and_goal(opts, base, runtime)
    far_ratio = min(opts.max_layer_ratio, FAR_RATIO_CAP)
    multiples = opts.round_to_candidates if opts.round_to == "auto" else [opts.round_to or 1]
    records: list[dict] = []

    def with_multiple(multiple: int) -> PruneOptions:
        return opts.model_copy(update={"round_to": None if multiple == 1 else multiple})

    def at(ratio: float, multiple: int) -> Trial:
        pruned, history = prune_at(model, with_multiple(multiple), ratio, grads)
        ms = probe(pruned)
        macs = count(pruned)
        records.append({"ratio": round(ratio, 4), "round_to": multiple, "latency_ms": ms, "macs": macs,
                        "within_goal": ms <= goal})
        log(f"ratio {ratio:.3f}, round_to {multiple}: {ms:.2f} ms on {runtime} (aim {goal:.2f} ms), {macs:,} MACs")
        return Trial(ratio, pruned, history, macs, latency_ms=ms, round_to=multiple)

    def most_pruned(multiple: int) -> float:
        """The ratio with the fewest MACs near the top: with channel rounding, a very high ratio can
        round some layers' remaining width to zero, which Torch-Pruning answers by not pruning them."""
        if multiple == 1:
            return far_ratio
        grid = [r for r in (far_ratio, *(far_ratio - off for off in PROBE_GRID_OFFSETS)) if r > 0]
        return min(grid, key=lambda r: count(prune_at(model, with_multiple(multiple), r, grads)[0]))

    best: Trial | None = None
    for multiple in multiples:
        hi = at(most_pruned(multiple), multiple)
        if hi.latency_ms > goal:
            continue
        lo_ratio, lo_ms = 0.0, base
        for _ in range(REGULA_FALSI_STEPS):
            span = hi.ratio - lo_ratio
            if span <= LATENCY_RATIO_RESOLUTION:
                break
            guess = lo_ratio + span * (lo_ms - goal) / max(lo_ms - hi.latency_ms, MS_EPSILON)
            trial = at(min(max(guess, lo_ratio + BRACKET_CLAMP * span), hi.ratio - BRACKET_CLAMP * span), multiple)
            if trial.latency_ms <= goal:
                hi = trial
            else:
                lo_ratio, lo_ms = trial.ratio, trial.latency_ms
        if best is None or hi.macs > best.macs:
            best = hi
    if best is None:
        fastest = min(records, key=lambda t: t["latency_ms"])
        raise UnreachableTarget(
            f"cannot reach {opts.latency_target_text(base)} on {runtime}{_aim(opts, goal)}: the fastest model tried "
            f"(ratio {fastest['ratio']:.2f}, round_to {fastest['round_to']}) still takes "
            f"{fastest['latency_ms']:.2f} ms "
            f"(unpruned {base:.2f} ms); layers that are never pruned and per-run overhead set the floor. "
            f"{_relax(opts).capitalize()}, or let more layers be pruned (prune.max_layer_ratio, prune.ignore)")
    for _ in range(RECHECKS):  # a noisy first reading must not hand in a model over the target
        check = probe(best.model)
        records.append({"ratio": round(best.ratio, 4), "round_to": best.round_to, "latency_ms": check,
                        "macs": best.macs, "within_goal": check <= goal, "recheck": True})
        if check <= target or best.ratio >= far_ratio:
            break
        best = at(min(best.ratio + RECHECK_STEP, far_ratio), best.round_to)
    search = {"target_ms": target, "target_speedup": opts.target_speedup, "goal_ms": goal, "runtime": runtime,
              "baseline_ms": base,
              "chosen": {"ratio": best.ratio, "round_to": best.round_to, "latency_ms": records[-1]["latency_ms"],
                         "macs": best.macs},
              "trials": records}
    return best, search


@dataclass
class AllocationSearch:
    ratios: dict[str, float]
    predicted_distortion: float
    model: nn.Module
    history: list
    macs: int
    trials: int
    note: str | None


def search_allocation(sens, target: int, opts: PruneOptions, prune_at_ratios, count: CountMacs) -> AllocationSearch:
    """Sensitivity allocation for a MACs target: allocate an estimated budget of MACs to remove, prune
    with the per-group ratios, count the MACs for real, and rescale the budget until the pruned model is
    within `tolerance` of `target` (the estimate ignores layers thinned on both sides)."""
    from .sensitivity import allocate

    need = sens.macs - target
    budget, best, trials, tried = need, None, 0, []
    for _ in range(ALLOCATION_STEPS):
        ratios, predicted = allocate(sens, budget, opts.max_layer_ratio)
        if ratios in tried:  # the curves are spent (or the budget stopped moving)
            break
        tried.append(ratios)
        model, history = prune_at_ratios(ratios)
        macs = count(model)
        trials += 1
        found = AllocationSearch(ratios, predicted, model, history, macs, trials, None)
        if best is None or abs(macs - target) < abs(best.macs - target):
            best = found
        if abs(macs - target) / target <= opts.tolerance:
            break
        removed = sens.macs - macs
        budget = max(1, int(budget * need / removed)) if removed > 0 else max(1, budget) * 2
    best.trials = trials
    if best.macs > target * (1 + opts.tolerance):
        best.note = (f"sensitivity allocation left {best.macs:,} MACs for a target of {target:,}: every group at "
                     f"its largest scored ratio (<= {min(max(sens.ratios), opts.max_layer_ratio):g}) removes no "
                     "more; add larger prune.sensitivity_ratios or aim lower")
    elif abs(best.macs - target) / target > opts.tolerance:
        best.note = (f"sensitivity allocation left {best.macs:,} MACs for a target of {target:,} (channel counts "
                     "move in whole channels per group)")
    return best


def search_allocation_latency(sens, opts: PruneOptions, probe: LatencyProbe, prune_at_ratios,
                              count: CountMacs, log: Callable[[str], None]) -> tuple[AllocationSearch, dict]:
    """Sensitivity allocation for a latency target: allocate an estimated budget of milliseconds to save
    (each point's `latency_saved_ms`, its layers timed alone), prune with the per-group ratios, measure the
    whole model on the probe's runtime, and rescale the budget until it lands within the goal (the target
    less `latency_margin`) and close under it. The least-pruned model within the goal wins; it is measured
    again, and its budget raised while it misses the target. Returns it and the search's record (as
    `search_latency`'s)."""
    from .sensitivity import allocate

    base, runtime = probe.baseline_ms, probe.runtime
    target, goal = _target_and_goal(opts, base, runtime)
    if sens.latency_runtime is None:
        raise EdgePruneError("this sensitivity analysis holds no latency savings: a latency target needs its layers "
                             "timed (the run's sensitivity_latency stage does it)")
    if sens.latency_runtime != runtime:
        raise EdgePruneError(f"the sensitivity analysis timed its layers on {sens.latency_runtime}, the target is on "
                             f"{runtime}; run it again with prune.latency_runtime {runtime}")
    need = base - goal
    records: list[dict] = []
    best: AllocationSearch | None = None
    tried: list[dict] = []

    def at(budget: float) -> tuple[AllocationSearch, float] | None:
        ratios, predicted = allocate(sens, budget, opts.max_layer_ratio, by="latency")
        if ratios in tried:  # the curves are spent (or the budget stopped moving)
            return None
        tried.append(ratios)
        model, history = prune_at_ratios(ratios)
        ms, macs = probe(model), count(model)
        records.append({"budget_ms": round(budget, 4), "latency_ms": ms, "macs": macs, "within_goal": ms <= goal,
                        "predicted_distortion": predicted})
        log(f"sensitivity allocation saving {budget:.2f} ms (estimated): {ms:.2f} ms on {runtime} "
            f"(aim {goal:.2f} ms), {macs:,} MACs")
        return AllocationSearch(ratios, predicted, model, history, macs, len(records), None), ms

    # The budget (estimated ms to save) is bracketed: `short` left the model over the goal, `enough` met it.
    # Until both ends are known the estimate is rescaled by how far the measured saving fell from it; then
    # the bracket is halved, until it is LATENCY_BUDGET_RESOLUTION narrow or a trial lands close under the goal.
    budget, short, enough = need, 0.0, None
    for _ in range(ALLOCATION_STEPS):
        found = at(budget)
        if found is None:
            break
        trial, ms = found
        if ms <= goal:
            enough = budget if enough is None else min(enough, budget)
            if best is None or trial.macs > best.macs:
                best = trial
            if (goal - ms) / goal <= opts.latency_margin / 2:
                break  # close under the goal
        else:
            short = max(short, budget)
        saved = base - ms
        if enough is None:
            budget = max(budget * need / saved, budget * 1.05) if saved > 0 else budget * 2
        elif short == 0.0 and saved > 0:
            budget = budget * need / saved
        else:
            if (enough - short) <= LATENCY_BUDGET_RESOLUTION * enough:
                break
            budget = (short + enough) / 2
    if best is None:
        fastest = min(records, key=lambda t: t["latency_ms"])
        raise UnreachableTarget(
            f"cannot reach {opts.latency_target_text(base)} on {runtime}{_aim(opts, goal)} by sensitivity allocation: "
            f"the fastest model tried still takes {fastest['latency_ms']:.2f} ms (unpruned {base:.2f} ms); add larger "
            f"prune.sensitivity_ratios, {_relax(opts)}, or use allocation uniform")
    budget = records[best.trials - 1]["budget_ms"]
    for _ in range(RECHECKS):  # a noisy first reading must not hand in a model over the target
        check = probe(best.model)
        records.append({"budget_ms": budget, "latency_ms": check, "macs": best.macs, "within_goal": check <= goal,
                        "recheck": True})
        if check <= target:
            break
        budget *= 1.05
        found = at(budget)
        if found is None:
            break
        best = found[0]
    best.trials = len([r for r in records if not r.get("recheck")])
    last = records[-1]["latency_ms"]
    if last > target:
        best.note = (f"the chosen model last measured {last:.2f} ms on {runtime}, over the {target:g} ms target (a "
                     "noisy machine, or the curves are spent); lower the target or add larger sensitivity ratios")
    search = {"target_ms": target, "target_speedup": opts.target_speedup, "goal_ms": goal, "runtime": runtime,
              "baseline_ms": base,
              "chosen": {"ratio": None, "round_to": opts.fixed_round_to() or 1, "latency_ms": last,
                         "macs": best.macs},
              "trials": records}
    return best, search
