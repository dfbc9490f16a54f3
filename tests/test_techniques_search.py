"""The techniques as searched knobs: each one reaches the built model, each can be fixed on/off."""

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from autoquant import optimize
from autoquant.demo import DemoTask

FIXED = {"calibration": "minmax", "weight_bits": 8, "activation_bits": 8, "weight_granularity": "per_tensor",
         "weight_rounding": "nearest_even", "cle": False, "bn_fold": True, "bias_correction": False, "fallback_k": 0}


@pytest.fixture(scope="module")
def outlier(tmp_path_factory) -> DemoTask:
    return DemoTask(tmp_path_factory.mktemp("outlier"), kind="outlier")


def run(task, tmp_path, name, **knobs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # infeasible single trials are expected here
        r = optimize(str(task.model_path), task.calibration_data, task.evaluate, allowed_accuracy_drop=0.01,
                     search_space={"knobs": {**FIXED, **knobs}}, n_trials=1, output_dir=tmp_path / name,
                     show_progress=False)
    return r, onnx.load(r.model_path), r.study.trials[r.trial_number].user_attrs["details"]


def ints(model, name):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[name]


def test_bn_fold_knob(outlier, tmp_path):
    _, folded, d1 = run(outlier, tmp_path, "fold", bn_fold=True)
    _, kept, d0 = run(outlier, tmp_path, "keep", bn_fold=False)
    assert d1["variant"] == "bn_fold" and d0["variant"] == "base"
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert sum(n.op_type == "BatchNormalization" for n in kept.graph.node) == 2


def test_cle_knob_fixes_the_outlier_channel(outlier, tmp_path):
    r0, m0, _ = run(outlier, tmp_path, "plain", cle=False)
    r1, m1, d1 = run(outlier, tmp_path, "cle", cle=True)
    assert d1["variant"] == "cle" and r1.config["bn_fold"] is True  # CLE folds BatchNorm first
    # CLE shrinks the activation range the outlier channel stretched: the conv1 output scale drops
    act_scale = lambda m: max(float(numpy_helper.to_array(t)) for t in m.graph.initializer  # noqa: E731
                              if t.name.startswith("r1") and t.name.endswith("_scale"))
    assert act_scale(m1) < act_scale(m0) / 10
    assert r0.drop > 0.01 and r1.feasible  # naive int8 fails on this model; CLE alone makes it feasible


def test_bias_correction_knob_changes_biases(outlier, tmp_path):
    _, m0, _ = run(outlier, tmp_path, "nobc", bias_correction=False)
    _, m1, d1 = run(outlier, tmp_path, "bc", bias_correction=True)
    assert d1["bias_corrected_layers"] >= 1
    biases = [t.name for t in m1.graph.initializer if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT32]
    assert biases
    assert any(not np.array_equal(ints(m0, b), ints(m1, b)) for b in biases)


def test_adaround_knob_with_int4_per_channel(outlier, tmp_path):
    r0, m0, _ = run(outlier, tmp_path, "near", weight_bits=4, weight_granularity="per_channel")
    r1, m1, d1 = run(outlier, tmp_path, "ada", weight_bits=4, weight_granularity="per_channel",
                     weight_rounding="adaround")
    assert d1["adaround_layers"] == 4
    w0, w1 = ints(m0, "fc1.w_quantized"), ints(m1, "fc1.w_quantized")
    assert w1.dtype == w0.dtype and m1.graph.initializer  # int4 kept
    assert next(t for t in m1.graph.initializer if t.name == "fc1.w_quantized").data_type == onnx.TensorProto.INT4
    assert not np.array_equal(w0, w1) and np.abs(w0.astype(int) - w1.astype(int)).max() == 1  # up or down only
    assert np.array_equal(ints(m0, "fc1.w_scale"), ints(m1, "fc1.w_scale"))  # same grid, other rounding
    assert outlier.evaluate(r1.model_path) == r1.accuracy
    # AdaRound results are cached on disk, for later trials and resumed studies
    assert list((tmp_path / "ada" / "cache").glob("adaround-*.npz"))


def test_encodings_follow_the_final_model(outlier, tmp_path):
    r, model, _ = run(outlier, tmp_path, "enc", cle=True, weight_rounding="adaround", bias_correction=True)
    enc = json.loads(open(r.encodings_path).read())
    inits = {t.name: numpy_helper.to_array(t).reshape(-1) for t in model.graph.initializer}
    dq_scale = {n.input[0]: inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert enc["param_encodings"]
    for e in enc["param_encodings"]:
        assert np.array_equal(np.asarray(e["scale"], np.float32), dq_scale[f"{e['name']}_quantized"])


def test_default_space_finds_feasible_on_outlier_model(outlier, tmp_path):
    r = optimize(str(outlier.model_path), outlier.calibration_data, outlier.evaluate, allowed_accuracy_drop=0.01,
                 n_trials=15, output_dir=tmp_path / "search", show_progress=False, seed=0)
    assert r.feasible and outlier.evaluate(r.model_path) == r.accuracy
    df = r.report(all_trials=True)
    for col in ("cle", "bn_fold"):
        assert col in df.columns and df[col].notna().all()
    # bias correction acts on static models, weight rounding on static and weight-only ones: blank elsewhere
    assert df.loc[df["mode"] == "static", "bias_correction"].notna().all()
    assert df.loc[df["mode"] != "static", "bias_correction"].isna().all()
    assert df.loc[df["mode"] != "dynamic", "weight_rounding"].notna().all()
