"""`fastreplay compare`: every attribution method held against the same stored LDS retrainings.

The retrainings of `fastreplay lds` do not depend on any method's scores (random subsets, each
model's measured test values), so the same (masks, values) judge any (K, N) score matrix:
the same statistic, the same jackknife interval, for MAGIC and the peers alike (lds_statistics).
Each method runs once over the stored targets, timed; a method whose library is missing is
skipped with a line naming the install, one that fails says why in its row.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from ..core.func_limits import first_line
from ..exceptions import FastReplayError
from ..methods import Method, PeerContext
from ..methods.peers import quiet_progress
from ..progress import log
from .lds import CI_METHOD, lds_group, lds_statistics


@dataclass
class CompareRow:
    method: str
    label: str
    lds: Optional[float] = None
    lds_ci: Optional[list] = None
    lds_bias_corrected: Optional[float] = None
    per_target: list = field(default_factory=list)
    seconds: Optional[float] = None
    seconds_per_target: Optional[float] = None
    notes: str = ""
    skipped: Optional[str] = None
    """Why the method has no figure (its library missing, or an error of its own)."""


@dataclass
class CompareResult:
    group: str
    targets: list
    models: int
    kind: str
    ci_method: str
    rows: list[CompareRow]

    def to_json(self) -> dict:
        return {"group": self.group, "targets": self.targets, "models": self.models,
                "kind": self.kind, "ci_method": self.ci_method,
                "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        """The table as text: method, LDS [interval], wall time per target, notes."""
        lines = [f"{'method':48s} {'LDS':>7s} {'95% CI':>17s} {'s/target':>9s}  notes"]
        for r in self.rows:
            if r.skipped:
                lines.append(f"{r.label:48s} {'-':>7s} {'':>17s} {'':>9s}  skipped: {r.skipped}")
                continue
            ci = f"[{r.lds_ci[0]:.3f}, {r.lds_ci[1]:.3f}]"
            cost = "-" if r.seconds_per_target is None else f"{r.seconds_per_target:.3f}"
            lines.append(f"{r.label:48s} {r.lds:7.3f} {ci:>17s} {cost:>9s}  {r.notes}")
        return "\n".join(lines)


def run_compare(recipe, store, methods: list[Method], keep: float, removal: str,
                targets: Optional[list[int]] = None) -> tuple[CompareResult, dict]:
    """Score the stored LDS experiment's targets (or ``targets`` among them) with each method and
    evaluate each against its retrainings. Returns the result and {method: scores (K, N)}."""
    group = lds_group(recipe, removal, keep)
    masks, values, stored = store.lds_experiment(group, recipe.num_train)
    chosen = list(targets or stored)
    missing = sorted(set(chosen) - set(stored))
    if missing:
        from ..exceptions import ConfigError
        raise ConfigError(f"targets {missing[:5]} were not measured by {group} (it holds "
                          f"{stored[:5]}{'...' if len(stored) > 5 else ''}); pick among them")
    measured = values[:, [stored.index(t) for t in chosen]]
    kind = recipe.cfg.measure.kind
    context = PeerContext(recipe, store, kind)
    rows, all_scores = [], {}
    for method in methods:
        row = CompareRow(method.name, method.label, notes=method.notes)
        rows.append(row)
        row.skipped = method.available()
        if row.skipped:
            log.warning("compare: %s skipped (%s)", method.name, row.skipped)
            continue
        t0 = time.perf_counter()
        try:
            with quiet_progress():
                scores = np.asarray(method.score(context, chosen), dtype=np.float64)
        except FastReplayError as exc:
            row.skipped = str(exc)
            log.warning("compare: %s failed: %s", method.name, exc)
            continue
        except Exception as exc:  # a peer library's own failure costs its row, not the table
            if method.name == "magic":
                raise
            row.skipped = f"failed in {method.library or 'fastreplay'}: {type(exc).__name__}: {first_line(exc)}"
            log.warning("compare: %s %s", method.name, row.skipped)
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            continue
        if method.name != "magic":  # its scores are read from the store, not computed here
            row.seconds = time.perf_counter() - t0
            row.seconds_per_target = row.seconds / len(chosen)
        stats = lds_statistics(scores, masks, measured)
        row.lds, row.lds_ci = float(stats.mean), [float(x) for x in stats.ci]
        row.lds_bias_corrected = float(stats.bias_corrected)
        row.per_target = [float(x) for x in stats.per_target]
        all_scores[method.name] = scores
        log.info("compare: %s LDS %.3f [%.3f, %.3f]%s", method.name, row.lds, *row.lds_ci,
                 "" if row.seconds is None else f" in {row.seconds:.2f}s")
    return CompareResult(group, chosen, int(masks.shape[0]), kind, CI_METHOD, rows), all_scores
