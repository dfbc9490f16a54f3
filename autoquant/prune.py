"""Multi-fidelity: score a trial cheaply before the user's full eval, and prune the hopeless ones.

Fidelity 1, always: output SQNR of the trial model vs fp32 on a few cached calibration feeds (no user
code). A trial is pruned when its SQNR is clearly below (``margin_db``) that of a trial already
evaluated and found infeasible, and no trial at a similar or lower SQNR was feasible: accuracy falls
with output noise, so it cannot do better. It is also pruned when a feasible trial has a clearly higher
SQNR and costs no more (size, or the chosen objective): it could not join the Pareto front.
Fidelity 2, when the user gives ``eval_subset_callback``: the drop on that subset; pruned when it exceeds the allowed drop by more than the allowance again.
Pruned trials are recorded as PRUNED with the reason, through Optuna's pruning interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from .cost import NOT_SLOWER_THAN_FP32
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

    def sqnr_verdict(self, study: optuna.Study, sqnr: float, cost: float | None = None,
                     latency: Callable[[dict], float | None] | None = None, ratio: float | None = None) -> str | None:
        """Why a trial with this output SQNR (and this value of the second objective) is hopeless, or None.

        Hopeless: (a) its SQNR is more than ``margin_db`` below an infeasible trial's, and no trial at a
        similar or lower SQNR was feasible; or (b) a feasible trial has an SQNR ``margin_db`` higher, costs
        no more and is no slower (``latency`` reads a trial's latency ratio from its details; this trial's is
        ``ratio``; anything at fp32 speed counts as fast enough): this one would be less accurate, no cheaper
        and no faster, so it cannot join the Pareto front or be delivered.
        """
        if not self.enabled:
            return None
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs["details"].get("sqnr_db") is not None]
        scored = [(t.user_attrs["details"]["sqnr_db"], bool(t.user_attrs["feasible"])) for t in done]
        infeasible = [s for s, f in scored if not f]
        if infeasible and sqnr < max(infeasible) - self.margin_db and not any(
                f and s <= sqnr + self.margin_db for s, f in scored):
            return (f"output SQNR {sqnr:.1f} dB is more than {self.margin_db:g} dB below an infeasible trial's "
                    f"{max(infeasible):.1f} dB")
        if cost is not None:
            for t in done:
                s = t.user_attrs["details"]["sqnr_db"]
                if t.user_attrs["feasible"] and s >= sqnr + self.margin_db and t.values[1] <= cost and \
                        _no_slower(latency(t.user_attrs["details"]) if latency else None, ratio):
                    return (f"dominated: feasible trial {t.number} has {s - sqnr:.1f} dB more output SQNR "
                            f"and costs no more ({t.values[1]:.6g} <= {cost:.6g})")
        return None

    def subset_verdict(self, path: Path) -> tuple[str | None, float | None]:
        if self.subset_callback is None:
            return None, None
        from .objective import check_metric

        value = check_metric(self.subset_callback(str(path)), "eval_subset_callback")
        d = self.subset_scoring.drop(value)
        if self.enabled and d > 2 * self.subset_scoring.allowed_drop + 1e-12:
            return f"drop {d:.4g} on the eval subset exceeds twice the allowed drop", value
        return None, value


def _no_slower(other: float | None, ratio: float | None) -> bool:
    """Is a trial at latency ratio ``other`` no slower than one at ``ratio`` (fp32 speed counts as fast
    enough: the delivery rule does not tell such models apart by speed)? Unknown ratios: yes."""
    return other is None or ratio is None or other <= max(ratio, NOT_SLOWER_THAN_FP32)
