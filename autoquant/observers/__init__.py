"""Calibration methods: one observer class each, registered by the name used in search spaces."""

from __future__ import annotations

from .base import Observer
from .entropy import EntropyObserver
from .error import EMDObserver, MSEObserver
from .minmax import MinMaxObserver, MovingAverageObserver
from .percentile import PercentileObserver

OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls
    for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver, EntropyObserver, MSEObserver, EMDObserver)
}


def make_observer(method: str, percentile: float | None = None) -> Observer:
    if method not in OBSERVERS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {sorted(OBSERVERS)}")
    if method == "percentile":
        return PercentileObserver(percentile if percentile is not None else 99.999)
    return OBSERVERS[method]()


__all__ = ["OBSERVERS", "Observer", "make_observer", "MinMaxObserver", "MovingAverageObserver",
           "PercentileObserver", "EntropyObserver", "MSEObserver", "EMDObserver"]
