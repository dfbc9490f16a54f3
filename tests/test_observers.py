"""Calibration observers and the streaming statistics they read."""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from autoquant.observers import OBSERVERS, make_observer
from autoquant.observers.base import fake_quant
from autoquant.stats import NUM_BINS, _StreamingHistogram, _TensorAccumulator


def stats_of(*batches):
    acc = _TensorAccumulator()
    for b in batches:
        acc.add(np.asarray(b, dtype=np.float32))
    return acc.result()


def test_streaming_histogram_doubling_is_exact():
    rng = np.random.default_rng(0)
    small, big = rng.normal(0, 1, 10_000), rng.normal(0, 40, 10_000)
    h = _StreamingHistogram()
    h.add(small)
    h.add(big)
    direct, _ = np.histogram(np.concatenate([small, big]), bins=NUM_BINS, range=(-h.half_range, h.half_range))
    assert h.hist.sum() == 20_000
    assert np.array_equal(h.hist, direct)


def test_minmax_and_moving_average():
    st = stats_of([0.0, 1.0], [-2.0, 3.0], [-1.0, 1.0])
    assert make_observer("minmax").range(st, 8, False) == (-2.0, 3.0)
    lo, hi = make_observer("moving_average").range(st, 8, False)
    assert -2.0 < lo < 0.0 and 1.0 < hi < 3.0  # an average of the per-feed extremes


def test_percentile_clips_rare_outliers():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 100_000)
    x[:10] = 500.0  # 0.01 % outliers
    st = stats_of(x)
    lo, hi = make_observer("percentile", 99.9).range(st, 8, False)
    assert 2.5 < hi < 4.5 and -4.5 < lo < -2.5
    assert make_observer("percentile", 100.0).range(st, 8, False)[1] == pytest.approx(500.0)


@pytest.mark.parametrize("method, err", [("mse", np.square), ("emd", np.abs)])
def test_error_minimising_methods_beat_minmax_on_their_objective(method, err):
    rng = np.random.default_rng(1)
    x = rng.laplace(0, 1, 200_000).astype(np.float32)  # heavy tails: clipping pays off at 4 bits
    st = stats_of(x)
    chosen = make_observer(method).range(st, 4, False)
    full = make_observer("minmax").range(st, 4, False)
    assert chosen[1] < full[1]

    def error(r):
        return float(err(x - fake_quant(x, np.array([r[0]]), np.array([r[1]]), 4, False)[0]).mean())

    assert error(chosen) < 0.8 * error(full)


def test_entropy_clips_rare_outliers():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 200_000)
    x[:20] = 50.0
    st = stats_of(x)
    lo, hi = make_observer("entropy").range(st, 8, False)
    assert hi < 0.6 * st.max and lo == st.min
    assert make_observer("entropy").range(st, 16, False)[1] == st.max  # 16 bits: no reason to clip


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_range_within_observed(method):
    st = stats_of(np.linspace(0, 6, 1000))  # a Relu-like non-negative tensor
    lo, hi = make_observer(method).range(st, 8, False)
    assert 0.0 <= lo < hi <= 6.0


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_constant_tensor(method):
    st = stats_of(np.zeros(100))
    lo, hi = make_observer(method).range(st, 8, True)
    assert lo == hi == 0.0


def test_emd_closed_form_equals_scipy():
    rng = np.random.default_rng(2)
    values = np.sort(rng.normal(0, 1, 300))
    weights = rng.integers(1, 10, 300).astype(float)
    deq = fake_quant(values, np.array([-2.0]), np.array([2.0]), 4, False)[0]
    closed = float(np.abs(values - deq) @ weights / weights.sum())
    assert closed == pytest.approx(wasserstein_distance(values, deq, weights, weights), rel=1e-9)


def test_mse_is_bit_width_aware():
    rng = np.random.default_rng(3)
    st = stats_of(rng.laplace(0, 1, 200_000))
    _, hi4 = make_observer("mse").range(st, 4, True)
    _, hi16 = make_observer("mse").range(st, 16, True)
    assert hi4 < hi16  # fewer levels -> clip harder


def test_unknown_method():
    with pytest.raises(ValueError, match="choose one of"):
        make_observer("nope")


def test_non_finite_activations_are_left_out_of_the_statistics():
    """Attention masks carry -inf; ranges and histograms cover the finite values."""
    st = stats_of(np.array([-np.inf, -1.0, 0.5, 2.0, np.inf, np.nan], np.float32), [np.float32(-np.inf)])
    assert (st.min, st.max) == (-1.0, 2.0) and st.hist.sum() == 3
    for method in sorted(OBSERVERS):
        lo, hi = make_observer(method).range(st, 8, False)
        assert np.isfinite(lo) and np.isfinite(hi)


def test_entropy_threshold_matches_onnxruntime():
    """autoquant's vectorized KL search gives ORT's HistogramCollector thresholds exactly (heavy tails, spikes,
    empty bins, one-sided data, int8 and int4 levels)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from autoquant.observers.entropy import ENTROPY_BINS, entropy_threshold

    rng = np.random.default_rng(0)
    edges = np.linspace(-4.0, 4.0, ENTROPY_BINS + 1).astype(np.float32)
    hists = [np.histogram(rng.standard_t(3, 5000).clip(-4, 4), edges)[0],
             np.histogram(np.abs(rng.normal(0, 1, 3000)).clip(0, 4), edges)[0],
             np.bincount(rng.integers(200, 300, 400), minlength=ENTROPY_BINS)]
    spiky = np.zeros(ENTROPY_BINS, np.int64)
    spiky[[10, 256, 257, 300, 511]] = [1, 900, 50, 7, 2]
    hists.append(spiky)
    for hist in hists:
        for nq in (128, 8):
            collector = HistogramCollector(method="entropy", symmetric=True, num_bins=ENTROPY_BINS,
                                           num_quantized_bins=nq, percentile=99.99, scenario="same")
            want = collector.get_entropy_threshold((hist, edges, np.float32(-9), np.float32(9)), nq)
            got = entropy_threshold(hist, edges, nq)
            assert (float(got[0]), float(got[1])) == (float(want[0]), float(want[1]))
