"""The accuracy budget (`prune.max_drop`): the most pruned model whose recovered accuracy stays within
X points of the unpruned model's.

Every trial is an ordinary run folder under `out/trials/` (prune, BN re-calibration, fine-tuning at the
recipe's budget), so an interrupted search resumes trial by trial. The search runs on the MACs
reduction, or on the latency measured on `prune.latency_runtime` (the fraction of the unpruned model's
that a trial removes, asked as a speed-up, 1 / (1 - fraction)), by regula falsi on the measured drop
between the most pruned passing trial and the least pruned failing one. Trials skip INT8 and the
per-layer profile; the chosen trial then runs them with the full recipe and its files are published in
`out/` (report, model, ONNX), with every trial in the report.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from . import rows
from .errors import EdgePruneError, UnreachableTarget
from .fsio import ensure_writable_dir, link_file, read_json, write_json
from .recipe import Recipe, apply_overrides, same_recipe
from .stages import INT8_NAME, ONNX_NAME

MAX_FRACTION = 0.9  # the most MACs (or latency) a trial removes
FIRST_FRACTION = 0.5  # the first trial, unless the recipe's target says otherwise
CLAMP = 0.15  # keep each guess this share of the bracket away from its ends
RESOLUTION = 0.02  # stop once the bracket is this narrow
# results a trial may take from an earlier one (same inputs)
SHARED_STAGES = ("sensitivity", "sensitivity_latency", "accuracy_baseline")
PUBLISHED = ("model.safetensors", "model.json", ONNX_NAME, INT8_NAME)


@dataclass
class BudgetTrial:
    name: str
    fraction: float  # MACs (or latency) removed, as asked
    overrides: dict
    macs: int | None
    latency_ms: float | None
    recovered: float | None  # the metric after the last recovery stage
    drop: float | None  # points below the unpruned model (None: the target could not be reached)
    within: bool
    note: str | None = None


def next_fraction(trials: list[BudgetTrial], max_drop: float, first: float) -> float | None:
    """The next fraction to try, or None when the bracket is narrow enough (or the cap passes)."""
    if not trials:
        return first
    passing = [t for t in trials if t.within]
    best = max(passing, key=lambda t: t.fraction, default=None)
    lo, lo_drop = (best.fraction, best.drop) if best else (0.0, 0.0)
    failing = [t for t in trials if not t.within and t.fraction > lo]
    if not failing:
        if lo >= MAX_FRACTION - RESOLUTION:
            return None
        return round(lo + (MAX_FRACTION - lo) / 2, 3)
    worst = min(failing, key=lambda t: t.fraction)
    hi, hi_drop = worst.fraction, worst.drop
    if hi - lo < RESOLUTION:
        return None
    if hi_drop is not None and hi_drop > lo_drop:
        guess = lo + (max_drop - lo_drop) * (hi - lo) / (hi_drop - lo_drop)
    else:  # an unreachable latency target: bisect
        guess = (lo + hi) / 2
    guess = min(max(guess, lo + CLAMP * (hi - lo)), hi - CLAMP * (hi - lo))
    guess = round(guess, 3)
    return None if any(abs(t.fraction - guess) < 1e-9 for t in trials) else guess


def search(recipe: Recipe, out: str | Path, quiet: bool = False, overwrite: bool = False,
           resume: bool = False) -> dict:
    """Run the accuracy-budget search of `recipe` in `out`; returns the chosen trial's report with every trial
    under `max_drop` (also written to out/report.json)."""
    from .distributed import runtime
    from .pipeline import preflight, run_stages, stderr_logger

    opts = recipe.prune
    if runtime().distributed:
        raise EdgePruneError("run --max-drop in one process (without torchrun)")
    preflight(recipe)
    root = ensure_writable_dir(out)
    resolved = recipe.model_dump(mode="json")
    if (root / "recipe.json").exists() and not same_recipe(read_json(root / "recipe.json"), recipe) and not overwrite:
        raise EdgePruneError(f"{root} holds a run of a different recipe; choose another --out or pass --overwrite")
    if overwrite:
        shutil.rmtree(root / "trials", ignore_errors=True)
        shutil.rmtree(root / "stages", ignore_errors=True)
        (root / "max_drop.json").unlink(missing_ok=True)
    write_json(root / "recipe.json", resolved)
    log = stderr_logger(quiet)
    state_file = root / "max_drop.json"
    by_latency = opts.max_drop_by == "latency"
    quick = {"int8.enabled": False, "latency.per_layer": False}
    trials: list[BudgetTrial] = []
    while (fraction := next_fraction(trials, opts.max_drop, FIRST_FRACTION)) is not None:
        if len(trials) == opts.max_drop_trials:
            break
        if by_latency:
            # a speed-up, which each trial judges against the unpruned model timed in its own run: a target in
            # ms from one reading moved with the load of a shared machine (30% between two processes here)
            name, overrides = f"latency-{fraction:.3f}", {"prune.target_speedup": round(1 / (1 - fraction), 4)}
        else:
            name, overrides = f"macs-{fraction:.3f}", {"prune.macs_reduction": fraction}
        folder = root / "trials" / name
        _share_stages(root / "trials", folder)
        log(f"max-drop trial {len(trials) + 1}/{opts.max_drop_trials}: {name}")
        full = apply_overrides(recipe, overrides)
        # the chosen trial of an earlier search: all its stages are there
        done_in_full = (folder / "recipe.json").exists() and same_recipe(read_json(folder / "recipe.json"), full)
        try:
            report = run_stages(full if done_in_full else apply_overrides(full, quick), folder, quiet=True,
                              resume=resume, changing=True)
        except UnreachableTarget as exc:  # past the latency floor: as good as too much pruning
            trials.append(BudgetTrial(name=name, fraction=fraction, overrides=overrides, macs=None, latency_ms=None,
                                      recovered=None, drop=None, within=False, note=str(exc)))
            log(f"{name}: {exc}")
            continue
        assert report is not None  # one process
        trials.append(_trial(name, fraction, overrides, report, opts.max_drop, opts.latency_runtime))
        t = trials[-1]
        log(f"{name}: {t.recovered:.2f} ({abs(t.drop):.2f} points {'below' if t.drop >= 0 else 'above'} the "
            "unpruned model): "
            f"{'within' if t.within else 'over'} the {opts.max_drop:g}-point budget")
    passing = [t for t in trials if t.within]
    summary = {"max_drop": opts.max_drop, "by": opts.max_drop_by, "metric": None, "baseline": None,
               "trials": [asdict(t) for t in trials], "chosen": None}
    if not passing:
        write_json(state_file, summary)
        least = min(trials, key=lambda t: t.fraction)
        lost = f"lost {least.drop:.2f}" if least.drop is not None else "could not be reached"
        raise EdgePruneError(f"no trial stayed within {opts.max_drop:g} points: the least pruned ({least.name}) "
                             f"{lost}; allow a larger --max-drop or more recovery (--epochs); the trials are in "
                             f"{root / 'trials'}")
    chosen = max(passing, key=lambda t: t.fraction)
    log(f"chosen: {chosen.name}; running its INT8 and profile stages as the recipe asks")
    final = run_stages(apply_overrides(recipe, chosen.overrides), root / "trials" / chosen.name, quiet=True,
                     resume=resume, changing=True)
    assert final is not None
    metric = rows.accuracy_keys(final["baseline"])[0][0]
    summary.update(metric=metric, baseline=final["baseline"][metric], chosen=chosen.name)
    write_json(state_file, summary)
    return publish(root, root / "trials" / chosen.name, final)


def chosen_trial(root: Path) -> Path | None:
    """The folder of the trial a finished `--max-drop` search in `root` chose (None: `root` holds no search)."""
    state = root / "max_drop.json"
    if not state.is_file():
        return None
    chosen = read_json(state).get("chosen")
    if chosen is None:
        raise EdgePruneError(f"the --max-drop search in {root} kept no trial, so there is no model to work on; its "
                             f"trials are in {root / 'trials'}")
    return root / "trials" / chosen


def publish(root: Path, trial: Path, final: dict) -> dict:
    """Make the chosen `trial`'s `final` report (with every trial, from max_drop.json) and its model and ONNX files
    the search folder's own; returns the report."""
    from .pipeline import write_report

    final = {**final, "max_drop": read_json(root / "max_drop.json"), "recipe": read_json(root / "recipe.json")}
    _publish(trial, root)
    write_report(root, final)
    return final


