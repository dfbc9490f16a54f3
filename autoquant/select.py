"""Choosing the delivered trial among completed ones."""

from __future__ import annotations

from optuna.trial import FrozenTrial

SELECT_MODES = ("smallest", "most_accurate")


def _goodness(t: FrozenTrial, higher_is_better: bool) -> float:
    a = float(t.user_attrs["accuracy"])
    return a if higher_is_better else -a


def rank(trials: list[FrozenTrial], select: str, higher_is_better: bool) -> list[FrozenTrial]:
    """Best first: feasible trials by ``select``; if none is feasible, the most accurate first."""
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    feasible = [t for t in trials if t.user_attrs.get("feasible")]
    if feasible:
        if select == "smallest":
            key = lambda t: (t.user_attrs["size_bytes"], -_goodness(t, higher_is_better), t.number)  # noqa: E731
        else:
            key = lambda t: (-_goodness(t, higher_is_better), t.user_attrs["size_bytes"], t.number)  # noqa: E731
        return sorted(feasible, key=key)
    return sorted(trials, key=lambda t: (-_goodness(t, higher_is_better), t.user_attrs["size_bytes"], t.number))


def pareto_front(trials: list[FrozenTrial], higher_is_better: bool) -> list[FrozenTrial]:
    """Non-dominated trials in (accuracy, size). Used when no trial is feasible (Optuna's
    ``best_trials`` then returns nothing, since it only considers feasible trials)."""
    pts = [(-_goodness(t, higher_is_better), t.user_attrs["size_bytes"]) for t in trials]
    front = []
    for i, p in enumerate(pts):
        dominated = any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)
        if not dominated:
            front.append(trials[i])
    return front
