"""Calibration statistics, collected once per study in one streaming pass and cached on disk.

Per activation tensor: exact min/max, moving-average min/max (ORT's constant 0.01) and a signed
histogram that every histogram-based observer (percentile, entropy, MSE, EMD) derives its range from.
A trial never runs calibration inference again.

Masking sentinels: exported transformers add huge finite values (``np.finfo(np.float32).min``) or
infinities to attention scores to mask positions. Values with ``|x| >= SENTINEL`` are left out of the
histogram and of every min/max (a range spanning them would leave no resolution for the real values),
and the tensor's name goes to ``Statistics.masked_tensors``: the caller should keep the nodes producing
or consuming such tensors out of activation quantization, since a quantized tensor clips the sentinels to
the range of the real values. NaN is left out too (not recorded). Any other failure while accumulating a
tensor's statistics is raised as a CalibrationDataError naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort

from ._io import atomic_write
from .data import Feed, update_fingerprint
from .errors import CalibrationDataError

NUM_BINS = 4096  # even; the histogram covers [-R, R] with R a power of two
EMA_CONSTANT = 0.01  # same default as onnxruntime's CalibMovingAverageConstant
STATS_VERSION = 2  # 2: masking sentinels left out of ranges and recorded in the cache
SENTINEL = 1e30  # |x| at or above this is a masking value, not data (float32's max is 3.4e38)

#: Number of calibration passes run in this process (tests use it to prove "once per study").
PASSES = 0


@dataclass
class TensorStats:
    min: float
    max: float
    ema_min: float
    ema_max: float
    hist: np.ndarray  # int64 counts over NUM_BINS equal bins spanning [-half_range, half_range]
    half_range: float

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_range, self.half_range, len(self.hist) + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


class _StreamingHistogram:
    """Signed histogram on a symmetric range that doubles when data exceeds it.

    Written by hand because ORT's HistogramCollector re-bins from its own collected arrays; here,
    doubling the range merges adjacent bin pairs exactly, so the pass stays streaming and lossless
    up to the final resolution.
    """

    def __init__(self, bins: int = NUM_BINS):
        self.hist = np.zeros(bins, dtype=np.int64)
        self.half_range = 0.0

    def add(self, x: np.ndarray, amax: float | None = None) -> None:
        """Count ``x`` (finite values only: the caller filters sentinels, NaN and inf); ``amax`` = max |x|
        when the caller knows it."""
        if amax is None:
            amax = float(np.max(np.abs(x))) if x.size else 0.0
        if amax == 0.0 and self.half_range == 0.0:
            self.hist[len(self.hist) // 2] += x.size  # all zeros so far: park them at the zero bin
            return
        if self.half_range == 0.0:
            self.half_range = float(2.0 ** np.ceil(np.log2(amax)))
        while amax > self.half_range:
            self._double()
        # uniform bins: a bin index and np.bincount count 3x faster than np.histogram (values on a bin edge
        # may land one bin off, as float32 rounding decides). bins / (2 * half_range) is a power of two, so
        # x * scale is exact in float32 (|x| <= half_range: no overflow) and floor(x * scale) + bins / 2 is the
        # float64 index floor(x * scale + bins / 2) without a float64 copy; the top value |x| = half_range
        # goes to the last bin, as np.histogram's closed end
        bins = len(self.hist)
        scale = bins / (2.0 * self.half_range)
        work = np.float32 if 2.0 ** -100 < scale < 2.0 ** 100 else np.float64  # float32 cannot hold the scale
        y = np.multiply(x, work(scale), dtype=work)
        np.floor(y, out=y)
        idx = y.astype(np.int32).ravel()
        idx += bins // 2
        np.clip(idx, 0, bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=bins)

    def _double(self) -> None:
        b = len(self.hist)
        merged = self.hist.reshape(b // 2, 2).sum(axis=1)
        new = np.zeros_like(self.hist)
        new[b // 4 : b // 4 + b // 2] = merged
        self.hist = new
        self.half_range *= 2.0


class _TensorAccumulator:
    def __init__(self):
        self.min = np.inf
        self.max = -np.inf
        self.ema_min: float | None = None
        self.ema_max: float | None = None
        self.hist = _StreamingHistogram()
        self.masked = False  # saw masking sentinels (|x| >= SENTINEL, inf included)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        bmin, bmax = float(x.min()), float(x.max())
        if not (-SENTINEL < bmin and bmax < SENTINEL):  # NaN, inf or masking values (NaN fails both tests)
            keep = np.abs(x) < SENTINEL  # a range covers the real values only
            self.masked = self.masked or bool(np.any(np.abs(x[~keep]) >= SENTINEL))
            x = x[keep]
            if x.size == 0:
                return
            bmin, bmax = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        if self.ema_min is None:
            self.ema_min, self.ema_max = bmin, bmax
        else:
            self.ema_min += EMA_CONSTANT * (bmin - self.ema_min)
            self.ema_max += EMA_CONSTANT * (bmax - self.ema_max)
        self.hist.add(x, max(-bmin, bmax))

    def result(self) -> TensorStats | None:
        if self.ema_min is None:
            return None
        return TensorStats(self.min, self.max, self.ema_min, self.ema_max, self.hist.hist, self.hist.half_range)


@dataclass
class Statistics:
    tensors: dict[str, TensorStats]
    samples: list[Feed]  # the first few feeds, kept for sensitivity measurement
    n_feeds: int
    key: str
    #: tensors that carried masking sentinels (see the module docstring): their ranges cover the other
    #: values only; keep the nodes producing / consuming them float
    masked_tensors: frozenset[str] = frozenset()

    def save(self, path: Path) -> None:
        names = list(self.tensors)
        arrays = {
            "meta": np.array(json.dumps({"version": STATS_VERSION, "names": names, "n_feeds": self.n_feeds,
                                         "key": self.key, "n_samples": len(self.samples),
                                         "sample_inputs": sorted(self.samples[0]) if self.samples else [],
                                         "masked": sorted(self.masked_tensors)})),
            "scalars": np.array([[t.min, t.max, t.ema_min, t.ema_max, t.half_range] for t in self.tensors.values()],
                                dtype=np.float64).reshape(len(names), 5),
            "hists": np.stack([t.hist for t in self.tensors.values()]) if names else np.zeros((0, NUM_BINS), np.int64),
        }
        for i, feed in enumerate(self.samples):
            for j, name in enumerate(sorted(feed)):
                arrays[f"sample_{i}_{j}"] = feed[name]

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> "Statistics":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != STATS_VERSION:
                raise ValueError("statistics cache version mismatch")
            scalars, hists = z["scalars"], z["hists"]
            tensors = {
                name: TensorStats(*map(float, scalars[i, :4]), hists[i].copy(), float(scalars[i, 4]))
                for i, name in enumerate(meta["names"])
            }
            samples = [
                {name: z[f"sample_{i}_{j}"] for j, name in enumerate(meta["sample_inputs"])}
                for i in range(meta["n_samples"])
            ]
        return cls(tensors, samples, meta["n_feeds"], meta["key"], frozenset(meta["masked"]))


def stats_key(model_sha: str, data_sha: str) -> str:
    return hashlib.sha256(f"stats-v{STATS_VERSION}|{model_sha}|{data_sha}".encode()).hexdigest()[:16]


def augmented_session(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    """A session whose outputs are every tensor we collect statistics for."""
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    present = {o.name for o in aug.graph.output}
    for name in tensors:
        if name not in present:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor observable
    opts.log_severity_level = 3
    return ort.InferenceSession(aug.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def collect_statistics(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: Iterable[Feed],
    model_sha: str,
    keep_samples: int = 8,
    progress=None,
) -> tuple[Statistics, str]:
    """One pass over ``feeds``: returns the statistics and the data fingerprint computed on the way."""
    (stats,), data_sha = collect_statistics_many([(model, tensors, model_sha)], feeds, keep_samples, progress)
    return stats, data_sha


def collect_statistics_many(
    models: list[tuple[onnx.ModelProto, list[str], str]],
    feeds: Iterable[Feed],
    keep_samples: int = 8,
    progress=None,
) -> tuple[list[Statistics], str]:
    """One pass over ``feeds`` feeding every (model, tensors, model_sha): the data is read exactly once
    even when several model variants (e.g. with and without cross-layer equalization) need statistics."""
    global PASSES
    PASSES += 1
    sessions = [augmented_session(model, tensors) for model, tensors, _ in models]
    accs = [{name: _TensorAccumulator() for name in tensors} for _, tensors, _ in models]
    samples: list[Feed] = []
    h = hashlib.sha256()
    n = 0
    for feed in feeds:
        update_fingerprint(h, feed)
        if len(samples) < keep_samples:
            samples.append({k: np.array(v) for k, v in feed.items()})
        for session, acc, (_, tensors, _) in zip(sessions, accs, models):
            try:
                values = session.run(tensors, feed)
            except Exception as exc:
                raise CalibrationDataError(f"the model failed on calibration feed #{n} ({type(exc).__name__}: {exc}); "
                                           "check that this feed is a valid input of the model") from exc
            for name, value in zip(tensors, values):
                try:
                    acc[name].add(value)
                except Exception as exc:
                    raise CalibrationDataError(
                        f"statistics of tensor {name!r} failed on calibration feed #{n} ({type(exc).__name__}: "
                        f"{exc}; dtype {getattr(value, 'dtype', '?')}, shape {getattr(value, 'shape', '?')}); "
                        "check what the model computes on this feed") from exc
        n += 1
        if progress is not None:
            progress.update(1)
    data_sha = h.hexdigest()
    results = []
    for acc, (_, _, model_sha) in zip(accs, models):
        tensors = {name: st for name, a in acc.items() if (st := a.result()) is not None}
        masked = frozenset(name for name, a in acc.items() if a.masked)
        results.append(Statistics(tensors, samples, n, stats_key(model_sha, data_sha), masked))
    return results, data_sha
