"""Percentile observer: clip |x| at a percentile of its distribution (ORT's Percentile semantics)."""

from __future__ import annotations

import numpy as np

from ..stats import TensorStats
from .base import Observer, abs_histogram


class PercentileObserver(Observer):
    name = "percentile"

    def __init__(self, percentile: float = 99.999):
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)

    def compute(self, stats: TensorStats, bits: int, symmetric: bool) -> tuple[float, float]:
        counts, edges = abs_histogram(stats)
        total = counts.sum()
        if total == 0:
            return stats.min, stats.max
        cdf = np.cumsum(counts) / total
        idx = int(np.searchsorted(cdf, self.percentile / 100.0, side="left"))
        threshold = float(edges[min(idx + 1, len(edges) - 1)])
        return -threshold, threshold

    def cache_key(self) -> tuple:
        return (self.name, self.percentile)
