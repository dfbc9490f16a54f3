"""Search efficiency: sensitivity, mixed precision, pruning, starting points, stopping, plots."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from optuna.trial import TrialState

from autoquant.study import trial_folder
from autoquant import optimize
from autoquant.space import SearchSpace
from autoquant.demo import DemoTask, build_demo_model

BASE = {"calibration": "minmax", "weight_bits": 8, "activation_bits": 8, "weight_granularity": "per_tensor",
        "weight_rounding": "nearest_even", "cle": False, "bn_fold": True, "bias_correction": False}


def quiet_optimize(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(*args, show_progress=False, **kw)


def test_sensitivity_ranks_a_broken_node_first(demo, tmp_path):
    model = build_demo_model(0)
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {n: numpy_helper.to_array(inits[n]).copy() for n in ("conv2.w", "conv2.b", "fc1.w")}
    arrays["conv2.w"][0], arrays["conv2.b"][0] = 0.0, -1.0  # channel 0 of conv2 is dead: relu(-1) = 0
    arrays["fc1.w"][:, :64] = 1000.0  # huge weights that only ever multiply that dead channel: fp32 unchanged,
    for name, arr in arrays.items():  # but per-tensor int8 of fc1 now rounds every real weight to zero
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    r = quiet_optimize(str(path), demo.calibration_data, lambda p: 1.0, allowed_accuracy_drop=1.0,
                       search_space={"knobs": {**BASE, "fallback_k": 1}}, n_trials=1,  # the trial needs the ranking
                       output_dir=tmp_path / "o")
    assert r.float_nodes == ["fc1"]
    sens = r.sensitivity()
    assert list(sens.columns) == ["node", "sqnr_db_w8a8", "sqnr_db_w4a8", "sqnr_db_w8a16"]
    assert sens["node"].iloc[0] == "fc1"
    assert sens["sqnr_db_w8a8"].iloc[0] < sens["sqnr_db_w8a8"].iloc[1] - 10
    assert set(sens["node"]) == {"conv1", "conv2", "fc1", "fc2"}


def test_starting_points_run_first(demo, tmp_path):
    n_points = len(SearchSpace.load("default").starting_points())
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, n_trials=n_points + 1,
                       output_dir=tmp_path / "o")
    first = r.study.trials[:n_points]
    labels = [t.user_attrs.get("enqueued") for t in first]
    assert all(labels) and any(lab.startswith("onnxruntime defaults") for lab in labels)
    trt = next(t for t in first if t.user_attrs["enqueued"].startswith("tensorrt-style"))
    assert trt.params["calibration"] == "entropy" and trt.params["weight_granularity"] == "per_channel"
    # screened before any eval: points not slower than fp32 first, then fully static-quantized before the
    # rescue points (float nodes), each group highest SQNR first; each trial reuses its screened build
    assert any(t.user_attrs["config"]["mode"] == "dynamic" for t in first)
    key = [(t.user_attrs["screen_latency_ratio"] > 1.0,  # dynamic quantization of convolutions is a rescue point
            bool(t.user_attrs["config"]["fallback_k"]) or t.user_attrs["config"]["mode"] == "dynamic",
            -t.user_attrs["screen_sqnr_db"]) for t in first]
    assert key == sorted(key)
    assert {t.user_attrs["config"]["quantize_ops"] for t in first} >= {"all", "compute", "compute_and_movement"}
    for t in first:
        if t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs["details"]:
            assert t.user_attrs["details"]["sqnr_db"] == pytest.approx(t.user_attrs["screen_sqnr_db"])
    assert (tmp_path / "o" / "trials").is_dir() and not list((tmp_path / "o" / "trials").glob("*/screen"))


def test_same_config_is_not_rebuilt_or_reevaluated(demo, tmp_path):
    calls = []

    def evaluate(path):
        calls.append(path)
        return demo.evaluate(path)

    space = {"knobs": {**BASE, "weight_granularity": ["per_tensor", "per_channel"], "fallback_k": 0}}
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, evaluate, search_space=space, n_trials=8,
                       output_dir=tmp_path / "o", prune=False, allowed_accuracy_drop=1.0)
    assert len(r.study.trials) == 8 and len(calls) == 1 + 2  # fp32 + the two distinct configs
    reused = [t for t in r.study.trials if "reused_from" in t.user_attrs["details"]]
    assert len(reused) == 6
    for t in reused:
        src = r.study.trials[t.user_attrs["details"]["reused_from"]]
        assert src.user_attrs["config"] == t.user_attrs["config"] and src.values == t.values
        assert "reused_from" not in src.user_attrs["details"]  # never a chain: the evaluated trial


def test_known_baseline_skips_the_fp32_eval(demo, tmp_path):
    calls = []

    def evaluate(path):
        calls.append(path)
        return demo.evaluate(path)

    r = quiet_optimize(str(demo.model_path), demo.calibration_data, evaluate, n_trials=2, output_dir=tmp_path / "o",
                       baseline_accuracy=1.0)
    assert str(demo.model_path) not in calls and r.eval_calls == len(calls) and r.baseline_accuracy == 1.0
    with pytest.raises(Exception, match="baseline_accuracy=0.5 differs"):
        quiet_optimize(str(demo.model_path), demo.calibration_data, evaluate, n_trials=2, output_dir=tmp_path / "o",
                       baseline_accuracy=0.5)


def test_pruning_skips_the_full_eval_of_a_hopeless_trial(demo, tmp_path):
    seen = []

    def evaluate(path):
        seen.append(path)
        return demo.evaluate(path)

    # trial 0: int8 per-tensor (infeasible: drop ~0.05); then 4-bit per-tensor weights: far lower SQNR
    space = {"knobs": {**BASE, "weight_bits": [8, 4], "fallback_k": 0}}
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, evaluate, search_space=space, n_trials=6,
                       output_dir=tmp_path / "o", seed=0)
    pruned = [t for t in r.study.trials if t.state == TrialState.PRUNED]
    assert pruned, [t.params for t in r.study.trials]
    for t in pruned:
        assert t.params["weight_bits"] == 4 and "SQNR" in t.user_attrs["prune_reason"]
        assert not any(p.endswith(f"trial_{t.number:05d}.onnx") for p in seen)  # never evaluated
        assert not (trial_folder(tmp_path / "o", r.study.study_name) / f"trial_{t.number:05d}.onnx").exists()
    assert len(seen) < 1 + 6  # fewer full evals than trials
    assert "prune_reason" not in r.study.trials[r.trial_number].user_attrs


def test_no_pruning_when_disabled(demo, tmp_path):
    space = {"knobs": {**BASE, "weight_bits": [8, 4], "fallback_k": 0}}
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, search_space=space, n_trials=6,
                       output_dir=tmp_path / "o", seed=0, prune=False)
    assert all(t.state == TrialState.COMPLETE for t in r.study.trials)


def test_eval_subset_callback_prunes(demo, tmp_path):
    subset_calls = []

    def subset(path):
        subset_calls.append(path)
        return demo.evaluate(path)

    space = {"knobs": {**BASE, "weight_bits": 4, "fallback_k": 0}}  # every trial ~0.1 drop
    with pytest.raises(Exception, match="no trial"):
        quiet_optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, search_space=space, n_trials=2,
                       output_dir=tmp_path / "o", eval_subset_callback=subset, allowed_accuracy_drop=0.01)
    assert subset_calls  # scored on the subset, pruned there, never fully evaluated


def test_max_high_precision_fraction(demo, tmp_path):
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, n_trials=10,
                       output_dir=tmp_path / "o", max_high_precision_fraction=0.25, allowed_accuracy_drop=0.05)
    complete = [t for t in r.study.trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert t.user_attrs["high_precision_fraction"] <= 0.25
        assert t.user_attrs["config"]["activation_bits"] == 8
    over = [t for t in r.study.trials if "max_high_precision_fraction" in t.user_attrs.get("prune_reason", "")]
    assert all(t.state == TrialState.PRUNED for t in over)


def test_mixed_precision_reaches_the_model(demo, tmp_path):
    space = {"knobs": {**BASE, "weight_granularity": "per_channel", "fallback_k": 1, "a16_k": 1, "w4_fraction": 0.5}}
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, search_space=space, n_trials=1,
                       output_dir=tmp_path / "o", allowed_accuracy_drop=1.0)
    d = r.study.trials[0].user_attrs["details"]
    assert len(d["float_nodes"]) == 1 and len(d["a16_nodes"]) == 1 and len(d["w4_nodes"]) == 1
    assert not set(d["float_nodes"]) & set(d["a16_nodes"])
    model = onnx.load(r.model_path)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    w4 = d["w4_nodes"][0]
    weight = nodes[w4].input[1]  # DequantizeLinear output feeding the node
    dq = next(n for n in model.graph.node if n.output[0] == weight)
    assert inits[dq.input[0]].data_type == TensorProto.INT4
    assert inits[dq.input[1]].dims and inits[dq.input[1]].dims[0] > 1  # still per-channel
    a16 = nodes[d["a16_nodes"][0]]
    dq_in = next(n for n in model.graph.node if n.output[0] == a16.input[0])
    assert inits[dq_in.input[2]].data_type == TensorProto.UINT16
    assert d["bops_ratio"] < 1.0


def test_stop_when_feasible(demo, tmp_path):
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, n_trials=20,
                       output_dir=tmp_path / "o", stop_when_feasible=True, measure_latency=False)
    done = [t for t in r.study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    feasible = [t for t in done if t.user_attrs.get("feasible")]
    assert r.feasible and len(feasible) == 1 and feasible[0].number == max(t.number for t in done)
    assert len(done) < 20


def test_plot_written(demo, tmp_path):
    pytest.importorskip("matplotlib")
    r = quiet_optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, n_trials=3, output_dir=tmp_path / "o")
    png = tmp_path / "o" / "pareto.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.plot(tmp_path / "again.png").stat().st_size > 1000


def test_sqnr_pruner_verdicts_on_a_real_study(prepared_demo, tmp_path):
    """Rule (a): far below an infeasible trial; rule (b): dominated by a feasible trial (more SQNR, no
    more cost). Trials that could still join the Pareto front are never pruned."""
    import optuna
    from optuna.trial import create_trial

    from autoquant.prune import Pruner

    prepared, stats = prepared_demo
    pruner = Pruner(prepared.path, stats.samples, margin_db=3.0)
    study = optuna.create_study(directions=["maximize", "minimize"], storage=f"sqlite:///{tmp_path}/s.db")
    assert pruner.sqnr_verdict(study, 5.0, 100.0) is None  # nothing scored yet

    def add(sqnr, feasible, size):
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[0.9, size], user_attrs={
            "feasible": feasible, "details": {"sqnr_db": sqnr}}))

    add(30.0, True, 100.0)
    assert "dominated" in pruner.sqnr_verdict(study, 20.0, 100.0)
    assert pruner.sqnr_verdict(study, 20.0, 60.0) is None  # smaller: may be a new Pareto point
    assert pruner.sqnr_verdict(study, 28.0, 120.0) is None  # within the margin
    # a trial faster than the feasible one (which is slower than fp32) is not dominated by it
    assert pruner.sqnr_verdict(study, 20.0, 100.0, latency=lambda d: 2.5, ratio=0.5) is None
    assert "dominated" in pruner.sqnr_verdict(study, 20.0, 100.0, latency=lambda d: 0.9, ratio=0.5)
    add(15.0, False, 50.0)
    assert "below an infeasible" in pruner.sqnr_verdict(study, 10.0, 40.0)
    assert pruner.sqnr_verdict(study, 14.0, 40.0) is None
    assert Pruner(prepared.path, stats.samples, enabled=False).sqnr_verdict(study, 1.0, 1e9) is None


def test_timeout_interrupts_a_build_only_once_a_model_exists():
    import time

    import optuna
    from optuna.trial import create_trial

    from autoquant.api import _past_timeout

    study = optuna.create_study(directions=["maximize", "minimize"])
    stop = _past_timeout(study, time.perf_counter() - 10, timeout=5)
    assert not stop()  # past the timeout, but the first trial must still deliver a model
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[1.0, 1.0]))
    assert stop()
    assert not _past_timeout(study, time.perf_counter(), timeout=5)()


def test_refiner_passes_the_stop_request_to_adaround(prepared_demo, base_config, tmp_path):
    from autoquant.build import RangeCache, build_qdq_model
    from autoquant.refine import Refiner
    from autoquant.techniques.adaround import Interrupted

    prepared, stats = prepared_demo
    config = {**base_config, "weight_rounding": "adaround"}
    refiner = Refiner(prepared.path, stats.samples, tmp_path)
    with pytest.raises(Interrupted):
        build_qdq_model(prepared.path, RangeCache(stats).ranges(config), config, tmp_path / "m.onnx",
                        refine=lambda m: refiner.apply(m, config, should_stop=lambda: True))
    assert not (tmp_path / "m.onnx").exists()