def _trial(name: str, fraction: float, overrides: dict, report: dict, max_drop: float, runtime: str) -> BudgetTrial:
    metric = rows.accuracy_keys(report["baseline"])[0][0]
    recovered = report[rows.final_stage(report)][metric]
    drop = round(report["baseline"][metric] - recovered, 3)
    return BudgetTrial(name=name, fraction=fraction, overrides=overrides, macs=report["pruned"]["macs"],
                       latency_ms=report["pruned"]["latency_ms"].get(runtime), recovered=recovered, drop=drop,
                       within=drop <= max_drop)


def _share_stages(trials: Path, folder: Path) -> None:
    """Give a new trial folder the stored results that do not depend on the target (the sensitivity analysis,
    the unpruned model's accuracy) from an earlier trial: their fingerprints decide whether they are reused."""
    if (folder / "stages").exists() or not trials.is_dir():
        return
    for earlier in sorted(trials.iterdir()):
        records = [earlier / "stages" / f"{s}.json" for s in SHARED_STAGES]
        if not any(r.exists() for r in records):
            continue
        (folder / "stages").mkdir(parents=True, exist_ok=True)
        for record in [*records, earlier / "sensitivity.json"]:  # copied atomically, as every write
            if record.exists():
                write_json(folder / record.relative_to(earlier), read_json(record))
        return


def _publish(source: Path, root: Path) -> None:
    """The chosen trial's model and ONNX files in the search folder (hard links where possible)."""
    for name in PUBLISHED:
        if (source / name).exists():
            link_file(source / name, root / name)
        else:
            (root / name).unlink(missing_ok=True)
