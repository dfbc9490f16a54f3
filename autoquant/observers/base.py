"""Observer: one calibration method = one small class turning cached statistics into a range."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..qtypes import qrange
from ..stats import TensorStats


class Observer(ABC):
    """Derives (rmin, rmax) for one activation tensor from its cached statistics.

    ``bits`` and ``symmetric`` describe the quantization grid the range is for; error-minimising
    observers use them, the others ignore them. The range always lies within the observed [min, max].
    """

    name: str = ""

    @abstractmethod
    def compute(self, stats: TensorStats, bits: int, symmetric: bool) -> tuple[float, float]: ...

    def range(self, stats: TensorStats, bits: int, symmetric: bool) -> tuple[float, float]:
        lo, hi = self.compute(stats, bits, symmetric)
        lo, hi = max(float(lo), stats.min), min(float(hi), stats.max)
        if hi < lo:  # degenerate (e.g. a constant tensor): keep the exact observed range
            lo, hi = stats.min, stats.max
        return lo, hi

    def cache_key(self) -> tuple:
        return (self.name,)


def abs_histogram(stats: TensorStats) -> tuple[np.ndarray, np.ndarray]:
    """Fold the signed histogram at zero: counts of |x| over edges [0, R]."""
    b = len(stats.hist) // 2
    counts = stats.hist[b:] + stats.hist[:b][::-1]
    edges = np.linspace(0.0, stats.half_range, b + 1)
    return counts, edges


def fake_quant(values: np.ndarray, rmin: np.ndarray, rmax: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Quantize-dequantize ``values`` (N,) for K candidate ranges (K,) -> (K, N), ORT's scale/zero-point rules."""
    qmin, qmax = qrange(bits, symmetric)
    rmin = np.minimum(rmin, 0.0)[:, None]
    rmax = np.maximum(rmax, 0.0)[:, None]
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale = (rmax - rmin) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.round((qmin + qmax) / 2.0) if symmetric else np.round(qmin - rmin / scale)
    q = np.clip(np.round(values[None, :] / scale) + zp, qmin, qmax)
    return (q - zp) * scale
