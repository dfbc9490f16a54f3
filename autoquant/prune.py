"""Multi-fidelity: score a trial cheaply before the user's full eval, and prune the hopeless ones.

Fidelity 1, always: output SQNR of the trial model vs fp32 on a few cached calibration feeds (no user
code). A trial is pruned when its SQNR is clearly below (``margin_db``) that of a trial already
evaluated and found infeasible, and no trial at a similar or lower SQNR was feasible: accuracy falls
with output noise, so it cannot do better. Fidelity 2, when the user gives ``eval_subset_callback``:
the drop on that subset; pruned when it exceeds the allowed drop by more than the allowance again.
Pruned trials are recorded as PRUNED with the reason, through Optuna's pruning interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from .sensitivity import run_outputs, session, sqnr_db

SQNR_FEEDS = 2


class Pruner:
    def __init__(self, reference_path: Path, samples: list[dict[str, np.ndarray]], margin_db: float = 3.0,
                 subset_callback: Callable[[str], Any] | None = None, subset_scoring=None, enabled: bool = True):
        """``subset_scoring``: a Scoring whose baseline is the fp32 score on the subset."""
        self.samples = samples[:SQNR_FEEDS]
        self.reference = run_outputs(session(reference_path), self.samples)
        self.margin_db, self.enabled = margin_db, enabled
        self.subset_callback, self.subset_scoring = subset_callback, subset_scoring

    def sqnr(self, path: Path) -> float:
        return sqnr_db(self.reference, run_outputs(session(path), self.samples))

    def sqnr_verdict(self, study: optuna.Study, sqnr: float) -> str | None:
        if not self.enabled:
            return None
        scored = [(t.user_attrs["details"].get("sqnr_db"), bool(t.user_attrs["feasible"]))
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        scored = [(s, f) for s, f in scored if s is not None]
        infeasible = [s for s, f in scored if not f]
        if not infeasible or sqnr >= max(infeasible) - self.margin_db:
            return None
        if any(f and s <= sqnr + self.margin_db for s, f in scored):
            return None
        return (f"output SQNR {sqnr:.1f} dB is more than {self.margin_db:g} dB below an infeasible trial's "
                f"{max(infeasible):.1f} dB")

    def subset_verdict(self, path: Path) -> tuple[str | None, float | None]:
        if self.subset_callback is None:
            return None, None
        from .objective import check_metric

        value = check_metric(self.subset_callback(str(path)), "eval_subset_callback")
        d = self.subset_scoring.drop(value)
        if self.enabled and d > 2 * self.subset_scoring.allowed_drop + 1e-12:
            return f"drop {d:.4g} on the eval subset exceeds twice the allowed drop", value
        return None, value
