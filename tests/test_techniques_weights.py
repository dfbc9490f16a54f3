"""AdaRound and empirical bias correction on small real QDQ models (ONNX Runtime, no mocks)."""

import importlib
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant.build import build_qdq_model
from autoquant.sensitivity import run_outputs, sqnr_db
from autoquant.techniques import adaround, apply_adaround, collect_layer_inputs, correct_biases, layer_matrix
from autoquant.techniques.bias_correction import channel_means, tensor_values

from _util import init_array

LAYERS = ("conv1", "dw", "fc", "mm")
adaround_mod = importlib.import_module("autoquant.techniques.adaround")  # the package's `adaround` is the function


def _float_model() -> onnx.ModelProto:
    """Conv 3x3 pad 1 -> Relu -> depthwise 3x3 stride 2 -> Relu -> MaxPool -> Flatten -> Gemm(transB) -> Relu -> MatMul."""
    r = np.random.default_rng(0)
    inits = {
        "c1.w": r.normal(0, 0.3, (16, 3, 3, 3)), "c1.b": r.normal(0, 0.1, 16),
        "dw.w": r.normal(0, 0.3, (16, 1, 3, 3)), "dw.b": r.normal(0, 0.1, 16),
        "fc.w": r.normal(0, 0.15, (32, 64)), "fc.b": r.normal(0, 0.1, 32),
        "mm.w": r.normal(0, 0.2, (32, 10)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "dw.w", "dw.b"], ["d1"], name="dw", pads=[1, 1, 1, 1], strides=[2, 2], group=16),
        helper.make_node("Relu", ["d1"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], name="fc", transB=1),
        helper.make_node("Relu", ["g"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "mm.w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(seed: int, n: int, batch: int) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.normal(0.3, 1.0, (batch, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("techniques")
    model = _float_model()
    path = folder / "float.onnx"
    onnx.save(model, str(path))
    calib, held = _feeds(1, 8, 32), _feeds(2, 4, 32)
    names = ["x"] + [o for n in model.graph.node for o in n.output]
    values = tensor_values(model, names, calib)
    ranges = {n: (float(min(v.min() for v in values[n])), float(max(v.max() for v in values[n]))) for n in names}
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    built: dict[tuple, onnx.ModelProto] = {}

    def qdq(bits: int, granularity: str) -> onnx.ModelProto:
        key = (bits, granularity)
        if key not in built:
            config = {"calibration": "minmax", "percentile": None, "weight_granularity": granularity,
                      "weight_symmetric": True, "activation_symmetric": False, "weight_bits": bits,
                      "activation_bits": 8, "weight_rounding": "nearest_even", "fallback_k": 0}
            out = folder / f"q{bits}{granularity}.onnx"
            build_qdq_model(path, ranges, config, out)
            built[key] = onnx.load(str(out))
        copy = onnx.ModelProto()
        copy.CopyFrom(built[key])
        return copy

    return {"model": model, "calib": calib, "held": held, "floats": floats, "qdq": qdq,
            "inputs": collect_layer_inputs(model, calib)}


# --- (a) layers as matrix products ---------------------------------------------------------------

def _single(op: str, w: np.ndarray, x_shape: tuple, **attrs) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], name="n", **attrs)], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op, w_shape, x_shape, attrs", [
    ("Conv", (8, 3, 3, 3), (2, 3, 7, 6), {"pads": [1, 1, 1, 1]}),
    ("Conv", (8, 1, 3, 3), (2, 8, 7, 6), {"pads": [1, 1, 1, 1], "group": 8, "strides": [2, 2]}),
    ("Conv", (6, 2, 3, 2), (2, 4, 9, 8), {"pads": [0, 2, 1, 0], "group": 2, "strides": [2, 1], "dilations": [2, 3]}),
    ("Conv", (4, 3, 3, 3), (1, 3, 7, 8), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("Conv", (5, 3, 3), (2, 3, 11), {"pads": [1, 2], "strides": [2]}),
    ("Gemm", (5, 7), (4, 7), {"transB": 1}),
    ("Gemm", (7, 5), (7, 4), {"transA": 1, "alpha": 0.5}),
    ("MatMul", (7, 5), (2, 3, 7), {}),
])
def test_layer_matrix_equals_onnxruntime(op, w_shape, x_shape, attrs):
    r = np.random.default_rng(3)
    w = r.normal(size=w_shape).astype(np.float32)
    x = r.normal(size=x_shape).astype(np.float32)
    (expected,) = _session(_single(op, w, x_shape, **attrs)).run(None, {"x": x})
    form = layer_matrix(op, attrs, w, x)
    got = form.to_output(np.matmul(form.x, form.w.transpose(0, 2, 1)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(form.fold(form.unfold(w)), w)


def test_layer_matrix_of_model_layers_equals_onnxruntime(task):
    model, floats = task["model"], task["floats"]
    outs = tensor_values(model, [n.output[0] for n in model.graph.node], task["calib"][:2])
    for node in model.graph.node:
        if node.name not in LAYERS:
            continue
        form = layer_matrix(node.op_type, _attrs(node), floats[node.input[1]], np.concatenate(tensor_values(
            model, [node.input[0]], task["calib"][:2])[node.input[0]]))
        y = form.to_output(np.matmul(form.x, form.w.transpose(0, 2, 1)))
        if len(node.input) > 2:
            b = floats[node.input[2]]
            y = y + (b.reshape(1, -1, 1, 1) if node.op_type == "Conv" else b)
        np.testing.assert_allclose(y, np.concatenate(outs[node.output[0]]), atol=1e-5, rtol=1e-5)


# --- (b) AdaRound ---------------------------------------------------------------------------------

def _layer_mse(node, w, x, q, scale, zp, axis, max_rows=2048, seed=0) -> float:
    """Output MSE of integer weights ``q`` on the rows AdaRound samples, computed independently."""
    shape = [1] * w.ndim
    if np.size(scale) > 1:
        shape[axis] = np.size(scale)
    wq = (q.astype(np.float64) - np.reshape(zp, shape)) * np.reshape(scale, shape)
    form = layer_matrix(node.op_type, _attrs(node), w, x, max_rows, seed)
    d = form.unfold(wq) - form.w.astype(np.float64)
    return float(np.mean(np.matmul(form.x.astype(np.float64), d.transpose(0, 2, 1)) ** 2))


def _grids(model: onnx.ModelProto):
    """node -> (weight name, scale, zero point, axis, qmin, qmax) of each quantized layer weight."""
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.name in LAYERS:
            d = dq[node.input[1]]
            bits = 4 if inits[d.input[0]].data_type == TensorProto.INT4 else 8
            out[node.name] = (d.input[0], init_array(model, d.input[1]), init_array(model, d.input[2]).astype(np.int32),
                              _attrs(d).get("axis", 1), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return out


@pytest.mark.parametrize("bits, granularity", [(8, "per_tensor"), (4, "per_tensor"), (4, "per_channel")])
def test_adaround_never_worse_than_nearest_and_in_range(task, bits, granularity):
    q = task["qdq"](bits, granularity)
    grids = _grids(q)
    report = apply_adaround(q, task["floats"], task["inputs"], iters=200)
    assert set(report) == set(LAYERS)
    nodes = {n.name: n for n in task["model"].graph.node}
    for name, (qname, scale, zp, axis, qmin, qmax) in grids.items():
        node, w, x = nodes[name], task["floats"][nodes[name].input[1]], task["inputs"][name]
        ints = init_array(q, qname).astype(np.int32)
        assert ints.min() >= qmin and ints.max() <= qmax
        shape = [1] * w.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        nearest = np.clip(np.round(w / scale.reshape(shape)) + zp.reshape(shape), qmin, qmax)
        loss_near = _layer_mse(node, w, x, nearest, scale, zp, axis)
        loss_ada = _layer_mse(node, w, x, ints, scale, zp, axis)
        assert loss_ada <= loss_near * (1 + 1e-9), name
        assert report[name]["loss_nearest"] == pytest.approx(loss_near, rel=1e-6)
        if report[name]["used"] == "nearest":
            np.testing.assert_array_equal(ints, nearest)
        else:
            assert report[name]["loss_adaround"] < report[name]["loss_nearest"]
    _session(q)  # still loads


def _random_conv_case():
    r = np.random.default_rng(7)
    w = r.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    x = np.maximum(r.normal(0.2, 1.0, (6, 8, 10, 10)), 0).astype(np.float32)
    scale = (np.abs(w).max(axis=(1, 2, 3)) / 7).astype(np.float32)
    return w, x, scale, np.zeros(16, np.int32)


def test_adaround_strictly_better_on_w4_per_channel_and_deterministic():
    w, x, scale, zp = _random_conv_case()
    attrs = {"pads": [1, 1, 1, 1]}
    q1, info = adaround(w, x, scale, zp, 0, -8, 7, "Conv", attrs, max_rows=256)
    q2, _ = adaround(w, x, scale, zp, 0, -8, 7, "Conv", attrs, max_rows=256)
    assert info["used"] == "adaround" and info["loss_adaround"] < 0.9 * info["loss_nearest"], info
    assert q1.dtype == np.int32 and q1.shape == w.shape and q1.min() >= -8 and q1.max() <= 7
    np.testing.assert_array_equal(q1, q2)
    # the reconstruction term is normalised, so the activation scale does not change the rounding
    q3, _ = adaround(w, x * 1000.0, scale, zp, 0, -8, 7, "Conv", attrs, max_rows=256)
    assert np.mean(q3 != q1) < 0.01


def test_adaround_falls_back_to_nearest_when_it_cannot_win():
    r = np.random.default_rng(8)
    scale = np.float32(0.05)
    w = (r.integers(-7, 8, size=(6, 10)) * scale).astype(np.float32)  # on the grid: nearest is exact
    q, info = adaround(w, r.normal(size=(40, 10)).astype(np.float32), scale, np.int32(0), None, -8, 7,
                       "Gemm", {"transB": 1}, iters=50)
    assert info["used"] == "nearest" and info["loss_nearest"] == 0.0
    np.testing.assert_array_equal(q, np.round(w / scale))


def test_adaround_improves_w4_model_sqnr_and_keeps_int4(task):
    nearest = task["qdq"](4, "per_channel")
    ada = task["qdq"](4, "per_channel")
    report = apply_adaround(ada, task["floats"], task["inputs"])
    assert all(info["used"] == "adaround" for info in report.values()), report
    types = {t.name: t.data_type for t in ada.graph.initializer}
    assert all(types[f"{w}_quantized"] == TensorProto.INT4 for w in ("c1.w", "dw.w", "fc.w", "mm.w"))
    reference = run_outputs(_session(task["model"]), task["held"])
    sqnr_near = sqnr_db(reference, run_outputs(_session(nearest), task["held"]))
    sqnr_ada = sqnr_db(reference, run_outputs(_session(ada), task["held"]))
    assert sqnr_ada >= sqnr_near, (sqnr_ada, sqnr_near)


def test_adaround_cache_skips_optimization(task, monkeypatch):
    calls = []
    real = adaround_mod.adaround

    def counting(*args, **kw):
        calls.append(args[7])
        return real(*args, **kw)

    monkeypatch.setattr(adaround_mod, "adaround", counting)
    cache: dict = {}
    first, second = task["qdq"](4, "per_tensor"), task["qdq"](4, "per_tensor")
    r1 = apply_adaround(first, task["floats"], task["inputs"], cache=cache, iters=100)
    assert len(calls) == len(LAYERS) and len(cache) == len(LAYERS)
    r2 = apply_adaround(second, task["floats"], task["inputs"], cache=cache, iters=100)
    assert len(calls) == len(LAYERS)  # nothing optimized again
    assert all(info["cached"] for info in r2.values()) and not any(info["cached"] for info in r1.values())
    for t1, t2 in zip(first.graph.initializer, second.graph.initializer):
        assert t1 == t2
    buf = io.BytesIO()  # the cache survives an np.savez / np.load round trip (how a caller persists it)
    np.savez(buf, **cache)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        reloaded = {k: z[k] for k in z.files}
    third = task["qdq"](4, "per_tensor")
    apply_adaround(third, task["floats"], task["inputs"], cache=reloaded, iters=100)
    assert len(calls) == len(LAYERS)
    assert list(third.graph.initializer) == list(first.graph.initializer)
    apply_adaround(task["qdq"](4, "per_tensor"), task["floats"], task["inputs"], cache=cache, iters=101)
    assert len(calls) == 2 * len(LAYERS)  # other settings are other keys


# --- (c) bias correction --------------------------------------------------------------------------

def _mean_gaps(float_model, qdq, samples) -> dict[str, np.ndarray]:
    fnodes = {n.name: n for n in float_model.graph.node}
    qnodes = {n.name: n for n in qdq.graph.node}
    gaps = {}
    for name in ("conv1", "dw", "fc"):
        f = fnodes[name].output[0]
        q = qnodes[name].output[0]
        mf = channel_means(tensor_values(float_model, [f], samples)[f], fnodes[name].op_type)
        mq = channel_means(tensor_values(qdq, [q], samples)[q], fnodes[name].op_type)
        gaps[name] = np.abs(mf - mq)
    return gaps


def test_bias_correction_reduces_mean_shift_w4_per_tensor(task):
    model, calib = task["model"], task["calib"]
    q = task["qdq"](4, "per_tensor")
    before = _mean_gaps(model, q, calib)
    old_bias = {n: init_array(q, f"{n}.b_quantized").astype(np.int64) for n in ("c1", "dw", "fc")}
    shifts = correct_biases(model, q, calib)
    assert set(shifts) == {"conv1", "dw", "fc"}  # MatMul has no bias input
    after = _mean_gaps(model, q, calib)
    for name, prefix in (("conv1", "c1"), ("dw", "dw"), ("fc", "fc")):
        bias_scale = init_array(q, f"{prefix}.b_quantized_scale").astype(np.float64)
        # sequential: each layer is left within half a bias step of the float mean, upstream corrections included
        assert np.all(after[name] <= bias_scale / 2 * (1 + 1e-3) + 1e-6), name
        assert np.all(after[name] <= np.maximum(before[name], bias_scale / 2 * (1 + 1e-3) + 1e-6)), name
        assert after[name].sum() < before[name].sum(), name
        steps = init_array(q, f"{prefix}.b_quantized").astype(np.int64) - old_bias[prefix]
        np.testing.assert_allclose(shifts[name], steps * bias_scale, rtol=1e-6)
    assert before["fc"].mean() > 10 * after["fc"].mean()  # W4 per-tensor: a visible shift, removed
    outs = run_outputs(_session(q), task["held"])
    assert all(np.isfinite(o).all() for o in outs)


def test_bias_correction_float_bias(task):
    model, calib = task["model"], task["calib"]
    q = task["qdq"](4, "per_tensor")
    fc = next(n for n in q.graph.node if n.name == "fc")
    dq = next(n for n in q.graph.node if n.output[0] == fc.input[2])
    bias = (init_array(q, dq.input[0]) * init_array(q, dq.input[1])).astype(np.float32)
    q.graph.initializer.append(numpy_helper.from_array(bias, "fc_float_bias"))
    fc.input[2] = "fc_float_bias"
    before = _mean_gaps(model, q, calib)["fc"]
    shifts = correct_biases(model, q, calib)
    after = _mean_gaps(model, q, calib)["fc"]
    np.testing.assert_allclose(init_array(q, "fc_float_bias"), bias + shifts["fc"], rtol=1e-6, atol=1e-7)
    assert np.all(after < 1e-5) and before.max() > 1e-3


def test_bias_correction_waves_follow_dependencies(tmp_path, monkeypatch):
    """Parallel branches are corrected on one measurement; the layer after them is re-measured."""
    r = np.random.default_rng(4)
    inits = [numpy_helper.from_array(r.normal(0, 0.3, shape).astype(np.float32), name) for name, shape in (
        ("a.w", (8, 3, 3, 3)), ("a.b", (8,)), ("b.w", (8, 3, 1, 1)), ("b.b", (8,)), ("c.w", (4, 8, 3, 3)), ("c.b", (4,)))]
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["ya"], name="A", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "b.w", "b.b"], ["yb"], name="B"),
        helper.make_node("Add", ["ya", "yb"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "c.w", "c.b"], ["y"], name="C"),
    ]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "f.onnx"))
    calib = _feeds(5, 4, 8)
    names = ["x", "ya", "yb", "s", "y"]
    values = tensor_values(model, names, calib)
    ranges = {n: (float(min(v.min() for v in values[n])), float(max(v.max() for v in values[n]))) for n in names}
    config = {"calibration": "minmax", "percentile": None, "weight_granularity": "per_tensor", "weight_symmetric": True,
              "activation_symmetric": False, "weight_bits": 4, "activation_bits": 8, "weight_rounding": "nearest_even",
              "fallback_k": 0}
    build_qdq_model(tmp_path / "f.onnx", ranges, config, tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    module = importlib.import_module("autoquant.techniques.bias_correction")
    passes = []
    real = module.tensor_values

    def counting(m, tensors, samples):
        passes.append(sorted(tensors))
        return real(m, tensors, samples)

    monkeypatch.setattr(module, "tensor_values", counting)
    shifts = correct_biases(model, q, calib)
    assert set(shifts) == {"A", "B", "C"}
    # one float pass, one QDQ pass correcting A and B together, one QDQ pass re-measuring C alone
    assert [len(p) for p in passes] == [3, 3, 1]
    for name, out in (("A", "ya"), ("B", "yb"), ("C", "y")):
        mf = channel_means(real(model, [out], calib)[out], "Conv")
        qout = next(n for n in q.graph.node if n.name == name).output[0]
        mq = channel_means(real(q, [qout], calib)[qout], "Conv")
        bias_scale = init_array(q, f"{name.lower()}.b_quantized_scale").astype(np.float64)
        assert np.all(np.abs(mf - mq) <= bias_scale / 2 * (1 + 1e-3) + 1e-6), name


def test_adaround_stops_between_layers_and_keeps_the_done_ones(task):
    """A search timeout interrupts AdaRound between layers; the layers done stay in the cache."""
    asked = []

    def stop_after_one() -> bool:
        asked.append(1)
        return len(asked) > 1

    cache: dict = {}
    with pytest.raises(adaround_mod.Interrupted, match="1 layers done"):
        apply_adaround(task["qdq"](4, "per_tensor"), task["floats"], task["inputs"], cache=cache, iters=100,
                       should_stop=stop_after_one)
    assert len(cache) == 1
    # with every layer cached nothing asks to stop: a finished model is not thrown away
    apply_adaround(task["qdq"](4, "per_tensor"), task["floats"], task["inputs"], cache=cache, iters=100)
    report = apply_adaround(task["qdq"](4, "per_tensor"), task["floats"], task["inputs"], cache=cache, iters=100,
                            should_stop=lambda: True)
    assert len(report) == len(LAYERS) and all(info["cached"] for info in report.values())
