"""Choosing the delivered trial among completed ones."""

from __future__ import annotations

from optuna.trial import FrozenTrial

SELECT_MODES = ("smallest", "most_accurate", "fastest", "fewest_bops")
_METRIC = {"smallest": "size_bytes", "fastest": "latency_ms", "fewest_bops": "bops"}


def _metric(t: FrozenTrial, select: str) -> float:
    key = _METRIC[select]
    value = t.user_attrs.get(key, t.user_attrs.get("details", {}).get(key))
    return float("inf") if value is None else float(value)


def _goodness(t: FrozenTrial, higher_is_better: bool) -> float:
    a = float(t.user_attrs["accuracy"])
    return a if higher_is_better else -a


#: a trial counts as faster than fp32 when its interleaved latency ratio is at most this (a margin
#: against timing noise: a nearly-float model measuring 0.98 is not "faster") ...
FASTER_THAN_FP32 = 0.95
#: ... and it does at most this fraction of fp32's bit operations: a mostly-float model (most nodes
#: kept float) runs at fp32 speed, and on a loaded machine noise alone can time it at 0.92
MOSTLY_QUANTIZED = 0.5


def faster_than_fp32(t: FrozenTrial) -> bool:
    d = t.user_attrs.get("details", {})
    ratio, bops = d.get("latency_ratio"), d.get("bops_ratio")
    return (ratio is not None and float(ratio) <= FASTER_THAN_FP32
            and (bops is None or float(bops) <= MOSTLY_QUANTIZED))


def rank(trials: list[FrozenTrial], select: str, higher_is_better: bool) -> list[FrozenTrial]:
    """Best first: feasible trials by ``select``; if none is feasible, the most accurate first.

    "smallest" (the default) ranks by file size, but first among the feasible trials measured faster
    than fp32 (latency ratio <= FASTER_THAN_FP32, bit operations <= MOSTLY_QUANTIZED of fp32's) when there is any: a small model slower than float
    (e.g. 16-bit activations on ORT CPU) is delivered only when no feasible model runs faster. The
    ratio is measured interleaved with fp32 (cost.LatencyMeter), so load hits both alike.
    """
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    feasible = [t for t in trials if t.user_attrs.get("feasible")]
    if feasible:
        if select == "most_accurate":
            key = lambda t: (-_goodness(t, higher_is_better), t.user_attrs["size_bytes"], t.number)  # noqa: E731
            return sorted(feasible, key=key)
        if select == "smallest":
            key = lambda t: (not faster_than_fp32(t), _metric(t, select), -_goodness(t, higher_is_better),  # noqa: E731
                             t.number)
            return sorted(feasible, key=key)
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
