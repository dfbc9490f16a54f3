"""Repair: when every scored trial is infeasible, the most accurate one gets just enough float nodes."""

import math
import warnings

import pytest
from optuna.trial import TrialState

from autoquant import optimize
from autoquant.repair import (DEFAULT_DB_PER_DECADE, REPAIR_OF, TARGET_SHARE, TRIM_OF, db_per_decade, ladder, required_sqnr,
                              scope_ladder)
from autoquant.space import Domain

BASE = {"calibration": "minmax", "weight_bits": 8, "activation_bits": 8, "weight_granularity": "per_tensor",
        "weight_rounding": "nearest_even", "cle": False, "bn_fold": True, "bias_correction": False, "a16_k": 0}


def run(demo, tmp_path, space, **kw):
    calls = []

    def evaluate(path):
        calls.append(path)
        return demo.evaluate(path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = optimize(str(demo.model_path), demo.calibration_data, evaluate, search_space={"knobs": space},
                     output_dir=tmp_path / "o", show_progress=False, **kw)
    return r, calls


def test_ladder_steps_above_the_current_value():
    # only values of the space (a FixedTrial with 10 would fail): 16 is the first step that reaches all 10 nodes
    assert ladder(Domain(values=(0, 1, 2, 4, 8, 16, 32)), n_nodes=10, current=1) == [2, 4, 8, 16]
    assert ladder(Domain(values=(0, 1, 2, 4, 8, 16, 32)), n_nodes=15, current=8) == [16]
    assert ladder(Domain(values=(0, 1, 2, 4, 8, 16, 32)), n_nodes=1, current=0) == [1]
    assert ladder(Domain(values=(0, 4)), n_nodes=1, current=0) == [4]
    assert ladder(Domain(low=0, high=20), n_nodes=100, current=0) == [1, 2, 4, 8, 16, 20]
    assert ladder(Domain(low=0, high=20), n_nodes=5, current=2) == [4, 5]
    assert ladder(Domain(values=(3,)), n_nodes=10, current=0) == []  # fixed by the space
    assert ladder(None, n_nodes=10, current=0) == []


def test_scope_ladder_narrows_within_the_space():
    dom = Domain(values=("compute", "compute_and_movement", "all"))
    assert scope_ladder(dom, "all") == ["compute_and_movement", "compute"]
    assert scope_ladder(dom, "compute") == []
    assert scope_ladder(Domain(values=("all", "compute")), "all") == ["compute"]
    assert scope_ladder(Domain(values=("all", "Gather+MatMul")), "all") == []  # op lists are not on the ladder


def test_required_sqnr_follows_the_noise_amplitude():
    # a drop twice TARGET_SHARE x allowed needs the output noise halved: +6.02 dB
    assert required_sqnr(14.0, 2 * TARGET_SHARE * 0.01, 0.01) == pytest.approx(14.0 + 20 * math.log10(2))
    assert required_sqnr(14.0, 0.5, 0.01) > required_sqnr(14.0, 0.05, 0.01) > 14.0
    assert required_sqnr(14.0, 0.02, 0.0) == math.inf  # nothing may drop: the ladder's top


def test_infeasible_start_is_repaired_with_sensitive_nodes_in_float(demo, tmp_path):
    # every starting point of this space is int8 everywhere (the naive demo model loses ~5 points); fallback_k=2
    # keeps conv1 and conv2 float (0.29x size), 3 also fc1 (every weight that matters: no compression left)
    space = {**BASE, "fallback_k": [0, 1, 2, 3]}
    r, calls = run(demo, tmp_path, space, n_trials=6, stop_when_feasible=True, seed=0, measure_latency=False)
    trials = r.study.get_trials(deepcopy=False)
    repairs = [t for t in trials if REPAIR_OF in t.user_attrs]
    assert repairs, "no repair was enqueued"
    first = repairs[0]
    repaired = trials[first.user_attrs[REPAIR_OF]]
    assert repaired.state == TrialState.COMPLETE and not repaired.user_attrs["feasible"]
    assert first.params["fallback_k"] > repaired.params.get("fallback_k", 0)
    assert {k: v for k, v in first.params.items() if k != "fallback_k"} == \
        {k: v for k, v in repaired.params.items() if k != "fallback_k"}
    assert first.user_attrs["enqueued"].startswith(f"repair of trial {repaired.number}")
    # its trial reused the screened build: same SQNR, and it raised the SQNR
    assert first.user_attrs["details"]["sqnr_db"] == pytest.approx(first.user_attrs["screen_sqnr_db"])
    assert first.user_attrs["details"]["sqnr_db"] > repaired.user_attrs["details"]["sqnr_db"]
    assert r.feasible and r.trial_number == first.number
    assert len(calls) == 1 + sum(t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs["details"]
                                 for t in trials)
    assert (tmp_path / "o" / "trials").is_dir() and not list((tmp_path / "o" / "trials").glob("*/screen"))


def test_no_repair_once_feasible_or_without_screening(demo, tmp_path):
    space = {**BASE, "fallback_k": [0, 1, 3]}
    r, _ = run(demo, tmp_path / "loose", space, n_trials=3, allowed_accuracy_drop=1.0)
    assert not any(REPAIR_OF in t.user_attrs for t in r.study.trials)  # the first trial is feasible
    r, _ = run(demo, tmp_path / "noprune", space, n_trials=3, prune=False)
    assert not any(REPAIR_OF in t.user_attrs for t in r.study.trials)  # no SQNR to aim with


def test_a_trial_is_repaired_once(demo, tmp_path):
    # limit 0: nothing is feasible, so repair would go on forever if it repeated itself
    space = {**BASE, "fallback_k": [0, 1, 3]}
    r, _ = run(demo, tmp_path, space, n_trials=8, allowed_accuracy_drop=0.0)
    targets = [t.user_attrs[REPAIR_OF] for t in r.study.trials if REPAIR_OF in t.user_attrs]
    assert targets and len(targets) == len(set(targets))


def test_the_next_close_trial_is_repaired_when_the_most_accurate_cannot_be(demo, tmp_path):
    # entropy calibration on the demo: trial 0 (compute) and 1 (compute_and_movement) both score 0.961; the repair
    # of trial 0 (2 nodes float) reaches 0.973 but has no useful step left, so trial 1, as close to the limit
    # as trial 0 was, is repaired next instead of the search handing over to the sampler
    space = {**BASE, "calibration": "entropy", "quantize_ops": ["compute_and_movement", "compute"],
             "fallback_k": [0, 1, 2, 3], "a16_k": [0, 1, 2]}
    r, _ = run(demo, tmp_path, space, n_trials=4, allowed_accuracy_drop=0.0, measure_latency=False, seed=0)
    trials = r.study.get_trials(deepcopy=False)
    repairs = [t for t in trials if REPAIR_OF in t.user_attrs]
    targets = [t.user_attrs[REPAIR_OF] for t in repairs]
    assert len(targets) >= 2 and len(set(targets)) == len(targets)
    later = repairs[1]
    before = [t for t in trials[: later.number] if t.state == TrialState.COMPLETE]
    most_accurate = max(before, key=lambda t: (t.user_attrs["accuracy"], -t.number))
    assert later.user_attrs[REPAIR_OF] != most_accurate.number  # not the most accurate: a close one


def test_db_per_decade_is_fitted_on_clear_drops_and_bounded():
    pts = [(10.0, 0.1), (30.0, 0.001)]  # two decades over 20 dB
    assert db_per_decade(pts, 0.001) == pytest.approx(10.0)
    assert db_per_decade([(10.0, 0.1), (50.0, 0.01)], 0.01) == pytest.approx(40.0)  # 40 dB/decade: at the bound
    assert db_per_decade([(10.0, 0.1), (90.0, 0.01)], 0.01) == 40.0  # clipped
    assert db_per_decade([(10.0, 0.1)], 0.01) == DEFAULT_DB_PER_DECADE  # one point
    assert db_per_decade([(10.0, 0.1), (30.0, 0.0005)], 0.01) == DEFAULT_DB_PER_DECADE  # second drop is noise
    assert db_per_decade([(10.0, 0.01), (30.0, 0.1)], 0.01) == DEFAULT_DB_PER_DECADE  # rising: no fit


def test_a_feasible_repair_is_trimmed_to_the_cheapest_feasible_step(demo, tmp_path):
    space = {**BASE, "fallback_k": [0, 1, 2, 3]}
    r, calls = run(demo, tmp_path, space, n_trials=6, seed=0, measure_latency=False)
    trials = r.study.get_trials(deepcopy=False)
    repair = next(t for t in trials if REPAIR_OF in t.user_attrs)
    # the top useful step (3 leaves nothing compressed), feasible
    assert repair.user_attrs["feasible"] and repair.params["fallback_k"] == 2
    trims = [t for t in trials if t.user_attrs.get(TRIM_OF) == repair.number]
    assert [t.params["fallback_k"] for t in trims] == [1]  # the one step between 0 (infeasible) and 2
    assert trims[0].number == repair.number + 1 and trims[0].user_attrs["enqueued"].startswith("trim of repair")
    assert trims[0].state == TrialState.COMPLETE  # a trim is never pruned: only its full eval answers it
    assert {k: v for k, v in trims[0].params.items() if k != "fallback_k"} == \
        {k: v for k, v in repair.params.items() if k != "fallback_k"}
