"""The stage boundary: an exception injected into any stage after validation degrades that stage, is recorded,
and the search still delivers; a bug outside the stages is an InternalError that keeps the completed trials."""

import warnings

import optuna
import pytest

from autoquant import optimize
from autoquant.errors import InternalError, NoCompletedTrialError

SPACE = {"knobs": {"calibration": "minmax", "weight_granularity": ["per_tensor", "per_channel"], "fallback_k": [0, 1, 2]}}


def _boom(*args, **kwargs):
    raise RuntimeError("injected fault")


def _run(demo, tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=tmp_path / "o",
                        show_progress=False, **{"n_trials": 3, "search_space": SPACE, **kw})


#: (what to break, the stage named in the warning, optimize() keyword arguments)
FAULTS = [
    ("autoquant.api.measure_sensitivity", "sensitivity", {}),
    ("autoquant.objective.Objective.screen", "screening", {}),
    ("autoquant.prune.Pruner.sqnr", "SQNR", {}),
    ("autoquant.cost.SpeedMeter.measure", "latency", {}),
    # nothing feasible, and the queue of starting points empties after two: the repair runs
    ("autoquant.api.repair_point", "repair", {"allowed_accuracy_drop": 0.0, "search_space": {"knobs": {
        "calibration": "minmax", "weight_granularity": "per_channel", "fallback_k": [0, 1, 2]}}}),
    ("autoquant.api.write_deployment", "encodings", {}),
    ("autoquant.api.save_csv", "report", {}),
]


@pytest.mark.parametrize("target, stage, kw", FAULTS, ids=[f[1] for f in FAULTS])
def test_a_failing_stage_degrades_and_the_search_delivers(demo, tmp_path, monkeypatch, target, stage, kw):
    monkeypatch.setattr(target, _boom)
    r = _run(demo, tmp_path, **kw)
    assert r.model_path and r.trial_number >= 0
    notes = [w for w in r.warnings if "injected fault" in w]
    assert notes and stage in notes[0], r.warnings
    assert any(stage in d for d in r.study.user_attrs["degradations"])
    done = [t for t in r.study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 3  # the search went on to n_trials


def test_a_bug_inside_one_trial_fails_only_that_trial(demo, tmp_path, monkeypatch):
    import autoquant.objective as objective

    real = objective.bops
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "bops", flaky)
    r = _run(demo, tmp_path)
    failed = [t for t in r.study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and "internal error in the trial (ZeroDivisionError" in failed[0].user_attrs["fail_reason"]
    assert r.model_path


def test_a_bug_outside_the_stages_is_an_internal_error_and_keeps_completed_trials(demo, tmp_path, monkeypatch):
    _run(demo, tmp_path, n_trials=2)
    monkeypatch.setattr("autoquant.api._deliver", _boom)
    with pytest.raises(InternalError, match="delivery") as info:
        _run(demo, tmp_path, n_trials=3)
    assert "RuntimeError: injected fault" in str(info.value)
    storage = f"sqlite:///{tmp_path / 'o' / 'study.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2


def test_every_trial_failing_is_still_a_no_completed_trial_error_with_reasons(demo, tmp_path, monkeypatch):
    monkeypatch.setattr("autoquant.objective.bops", _boom)
    with pytest.raises(NoCompletedTrialError, match="internal error in the trial"):
        _run(demo, tmp_path)
