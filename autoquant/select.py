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


#: second choice: not slower than fp32 beyond timing noise, and a real compression (file at most this
#: fraction of fp32's) - e.g. a model whose most sensitive (and heaviest) layers stay float. Preferred
#: to a smaller model that runs at twice fp32's latency (ORT CPU's ConvInteger, 16-bit activations).
NOT_SLOWER_THAN_FP32 = 1.05
COMPRESSED = 0.75


def speed_tier(t: FrozenTrial, fp32_size: int | None = None) -> int:
    """0: faster than fp32 (faster_than_fp32); 1: not slower and compressed (needs ``fp32_size``);
    2: the rest (slower than fp32, not measured, or no smaller than fp32)."""
    if faster_than_fp32(t):
        return 0
    ratio = t.user_attrs.get("details", {}).get("latency_ratio")
    if fp32_size and ratio is not None and float(ratio) <= NOT_SLOWER_THAN_FP32 and \
            t.user_attrs["size_bytes"] <= COMPRESSED * fp32_size:
        return 1
    return 2


def faster_than_fp32(t: FrozenTrial) -> bool:
    d = t.user_attrs.get("details", {})
    ratio, bops = d.get("latency_ratio"), d.get("bops_ratio")
    return (ratio is not None and float(ratio) <= FASTER_THAN_FP32
            and (bops is None or float(bops) <= MOSTLY_QUANTIZED))


def rank(trials: list[FrozenTrial], select: str, higher_is_better: bool,
         fp32_size: int | None = None) -> list[FrozenTrial]:
    """Best first: feasible trials by ``select``; if none is feasible, the most accurate first.

    "smallest" (the default) ranks by file size within speed tiers (speed_tier): first the feasible
    trials measured faster than fp32 (latency ratio <= FASTER_THAN_FP32, bit operations <=
    MOSTLY_QUANTIZED of fp32's), then those not slower than fp32 (<= NOT_SLOWER_THAN_FP32) with a file
    at most COMPRESSED of fp32's, then the rest: a small model slower than float (e.g. 16-bit
    activations on ORT CPU) is delivered only when no feasible model runs at fp32 speed or faster. The
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
            key = lambda t: (speed_tier(t, fp32_size), _metric(t, select),  # noqa: E731
                             -_goodness(t, higher_is_better), t.number)
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
