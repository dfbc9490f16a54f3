"""Min/max observers: the exact observed range, and its moving average over feeds."""

from __future__ import annotations

from ..stats import TensorStats
from .base import Observer


class MinMaxObserver(Observer):
    """Exact min and max over all calibration feeds (ONNX Runtime's default MinMax)."""

    name = "minmax"

    def compute(self, stats: TensorStats, bits: int, symmetric: bool) -> tuple[float, float]:
        return stats.min, stats.max


class MovingAverageObserver(Observer):
    """Exponential moving average of per-feed min/max (ORT's CalibMovingAverage, constant 0.01)."""

    name = "moving_average"

    def compute(self, stats: TensorStats, bits: int, symmetric: bool) -> tuple[float, float]:
        return stats.ema_min, stats.ema_max
