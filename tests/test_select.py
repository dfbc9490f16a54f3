"""Choosing the delivered trial: the default never prefers a slower-than-fp32 model over a faster one."""

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from autoquant.select import rank


def _trial(number, accuracy, size, latency_ratio, feasible=True, bops=1.0, bops_ratio=0.0625, default_threads=None):
    details = {"latency_ratio": latency_ratio, "latency_ms": latency_ratio, "bops": bops, "bops_ratio": bops_ratio}
    if default_threads is not None:
        details["latency_ratio_default_threads"] = details["latency_ms_default_threads"] = default_threads
    t = create_trial(state=TrialState.COMPLETE, values=[accuracy, size],
                     user_attrs={"accuracy": accuracy, "feasible": feasible, "size_bytes": size, "details": details})
    t.number = number
    return t


def test_smallest_prefers_feasible_models_not_slower_than_fp32():
    a16 = _trial(0, 0.99, 100, 2.1)  # smallest file, twice as slow as float
    int8 = _trial(1, 0.99, 110, 0.73)
    assert rank([a16, int8], "smallest", True)[0] is int8


def test_smallest_falls_back_to_size_when_nothing_is_fast():
    a, b = _trial(0, 0.99, 100, 1.9), _trial(1, 0.995, 120, 1.2)
    assert rank([a, b], "smallest", True)[0] is a


def test_a_model_at_fp32_speed_beats_a_smaller_slower_one_and_infeasible_fast_models_are_ignored():
    near_float = _trial(0, 0.999, 300, 0.97)
    fast_but_bad = _trial(1, 0.5, 120, 0.5, feasible=False)
    small = _trial(2, 0.99, 100, 1.4)
    assert rank([near_float, fast_but_bad, small], "smallest", True)[0] is near_float


def test_a_model_no_smaller_than_fp32_never_counts_as_fast():
    """Seen in CI under load: 3 of 4 nodes float (bigger than fp32, 130 kB) timed at 0.92 by noise."""
    mostly_float = _trial(0, 1.0, 135_952, 0.92, bops_ratio=0.997)
    int8 = _trial(1, 0.995, 40_000, 1.3)
    assert rank([mostly_float, int8], "smallest", True, fp32_size=130_000)[0] is int8


def test_smallest_within_the_fast_band_never_a_much_slower_smaller_one():
    """A file a few bytes smaller does not buy 3x the latency: the smallest model near the fastest wins."""
    fastest = _trial(0, 0.99, 280, 0.28)
    near = _trial(1, 0.99, 270, 0.30)  # within max(1.1 r, r + 0.05) of the fastest
    small_slowish = _trial(2, 0.99, 240, 0.97)  # not slower than fp32, but far from the fastest
    order = rank([fastest, near, small_slowish], "smallest", True, fp32_size=1000)
    assert [t.number for t in order] == [1, 0, 2]


def test_delivery_rule_reads_the_threading_the_user_chose():
    # single-threaded it is fast; with ORT's default threading (the default rule) it is slower than fp32
    a = _trial(0, 0.99, 100, 0.6, default_threads=1.4)
    b = _trial(1, 0.99, 200, 0.9, default_threads=0.8)
    assert rank([a, b], "smallest", True, fp32_size=1000)[0] is b
    assert rank([a, b], "smallest", True, fp32_size=1000, threading="single")[0] is a
    assert rank([a, b], "fastest", True, threading="default")[0] is b


@pytest.mark.parametrize("select, expected", [("fastest", 1), ("most_accurate", 0), ("fewest_bops", 0)])
def test_other_modes_follow_their_metric(select, expected):
    trials = [_trial(0, 0.999, 300, 1.5, bops=1.0), _trial(1, 0.99, 200, 0.6, bops=2.0)]
    assert rank(trials, select, True)[0].number == expected


def test_real_study_frozen_trials(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"], storage=f"sqlite:///{tmp_path}/s.db")
    study.add_trial(_trial(0, 0.99, 100, 2.1))
    study.add_trial(_trial(0, 0.99, 150, 0.8))
    best = rank(study.get_trials(states=(TrialState.COMPLETE,)), "smallest", True)[0]
    assert best.user_attrs["size_bytes"] == 150


def test_smallest_prefers_a_model_at_fp32_speed_to_a_smaller_much_slower_one():
    """Seen on PP-OCR: sensitive layers float (0.60x size, 0.98x latency) vs ORT dynamic quantization
    of the convolutions (0.56x size, 2.6x latency)."""
    at_fp32_speed = _trial(0, 0.970, 601, 0.98, bops_ratio=0.82)
    dynamic = _trial(1, 0.972, 563, 2.58, bops_ratio=0.78)
    assert rank([at_fp32_speed, dynamic], "smallest", True, fp32_size=1000)[0] is at_fp32_speed
    assert rank([at_fp32_speed, dynamic], "smallest", True)[0] is at_fp32_speed  # fp32 size unknown: speed still
    # not a compression (mostly float, bigger than 0.75x fp32): the small slow model still wins
    bulky = _trial(2, 0.999, 900, 1.0, bops_ratio=0.99)
    assert rank([bulky, dynamic], "smallest", True, fp32_size=1000)[0] is dynamic
    # faster than fp32 comes first
    fast = _trial(3, 0.97, 700, 0.6, bops_ratio=0.3)
    assert rank([at_fp32_speed, dynamic, fast], "smallest", True, fp32_size=1000)[0] is fast
