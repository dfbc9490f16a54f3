"""Choosing the delivered trial among completed ones."""

from __future__ import annotations

from optuna.trial import FrozenTrial

SELECT_MODES = ("smallest", "most_accurate", "fastest", "fewest_bops")
FASTER = 0.9  # latency ratio counted as "faster than fp32": single-sample timings vary by several %
_METRIC = {"smallest": "size_bytes", "fastest": "latency_ms", "fewest_bops": "bops"}


def _metric(t: FrozenTrial, select: str) -> float:
    key = _METRIC[select]
    value = t.user_attrs.get(key, t.user_attrs.get("details", {}).get(key))
    return float("inf") if value is None else float(value)


def _goodness(t: FrozenTrial, higher_is_better: bool) -> float:
    a = float(t.user_attrs["accuracy"])
    return a if higher_is_better else -a


def rank(trials: list[FrozenTrial], select: str, higher_is_better: bool) -> list[FrozenTrial]:
    """Best first: feasible trials by ``select``; if none is feasible, the most accurate first.

    "smallest" prefers, among feasible trials, those measured clearly faster than fp32 (latency ratio
    <= FASTER, a margin over timing noise) when there are any: a smaller file that runs slower than float
    is not what a user quantizes for.
    """
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    feasible = [t for t in trials if t.user_attrs.get("feasible")]
    if feasible:
        if select == "most_accurate":
            key = lambda t: (-_goodness(t, higher_is_better), t.user_attrs["size_bytes"], t.number)  # noqa: E731
            return sorted(feasible, key=key)
        if select == "smallest":
            not_slower = [t for t in feasible if (t.user_attrs.get("details", {}).get("latency_ratio") or 2.0) <= FASTER]
            feasible = not_slower or feasible
        key = lambda t: (_metric(t, select), -_goodness(t, higher_is_better), t.number)  # noqa: E731
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
