"""`fastreplay window`: how far back do the scores of this run hold?

Exact scores predict retraining only where the training run responds smoothly to its data
weights, and a run from scratch at high accuracy is chaotic beyond about its last epoch: each
epoch in the attribution window compounds the perturbation. Which window a user can attribute is
a property of their run, so it is measured, not guessed: for each candidate window (the last 1,
2, 4, ... epochs, or a given list) the replay-free screen of workflows/smoothness.py retrains the
window four times (determinism, then the weights w = 1 and w = 1 + h v for h = 1/2, 1 along one
LDS-like direction) and gives the metasmoothness S and the curvature ratio. No scores and no
replay are needed: the stored run's checkpoints give every window's starting state, because the
window is not part of the trajectory (its fingerprint).

The recommendation is the longest window whose run is deterministic and whose S reaches
``min_s``. S is a screen, not a promise: it orders windows and recipes of one family as LDS
does, but the S that goes with LDS 0.9 differs between families (DEFAULT_MIN_S, in
interface/arguments.py, says on what evidence the default stands); `fastreplay lds` on the chosen
window is the proof.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config import ReplayConfig
from ..core.batches import first_attributed_step
from ..core.recipe import Recipe
from ..exceptions import ConfigError
from ..interface.arguments import DEFAULT_MIN_S
from ..progress import log
from .smoothness import check_smoothness

@dataclass
class WindowRow:
    epochs: float
    start_step: int
    steps: int
    deterministic: bool
    metasmoothness: float
    curvature_ratio: float
    seconds: float


@dataclass
class WindowReport:
    rows: list
    min_s: float
    recommended_epochs: Optional[float]
    """The longest deterministic window with S >= min_s; None when no window reaches it."""
    keep: float
    seed: int
    targets: list
    epochs_in_run: int
    trainings_per_window: int = 4
    advice: str = ""
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'window':>14s} {'steps':>11s} {'S':>7s} {'curvature':>9s} {'determ.':>7s} "
                 f"{'seconds':>8s}"]
        for r in self.rows:
            mark = "  <- recommended" if r.epochs == self.recommended_epochs else ""
            window = f"last {r.epochs:g} epoch{'s' if r.epochs != 1 else ''}"
            lines.append(f"{window:>14s} {r.start_step:>5d}-{r.start_step + r.steps - 1:<5d} "
                         f"{r.metasmoothness:7.3f} {r.curvature_ratio:9.2f} "
                         f"{'yes' if r.deterministic else 'NO':>7s} {r.seconds:8.1f}{mark}")
        lines.append(self.advice)
        return "\n".join(lines)


def default_windows(epochs: int) -> list[float]:
    """The last 1, 2, 4, ... epochs, and the whole run."""
    windows, e = [], 1
    while e < epochs:
        windows.append(float(e))
        e *= 2
    return windows + [float(epochs)]


def parse_windows(spec: str, epochs: int) -> list[float]:
    """--epochs "1,2,4": window lengths in epochs, each in (0, epochs], sorted, without repeats."""
    try:
        values = sorted({float(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--epochs {spec!r} is not a comma-separated list of numbers; "
                          "use e.g. --epochs 1,2,4") from None
    if not values:
        raise ConfigError("--epochs names no window; use e.g. --epochs 1,2,4")
    bad = [v for v in values if not 0 < v <= epochs]
    if bad:
        raise ConfigError(f"--epochs {bad[0]:g} is outside the run's {epochs} epochs; use "
                          f"windows in (0, {epochs}]")
    return values


def window_start_step(recipe: Recipe, epochs: float) -> int:
    """The first step of the last ``epochs`` epochs (as replay.window_epochs resolves it)."""
    return first_attributed_step(ReplayConfig(window_epochs=epochs), recipe.num_steps,
                                 recipe.cfg.train.epochs)


def scan_windows(recipe: Recipe, store, windows: list[float], keep: float = 0.99,
                 seed: int = 0, targets: Optional[list[int]] = None,
                 min_s: float = DEFAULT_MIN_S) -> WindowReport:
    """The report of the module docstring, one smoothness screen per window (shortest first)."""
    rows, measured = [], targets
    for epochs in windows:
        start = window_start_step(recipe, epochs)
        t0 = time.perf_counter()
        rep = check_smoothness(recipe.with_window(start), store, keep, seed, targets)
        measured = rep.targets
        row = WindowRow(epochs, start, recipe.num_steps - start, rep.deterministic,
                        rep.metasmoothness, rep.median_curvature_ratio,
                        time.perf_counter() - t0)
        rows.append(row)
        log.info("window: last %g epochs (steps %d-%d): S %.3f, curvature ratio %.2f, "
                 "deterministic %s, %.1fs", epochs, start, recipe.num_steps - 1,
                 row.metasmoothness, row.curvature_ratio, row.deterministic, row.seconds)
    passing = [r for r in rows if r.deterministic and r.metasmoothness >= min_s]
    best = max(passing, key=lambda r: r.epochs) if passing else None
    report = WindowReport(rows, min_s, best.epochs if best else None, keep, seed,
                          list(measured or []), recipe.cfg.train.epochs)
    report.advice = _advice(report, rows)
    return report


def _advice(report: WindowReport, rows: list) -> str:
    if any(not r.deterministic for r in rows):
        return ("the run is not reproducible from a stored checkpoint: no window can be "
                "attributed exactly; see `fastreplay smoothness` and docs/errors.md")
    if report.recommended_epochs is None:
        return (f"no window reaches S >= {report.min_s:g}: even over the last "
                f"{rows[0].epochs:g} epochs the scores are not expected to predict retraining; "
                "attribute a fine-tune from a pretrained start, or a smoother recipe "
                "(README: How far back the scores hold)")
    return (f"recommended: --set replay.window_epochs={report.recommended_epochs:g} (the longest "
            f"window with S >= {report.min_s:g}); check it with `fastreplay lds`")
