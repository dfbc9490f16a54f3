"""A zoo of real-world graph shapes, each through optimize() with ladders longer than the model and an eval that
makes every starting point infeasible (so repair and trim run): each returns a result, no trial crashes."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import optimize

R = np.random.default_rng(0)
N = helper.make_node


def _w(name, *shape, scale=None):
    a = R.standard_normal(shape).astype(np.float32) * np.float32(scale or 1.0 / np.sqrt(shape[0]))
    return numpy_helper.from_array(a, name)


def _model(nodes, inputs, outputs, inits, opset=13, name="zoo"):
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


D = 64


def one_matmul():
    return _model([N("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x", ["N", D])], [_vi("y", ["N", D])], [_w("w", D, D)])


def three_compute_nodes():
    return _model([N("MatMul", ["x", "w0"], ["h0"], name="mm0"), N("Relu", ["h0"], ["r0"], name="relu"),
                   N("MatMul", ["r0", "w1"], ["h1"], name="mm1"), N("Add", ["h1", "x"], ["y"], name="residual")],
                  [_vi("x", ["N", D])], [_vi("y", ["N", D])], [_w("w0", D, D), _w("w1", D, D)])


def lstm_then_gemm():
    hid = 32
    return _model([N("LSTM", ["x", "W", "Rw", "B"], ["seq", "h", "c"], hidden_size=hid, name="lstm"),
                   N("Squeeze", ["h", "axes0"], ["h2"], name="squeeze"),
                   N("Gemm", ["h2", "wg", "bg"], ["y"], name="fc")],
                  [_vi("x", [8, "N", 16])], [_vi("y", ["N", 4])],
                  [_w("W", 1, 4 * hid, 16, scale=0.2), _w("Rw", 1, 4 * hid, hid, scale=0.2),
                   numpy_helper.from_array(np.zeros((1, 8 * hid), np.float32), "B"),
                   numpy_helper.from_array(np.array([0], np.int64), "axes0"), _w("wg", hid, 4),
                   numpy_helper.from_array(np.zeros(4, np.float32), "bg")])


def attention_with_mask():
    mask = np.zeros((1, 8, 1), np.float32)
    mask[:, 6:] = -10000.0
    return _model([N("MatMul", ["x", "wa"], ["s"], name="score"), N("Add", ["s", "mask"], ["m"], name="mask_add"),
                   N("Softmax", ["m"], ["a"], axis=1, name="softmax"), N("Mul", ["a", "x"], ["wx"], name="weight"),
                   N("ReduceSum", ["wx", "ax1"], ["p"], keepdims=0, name="pool"),
                   N("MatMul", ["p", "wc"], ["y"], name="cls")],
                  [_vi("x", ["N", 8, D])], [_vi("y", ["N", 4])],
                  [_w("wa", D, 1, scale=0.3), numpy_helper.from_array(mask, "mask"),
                   numpy_helper.from_array(np.array([1], np.int64), "ax1"), _w("wc", D, 4)])


def two_inputs_two_outputs():
    return _model([N("MatMul", ["a", "w0"], ["ha"], name="mma"), N("MatMul", ["b", "w1"], ["hb"], name="mmb"),
                   N("Add", ["ha", "hb"], ["s"], name="add"), N("MatMul", ["s", "w2"], ["y1"], name="head1"),
                   N("Sigmoid", ["s"], ["y2"], name="head2")],
                  [_vi("a", ["N", D]), _vi("b", ["N", D])], [_vi("y1", ["N", 8]), _vi("y2", ["N", D])],
                  [_w("w0", D, D), _w("w1", D, D), _w("w2", D, 8)])


def int64_tokens_with_embedding():
    return _model([N("Gather", ["emb", "ids"], ["e"], name="embed"), N("MatMul", ["e", "w"], ["h"], name="proj"),
                   N("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0, name="mean")],
                  [_vi("ids", ["N", "T"], TensorProto.INT64)], [_vi("y", ["N", D])],
                  [_w("emb", 100, D, scale=1.0), _w("w", D, D)])


def if_with_weights_inside():
    then = helper.make_graph([N("MatMul", ["x", "wt"], ["yt"], name="then_mm")], "then", [], [_vi("yt", ["N", D])],
                             [_w("wt", D, D)])
    other = helper.make_graph([N("Identity", ["x"], ["ye"], name="else_id")], "else", [], [_vi("ye", ["N", D])])
    return _model([N("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c"), name="const"),
                   N("If", ["cond"], ["y0"], then_branch=then, else_branch=other, name="branch"),
                   N("MatMul", ["y0", "w"], ["y"], name="after")],
                  [_vi("x", ["N", D])], [_vi("y", ["N", D])], [_w("w", D, D)])


def loop_with_weights_inside():
    body = helper.make_graph([N("Identity", ["cond_in"], ["cond_out"], name="keep"),
                              N("MatMul", ["h_in", "wl"], ["h_mm"], name="loop_mm"),
                              N("Tanh", ["h_mm"], ["h_out"], name="loop_tanh")], "body",
                             [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("h_in", ["N", D])],
                             [_vi("cond_out", [], TensorProto.BOOL), _vi("h_out", ["N", D])], [_w("wl", D, D)])
    return _model([N("Loop", ["trips", "cond", "x"], ["h"], body=body, name="loop"),
                   N("MatMul", ["h", "w"], ["y"], name="after")],
                  [_vi("x", ["N", D])], [_vi("y", ["N", D])],
                  [numpy_helper.from_array(np.array(2, np.int64), "trips"),
                   numpy_helper.from_array(np.array(True), "cond"), _w("w", D, D)])


def opset11():
    return _model([N("MatMul", ["x", "w0"], ["h"], name="mm0"), N("Relu", ["h"], ["r"], name="relu"),
                   N("MatMul", ["r", "w1"], ["y"], name="mm1")],
                  [_vi("x", ["N", D])], [_vi("y", ["N", D])], [_w("w0", D, D), _w("w1", D, D)], opset=11)


def opset21():
    m = opset11()
    m.opset_import[0].version = 21
    return m


ZOO = {f.__name__: f for f in (one_matmul, three_compute_nodes, lstm_then_gemm, attention_with_mask,
                               two_inputs_two_outputs, int64_tokens_with_embedding, if_with_weights_inside,
                               loop_with_weights_inside, opset11, opset21)}


def _feeds(model: onnx.ModelProto, n: int = 6):
    feeds = []
    for i in range(n):
        feed = {}
        for vi in model.graph.input:
            dims = [d.dim_value if d.dim_value else (4 if d.dim_param == "N" else 5 + i % 3)
                    for d in vi.type.tensor_type.shape.dim]
            if vi.type.tensor_type.elem_type == TensorProto.INT64:
                feed[vi.name] = R.integers(0, 100, dims).astype(np.int64)
            else:
                feed[vi.name] = R.standard_normal(dims).astype(np.float32)
        feeds.append(feed)
    return feeds


def _needs_float(path: str) -> float:
    """Infeasible (0.5) unless some weight stayed float: every starting point quantizes them all."""
    m = onnx.load(path)
    inits = {t.name for t in m.graph.initializer}
    quantized = {n[: -len("_quantized")] for n in inits if n.endswith("_quantized")}
    weights = {t.name for t in m.graph.initializer if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT}
    return 1.0 if weights - quantized or not quantized else 0.5


@pytest.mark.parametrize("shape", list(ZOO))
def test_every_graph_shape_returns_a_result(shape, tmp_path):
    model = ZOO[shape]()
    onnx.checker.check_model(model)
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "model.onnx"
    external = shape in ("three_compute_nodes", "two_inputs_two_outputs")  # and two with external data
    onnx.save(model, str(path), save_as_external_data=external, location="w.bin", size_threshold=0)
    space = {"knobs": {"mode": ["static", "dynamic"], "quantize_ops": ["all", "compute"],
                       "fallback_k": [0, 1, 2, 4, 8, 16, 32], "a16_k": [0, 1, 2, 4, 8],
                       "weight_granularity": ["per_tensor", "per_channel"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = optimize(str(path), _feeds(model), _needs_float, search_space=space, n_trials=8, allowed_accuracy_drop=0.01,
                     output_dir=tmp_path / "o", show_progress=False, measure_latency=False)
    assert r.model_path and r.trial_number >= 0
    failed = [(t.number, t.user_attrs.get("fail_reason")) for t in r.study.trials if t.state.name == "FAIL"]
    assert not [f for f in failed if "internal error" in (f[1] or "")], failed
    assert all(t.params.get("fallback_k", 0) in space["knobs"]["fallback_k"] for t in r.study.trials)
