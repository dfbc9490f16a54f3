"""Choosing the delivered trial among completed ones."""

from __future__ import annotations

from optuna.trial import FrozenTrial

from .cost import MS_KEY, NOT_SLOWER_THAN_FP32, RATIO_KEY
from .objective import DETAILS

SELECT_MODES = ("smallest", "most_accurate", "fastest", "fewest_bops")
_METRIC = {"smallest": "size_bytes", "fewest_bops": "bops"}


def _metric(t: FrozenTrial, select: str) -> float:
    key = _METRIC[select]
    value = t.user_attrs.get(key, t.user_attrs.get(DETAILS, {}).get(key))
    return float("inf") if value is None else float(value)


def _goodness(t: FrozenTrial, higher_is_better: bool) -> float:
    a = float(t.user_attrs["accuracy"])
    return a if higher_is_better else -a


#: the fast band: a model whose latency ratio is within max(NEAR_FASTEST x r, r + NEAR_FASTEST_ABS) of the fastest
#: feasible model's r counts as "as fast" (timing noise, and a user does not trade 10 % of latency for a few
#: bytes); among those the smallest is delivered
NEAR_FASTEST = 1.1
NEAR_FASTEST_ABS = 0.05


def latency_ratio(t: FrozenTrial, threading: str = "default") -> float | None:
    """A trial's latency / fp32's, measured as ``threading`` says (single-thread when that is all a trial
    recorded)."""
    d = t.user_attrs.get(DETAILS, {})
    value = d.get(RATIO_KEY[threading], d.get("latency_ratio"))
    return None if value is None else float(value)


#: a model must also be a real compression to count as deliverable-fast: a file at most this fraction of fp32's
#: (a mostly-float model with Q/DQ around it runs at fp32 speed too, and noise can time it below 1.0)
COMPRESSED = 0.75


def not_slower_than_fp32(t: FrozenTrial, threading: str = "default", fp32_size: int | None = None) -> bool:
    """Measured at fp32's latency or below (NOT_SLOWER_THAN_FP32) and, when ``fp32_size`` is known, a file at
    most COMPRESSED of fp32's: the models the delivery rule prefers."""
    ratio = latency_ratio(t, threading)
    return ratio is not None and ratio <= NOT_SLOWER_THAN_FP32 and (
        not fp32_size or t.user_attrs["size_bytes"] <= COMPRESSED * fp32_size)


def speed_tiers(feasible: list[FrozenTrial], threading: str = "default",
                fp32_size: int | None = None) -> dict[int, int]:
    """Trial number -> 0 (not_slower_than_fp32 and within the fast band of the fastest such model), 1
    (not_slower_than_fp32, outside the band) or 2 (the rest: slower than fp32, not measured, or hardly smaller)."""
    fast = [t for t in feasible if not_slower_than_fp32(t, threading, fp32_size)]
    if not fast:
        return {t.number: 2 for t in feasible}
    best = min(latency_ratio(t, threading) for t in fast)
    band = min(NOT_SLOWER_THAN_FP32, max(NEAR_FASTEST * best, best + NEAR_FASTEST_ABS))
    ok = {t.number for t in fast}
    return {t.number: (0 if latency_ratio(t, threading) <= band else 1) if t.number in ok else 2 for t in feasible}


def rank(trials: list[FrozenTrial], select: str, higher_is_better: bool,
         fp32_size: int | None = None, threading: str = "default") -> list[FrozenTrial]:
    """Best first: feasible trials by ``select``; if none is feasible, the most accurate first.

    "smallest" (the default) delivers a model not slower than fp32 whenever a feasible one exists: the
    smallest feasible model among those within the fast band (NEAR_FASTEST) of the fastest feasible model
    not slower than fp32, then the other feasible models not slower than fp32, smallest first, then the
    slower ones (the result then carries a warning). Latency ratios are measured interleaved with fp32
    (cost.LatencyMeter), so load hits both alike; ``threading`` says which ratio counts.
    """
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    feasible = [t for t in trials if t.user_attrs.get("feasible")]
    if feasible:
        if select == "most_accurate":
            key = lambda t: (-_goodness(t, higher_is_better), t.user_attrs["size_bytes"], t.number)  # noqa: E731
            return sorted(feasible, key=key)
        if select == "smallest":
            tiers = speed_tiers(feasible, threading, fp32_size)
            key = lambda t: (tiers[t.number], _metric(t, select),  # noqa: E731
                             -_goodness(t, higher_is_better), t.number)
            return sorted(feasible, key=key)
        if select == "fastest":  # the latency objective's own number (ms, at the delivery rule's threading)
            key = lambda t: (_latency_ms(t, threading), -_goodness(t, higher_is_better), t.number)  # noqa: E731
            return sorted(feasible, key=key)
        key = lambda t: (_metric(t, select), -_goodness(t, higher_is_better), t.number)  # noqa: E731
        return sorted(feasible, key=key)
    return sorted(trials, key=lambda t: (-_goodness(t, higher_is_better), t.user_attrs["size_bytes"], t.number))


def _latency_ms(t: FrozenTrial, threading: str) -> float:
    d = t.user_attrs.get(DETAILS, {})
    value = d.get(MS_KEY[threading], d.get("latency_ms"))
    return float("inf") if value is None else float(value)


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
