"""Entropy (KL-divergence) observer: TensorRT's threshold search, run by ONNX Runtime's own code."""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization.calibrate import HistogramCollector

from ..stats import TensorStats
from .base import Observer

ENTROPY_BINS = 512  # our 4096-bin histogram is merged down: ORT's search is O(bins^2) Python loops


def quantized_bins(bits: int) -> int:
    """TensorRT's 128 levels per side for int8, scaled with the bit width."""
    return 2 ** (bits - 1)


class EntropyObserver(Observer):
    name = "entropy"

    def compute(self, stats: TensorStats, bits: int, symmetric: bool) -> tuple[float, float]:
        nq = quantized_bins(bits)
        if stats.hist.sum() == 0 or stats.half_range == 0 or nq >= ENTROPY_BINS // 2:
            return stats.min, stats.max  # more levels than histogram bins: quantization loses nothing to clip for
        factor = len(stats.hist) // ENTROPY_BINS
        hist = stats.hist.reshape(ENTROPY_BINS, factor).sum(axis=1)
        edges = np.linspace(-stats.half_range, stats.half_range, ENTROPY_BINS + 1).astype(np.float32)
        collector = HistogramCollector(
            method="entropy", symmetric=True, num_bins=ENTROPY_BINS, num_quantized_bins=nq,
            percentile=99.99, scenario="same",
        )
        lo, hi = collector.get_entropy_threshold((hist, edges, np.float32(stats.min), np.float32(stats.max)), nq)
        return float(lo), float(hi)
