"""Quantization modes: static QDQ, ORT dynamic quantization, weight-only."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
from onnx import TensorProto, numpy_helper

from autoquant import optimize
from autoquant.encodings import encodings_from_model
from autoquant.space import SearchSpace


def run(demo, tmp_path, name, **knobs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=1.0,
                     search_space={"knobs": {"fallback_k": 0, **knobs}}, n_trials=1, output_dir=tmp_path / name,
                     show_progress=False)
    model = onnx.load(r.model_path)
    ort.InferenceSession(r.model_path, providers=["CPUExecutionProvider"])
    if r.config["mode"] == "dynamic":  # no file format holds run-time activation scales: no encodings written
        assert r.encodings_path is None and r.float_model_path is None
        return r, model, encodings_from_model(model)  # the weights' parameters, read off the model
    return r, model, json.loads(open(r.encodings_path).read())


def test_dynamic(demo, tmp_path):
    r, model, enc = run(demo, tmp_path, "dyn", mode="dynamic", weight_granularity="per_channel")
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops and "QuantizeLinear" not in ops
    assert r.config["weight_bits"] == 8 and r.config["activation_bits"] == 8  # conditional knobs
    assert len(enc["param_encodings"]) == 4 and enc["activation_encodings"] == []
    assert r.size_ratio < 0.5


def test_dynamic_fallback_keeps_gemm_float(demo, tmp_path):
    """ORT renames a Gemm before excluding nodes; the node the search keeps float must stay float."""
    r, model, enc = run(demo, tmp_path, "dynfb", mode="dynamic", fallback_k=3)
    assert len(r.float_nodes) == 3
    quantized = {n.name for n in model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger")}
    assert len(quantized) == 1 and not any(q.startswith(tuple(r.float_nodes)) for q in quantized)
    assert len(enc["param_encodings"]) == 1


@pytest.mark.parametrize("bits, rounding", [(8, "nearest_even"), (4, "nearest_away"), (4, "adaround")])
def test_weight_only(demo, tmp_path, bits, rounding):
    r, model, enc = run(demo, tmp_path, f"wo{bits}{rounding}", mode="weight_only", weight_bits=bits,
                        weight_granularity="per_channel", weight_rounding=rounding)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 4  # weights only
    qtype = TensorProto.INT8 if bits == 8 else TensorProto.INT4
    weights = [t for t in model.graph.initializer if t.name.endswith(".w_quantized")]
    assert len(weights) == 4 and all(t.data_type == qtype for t in weights)
    ints = [e for e in enc["param_encodings"] if e["dtype"] == "INT"]
    assert all(e["dtype"] == "FLOAT" for e in enc["activation_encodings"])  # activations stay float
    assert len(ints) == 4 and all(e["enc_type"] == "PER_CHANNEL" for e in ints)
    assert demo.evaluate(r.model_path) == r.accuracy
    d = r.study.trials[0].user_attrs["details"]
    assert d["bops_ratio"] == pytest.approx(bits * 32 / 1024)
    if rounding == "adaround":
        assert d["adaround_layers"] == 4


def test_weight_only_matches_orts_integers(demo, tmp_path):
    """Weight-only integers equal what ORT's static quantizer writes for the same weights."""
    _, wo, _ = run(demo, tmp_path, "wo", mode="weight_only", weight_granularity="per_channel")
    _, st, _ = run(demo, tmp_path, "st", mode="static", weight_granularity="per_channel")
    a = {t.name: numpy_helper.to_array(t) for t in wo.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in st.graph.initializer}
    for w in ("conv1.w", "conv2.w", "fc1.w", "fc2.w"):
        assert np.array_equal(a[f"{w}_quantized"], b[f"{w}_quantized"])
        assert np.array_equal(a[f"{w}_scale"], b[f"{w}_scale"])


def test_activation_knobs_only_sampled_in_static_mode():
    space = SearchSpace.load("default")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    modes = set()
    for _ in range(30):
        t = study.ask()
        c = space.suggest(t, 4)
        study.tell(t, 0.0)
        modes.add(c["mode"])
        if c["mode"] != "static":
            assert "calibration" not in t.params and "activation_bits" not in t.params
            assert c["bias_correction"] is False and c["a16_k"] == 0
    assert modes == {"static", "dynamic", "weight_only"}
