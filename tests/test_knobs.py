"""Every knob of a config reaches the built QDQ model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import optimize
from autoquant.build import RangeCache, apply_weight_rounding, build_qdq_model, requantize

from _util import init_array


def build(prepared_demo, tmp_path, config, **kw):
    prepared, stats = prepared_demo
    out = tmp_path / "q.onnx"
    build_qdq_model(prepared.path, RangeCache(stats).ranges(config), config, out, **kw)
    model = onnx.load(str(out))
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # every variant must run
    return model


def weight_dq(model, weight):
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{weight}_quantized")


def activation_q(model, tensor):
    return next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)


def zp_type(model, node):
    return next(t.data_type for t in model.graph.initializer if t.name == node.input[2])


@pytest.mark.parametrize("granularity, n_scales", [("per_tensor", 1), ("per_channel", 8)])
def test_granularity(prepared_demo, tmp_path, base_config, granularity, n_scales):
    model = build(prepared_demo, tmp_path, dict(base_config, weight_granularity=granularity))
    dq = weight_dq(model, "conv1.w")
    assert init_array(model, dq.input[1]).size == n_scales


@pytest.mark.parametrize("bits, sym, expected", [
    (8, False, TensorProto.UINT8), (8, True, TensorProto.INT8),
    (16, False, TensorProto.UINT16), (16, True, TensorProto.INT16),
])
def test_activation_bits_and_symmetry(prepared_demo, tmp_path, base_config, bits, sym, expected):
    model = build(prepared_demo, tmp_path, dict(base_config, activation_bits=bits, activation_symmetric=sym))
    q = activation_q(model, "x")
    assert zp_type(model, q) == expected
    if sym:
        assert init_array(model, q.input[2]).item() == 0


@pytest.mark.parametrize("bits, expected", [(8, TensorProto.INT8), (4, TensorProto.INT4), (16, TensorProto.INT16)])
def test_weight_bits(prepared_demo, tmp_path, base_config, bits, expected):
    model = build(prepared_demo, tmp_path, dict(base_config, weight_bits=bits, weight_granularity="per_channel"))
    dq = weight_dq(model, "fc1.w")
    q = next(t for t in model.graph.initializer if t.name == dq.input[0])
    assert q.data_type == expected
    vals = numpy_helper.to_array(q).astype(np.int32)
    assert vals.min() >= -(2 ** (bits - 1)) and vals.max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("sym", [True, False])
def test_weight_symmetry(prepared_demo, tmp_path, base_config, sym):
    model = build(prepared_demo, tmp_path, dict(base_config, weight_symmetric=sym, weight_granularity="per_channel"))
    zps = np.concatenate([init_array(model, weight_dq(model, w).input[2]).reshape(-1)
                          for w in ("conv1.w", "conv2.w", "fc1.w", "fc2.w")])
    assert (np.all(zps == 0)) == sym


def test_calibration_method_changes_activation_scale(prepared_demo, tmp_path, base_config):
    scales = {}
    for method in ("minmax", "moving_average", "percentile", "entropy", "mse", "emd"):
        cfg = dict(base_config, calibration=method, percentile=99.9 if method == "percentile" else None)
        model = build(prepared_demo, tmp_path, cfg)
        scales[method] = float(init_array(model, activation_q(model, "x").input[1]))
    assert len(set(scales.values())) >= 4, scales  # the methods really differ on spiky inputs
    assert scales["percentile"] < scales["minmax"] and scales["emd"] < scales["minmax"]


def test_fallback_keeps_nodes_float(prepared_demo, tmp_path, base_config):
    model = build(prepared_demo, tmp_path, base_config, fallback_nodes=["conv2", "fc1"])
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["conv2"].input[1] == "conv2.w" and nodes["fc1"].input[1] == "fc1.w"  # float weights
    assert nodes["conv1"].input[1] != "conv1.w"  # still quantized
    float_inits = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert {"conv2.w", "fc1.w"} <= float_inits


@pytest.mark.parametrize("fallback", [["conv2"], ["fc1"], ["conv2", "fc1"]])
def test_fallback_stays_float_in_an_optimized_ort_session(prepared_demo, demo, tmp_path, base_config, fallback):
    """ORT's default optimisations (WeightBiasQuantization) quantize the float weights of a Conv / Gemm
    whose input comes from a DequantizeLinear: the fallback node must read a float tensor instead, and
    the Relu that ORT's writer folded into the Q's range must survive (a Clip to that range)."""
    build(prepared_demo, tmp_path, base_config, fallback_nodes=fallback)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    float_convs = [n for n in optimized.graph.node if n.op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm")]
    quantized = [n for n in optimized.graph.node if n.op_type in ("QLinearConv", "QGemm")]
    assert len(float_convs) >= len(fallback) and len(quantized) <= 4 - len(fallback)
    for n in optimized.graph.node:  # no weight quantized by the session for a fallback node
        assert not any(f"{f}_weight_q" in o for f in fallback for o in n.output)
    assert demo.evaluate(str(tmp_path / "q.onnx")) >= 0.94  # 0.80 when the folded Relu was lost


def _ties_model(path):
    # symmetric int8 per-tensor: absmax 127 -> scale exactly 1.0, so every x.5 weight is a tie
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]], dtype=np.float32).T  # (8, 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def test_rounding_ties_even_vs_away(tmp_path, base_config):
    from autoquant.stats import TensorStats

    w = _ties_model(tmp_path / "ties.onnx")
    st = TensorStats(-1.0, 1.0, -1.0, 1.0, np.ones(4096, np.int64), 1.0)
    ranges = {"x": (-1.0, 1.0), "y": (-200.0, 200.0)}
    results = {}
    for mode in ("nearest_even", "nearest_away"):
        out = tmp_path / f"{mode}.onnx"
        info = build_qdq_model(tmp_path / "ties.onnx", ranges, dict(base_config, weight_rounding=mode), out,
                               float_inits={"w": w})
        model = onnx.load(str(out))
        assert float(init_array(model, "w_scale")) == 1.0
        results[mode] = init_array(model, "w_quantized").reshape(-1).tolist()
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert results["nearest_even"] == [127, 0, 2, 2, 0, -2, -2, 3]
    assert results["nearest_away"] == [127, 1, 2, 3, -1, -2, -3, 3]
    assert st.min == -1.0  # (stats unused: ranges given directly)


def test_requantize_reproduces_ort_ties_even(prepared_demo, tmp_path, base_config):
    """Our integer formula equals ORT's for every weight when rounding is ORT's own (guards the mapping)."""
    prepared, _ = prepared_demo
    float_inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(prepared.path)).graph.initializer}
    for cfg in (dict(base_config, weight_granularity="per_channel"), dict(base_config, weight_bits=4),
                dict(base_config, weight_symmetric=False, weight_granularity="per_channel")):
        model = build(prepared_demo, tmp_path, cfg)
        assert apply_weight_rounding(model, float_inits, "nearest_even") == 0


def test_requantize_clips_to_grid():
    q = requantize(np.array([-1000.0, 1000.0]), np.array(1.0), np.array(0), None, -8, 7, "nearest_away")
    assert q.tolist() == [-8, 7]


def test_all_knobs_reach_the_delivered_model(demo, tmp_path):
    space = {"knobs": {"calibration": "percentile", "percentile": 99.99, "weight_granularity": "per_channel",
                       "weight_bits": 4, "activation_bits": 16, "fallback_k": 1}}
    r = optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=1.0,
                 search_space=space, n_trials=1, output_dir=tmp_path / "o", show_progress=False)
    model = onnx.load(r.model_path)
    assert r.config["weight_bits"] == 4 and r.config["activation_bits"] == 16 and len(r.float_nodes) == 1
    types = {t.data_type for t in model.graph.initializer}
    assert TensorProto.INT4 in types and TensorProto.UINT16 in types
    fallback = r.float_nodes[0]
    node = next(n for n in model.graph.node if n.name == fallback)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in node.input[1:])  # weights stay float
