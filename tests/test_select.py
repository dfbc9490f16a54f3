"""Choosing the delivered trial: the default never prefers a slower-than-fp32 model over a faster one."""

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from autoquant.select import FASTER_THAN_FP32, rank


def _trial(number, accuracy, size, latency_ratio, feasible=True, bops=1.0, bops_ratio=0.0625):
    t = create_trial(state=TrialState.COMPLETE, values=[accuracy, size],
                     user_attrs={"accuracy": accuracy, "feasible": feasible, "size_bytes": size,
                                 "details": {"latency_ratio": latency_ratio, "latency_ms": latency_ratio, "bops": bops,
                                             "bops_ratio": bops_ratio}})
    t.number = number
    return t


def test_smallest_prefers_feasible_models_faster_than_fp32():
    a16 = _trial(0, 0.99, 100, 2.1)  # smallest file, twice as slow as float
    int8 = _trial(1, 0.99, 110, 0.73)
    assert rank([a16, int8], "smallest", True)[0] is int8


def test_smallest_falls_back_to_size_when_nothing_is_faster():
    a, b = _trial(0, 0.99, 100, 1.9), _trial(1, 0.995, 120, 1.2)
    assert rank([a, b], "smallest", True)[0] is a


def test_noise_margin_and_infeasible_fast_models_ignored():
    near_float = _trial(0, 0.999, 300, FASTER_THAN_FP32 + 0.02)  # within timing noise of fp32: not "faster"
    fast_but_bad = _trial(1, 0.5, 120, 0.5, feasible=False)
    small = _trial(2, 0.99, 100, 1.4)
    assert rank([near_float, fast_but_bad, small], "smallest", True)[0] is small


def test_mostly_float_model_timed_faster_by_noise_is_not_preferred():
    """Seen in CI under load: 3 of 4 nodes float (bops ratio 0.997, bigger than fp32) timed at 0.92."""
    mostly_float = _trial(0, 1.0, 135_952, 0.92, bops_ratio=0.997)
    int8 = _trial(1, 0.995, 40_000, 1.3)
    assert rank([mostly_float, int8], "smallest", True)[0] is int8


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
    assert rank([at_fp32_speed, dynamic], "smallest", True)[0] is dynamic  # fp32 size unknown: size alone
    # not a compression (mostly float, bigger than 0.75x fp32): the small slow model still wins
    bulky = _trial(2, 0.999, 900, 1.0, bops_ratio=0.99)
    assert rank([bulky, dynamic], "smallest", True, fp32_size=1000)[0] is dynamic
    # faster than fp32 still comes first
    fast = _trial(3, 0.97, 700, 0.6, bops_ratio=0.3)
    assert rank([at_fp32_speed, dynamic, fast], "smallest", True, fp32_size=1000)[0] is fast
