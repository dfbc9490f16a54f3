"""Graph techniques on small real models: BatchNorm folding and cross-layer equalization (ORT sessions)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant.sensitivity import sqnr_db
from autoquant.techniques import equalize, fold_batchnorm

OUTLIER = 300.0


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _model(nodes, inits, x_shape, outputs=("y",), opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * len(x_shape)) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _assert_same_outputs(a, b, x):
    for ya, yb in zip(_run(a, x), _run(b, x)):
        np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5)


def _bn(rng, name, inp, out, c):
    inits = [
        _init(f"{name}.scale", rng.normal(1.0, 0.3, c)), _init(f"{name}.bias", rng.normal(0, 0.2, c)),
        _init(f"{name}.mean", rng.normal(0, 0.5, c)), _init(f"{name}.var", rng.uniform(0.3, 2.0, c)),
    ]
    node = helper.make_node("BatchNormalization", [inp, *(i.name for i in inits)], [out], name=name, epsilon=1e-3)
    return node, inits


# ---------------------------------------------------------------------------------------------- BN folding


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("depthwise", [False, True])
def test_fold_conv_bn_relu_conv_bn(conv_bias, depthwise):
    rng = np.random.default_rng(1)
    g2 = 8 if depthwise else 1
    inits = [_init("w1", rng.normal(0, 0.5, (8, 3, 3, 3))), _init("w2", rng.normal(0, 0.5, (8, 8 // g2, 3, 3)))]
    if conv_bias:
        inits += [_init("b1", rng.normal(0, 0.1, 8)), _init("b2", rng.normal(0, 0.1, 8))]
    bn1, p1 = _bn(rng, "bn1", "c1", "n1", 8)
    bn2, p2 = _bn(rng, "bn2", "c2", "y", 8)
    nodes = [
        helper.make_node("Conv", ["x", "w1"] + (["b1"] if conv_bias else []), ["c1"], name="conv1", pads=[1] * 4),
        bn1,
        helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"] + (["b2"] if conv_bias else []), ["c2"], name="conv2", pads=[1] * 4,
                         group=g2),
        bn2,
    ]
    model = _model(nodes, inits + p1 + p2, ["N", 3, 6, 6])
    original = model.SerializeToString()

    folded, names = fold_batchnorm(model)

    assert names == ["bn1", "bn2"]
    assert "BatchNormalization" not in _ops(folded)
    assert _ops(folded) == ["Conv", "Relu", "Conv"]
    assert [o.name for o in folded.graph.output] == ["y"] and folded.graph.node[-1].output[0] == "y"
    assert all(len(n.input) == 3 for n in folded.graph.node if n.op_type == "Conv")
    assert not any(t.name.startswith(("bn1.", "bn2.")) for t in folded.graph.initializer)  # unused params removed
    onnx.checker.check_model(folded, full_check=True)
    assert model.SerializeToString() == original  # input untouched
    _assert_same_outputs(model, folded, rng.normal(size=(4, 3, 6, 6)).astype(np.float32))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["none", "vector", "row"])
def test_fold_gemm_bn(trans_b, bias):
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.4, (8, 16) if trans_b else (16, 8))
    inits = [_init("w", w)]
    inputs = ["x", "w"]
    if bias != "none":
        inits.append(_init("c", rng.normal(0, 0.2, 8 if bias == "vector" else (1, 8))))
        inputs.append("c")
    bn, params = _bn(rng, "bn", "h", "y", 8)
    gemm = helper.make_node("Gemm", inputs, ["h"], name="fc", transB=trans_b, alpha=0.7, beta=0.5)
    model = _model([gemm, bn], inits + params, ["N", 16])

    folded, names = fold_batchnorm(model)

    assert names == ["bn"] and _ops(folded) == ["Gemm"]
    onnx.checker.check_model(folded, full_check=True)
    _assert_same_outputs(model, folded, rng.normal(size=(5, 16)).astype(np.float32))


def test_bn_not_folded_when_producer_output_is_shared_or_a_graph_output():
    rng = np.random.default_rng(3)
    bn, params = _bn(rng, "bn", "c", "y", 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn,
             helper.make_node("Relu", ["c"], ["z"], name="relu")]
    model = _model(nodes, [_init("w", rng.normal(size=(4, 2, 1, 1)))] + params, ["N", 2, 3, 3], ("y", "z"))
    folded, names = fold_batchnorm(model)
    assert names == [] and _ops(folded) == ["Conv", "BatchNormalization", "Relu"]
    assert folded.SerializeToString() == model.SerializeToString()

    model = _model(nodes[:2], [_init("w", rng.normal(size=(4, 2, 1, 1)))] + params, ["N", 2, 3, 3], ("y", "c"))
    assert fold_batchnorm(model)[1] == []


def test_bn_fold_copies_a_shared_weight_and_skips_non_initializer_weights():
    rng = np.random.default_rng(4)
    bn_a, pa = _bn(rng, "bn_a", "ca", "ya", 4)
    bn_b, pb = _bn(rng, "bn_b", "cb", "yb", 4)
    bn_c, pc = _bn(rng, "bn_c", "cc", "yc", 4)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["ca"], name="conv_a"), bn_a,
        helper.make_node("Conv", ["x", "w"], ["cb"], name="conv_b"), bn_b,
        helper.make_node("Identity", ["w"], ["w_dyn"], name="ident"),
        helper.make_node("Conv", ["x", "w_dyn"], ["cc"], name="conv_c"), bn_c,
    ]
    model = _model(nodes, [_init("w", rng.normal(size=(4, 2, 1, 1)))] + pa + pb + pc, ["N", 2, 3, 3],
                   ("ya", "yb", "yc"))
    folded, names = fold_batchnorm(model)
    assert names == ["bn_a", "bn_b"]
    assert _ops(folded).count("BatchNormalization") == 1
    onnx.checker.check_model(folded, full_check=True)
    _assert_same_outputs(model, folded, rng.normal(size=(2, 2, 3, 3)).astype(np.float32))


# ---------------------------------------------------------------------------------------------- CLE


def _ranges(w, axis):
    """max |w| over every axis but ``axis``."""
    a = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0)
    return a.reshape(a.shape[0], -1).max(axis=1)


def _balanced(r1, r2):
    return np.allclose(r1 / r1.max(), r2 / r2.max(), rtol=1e-6, atol=0)


def _act(op, inp, out, c):
    """(nodes, inits) of the activation ``op``."""
    if op == "PRelu":
        slope = _init("slope", np.linspace(0.05, 0.5, c).reshape(c, 1, 1))
        return [helper.make_node("PRelu", [inp, "slope"], [out], name="act")], [slope]
    attrs = {"alpha": 0.1} if op == "LeakyRelu" else {}
    return [helper.make_node(op, [inp], [out], name="act", **attrs)], []


def _conv_act_conv(op, seed=5, outlier=OUTLIER):
    """Conv(3->8) -> op -> Conv(8->6); output channel 0 of conv1 x outlier, its input channel in conv2 / outlier."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, 0.5, (8, 3, 3, 3)), rng.normal(0, 0.1, 8)
    w2, b2 = rng.normal(0, 0.3, (6, 8, 3, 3)), rng.normal(0, 0.1, 6)
    w1[0] *= outlier
    b1[0] *= outlier
    w2[:, 0] /= outlier
    act_nodes, act_inits = _act(op, "c1", "a1", 8) if op else ([], [])  # None: Conv -> Conv directly
    mid = "a1" if op else "c1"
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4), *act_nodes,
             helper.make_node("Conv", [mid, "w2", "b2"], ["y"], name="conv2", pads=[1] * 4)]
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2), *act_inits]
    return _model(nodes, inits, ["N", 3, 6, 6])


@pytest.mark.parametrize("op", ["Relu", "LeakyRelu", "PRelu", None])
def test_cle_conv_act_conv(op):
    model = _conv_act_conv(op)
    before = _weights(model)
    assert not _balanced(_ranges(before["w1"], 0), _ranges(before["w2"], 1))

    eq, pairs = equalize(model)

    assert pairs == [("conv1", "conv2")]
    w = _weights(eq)
    assert _balanced(_ranges(w["w1"], 0), _ranges(w["w2"], 1))
    assert w["w1"].dtype == np.float32
    onnx.checker.check_model(eq, full_check=True)
    assert _weights(model)["w1"].tobytes() == before["w1"].tobytes()  # input untouched
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32)
    _assert_same_outputs(model, eq, x)


def test_cle_conv_depthwise_conv_chain():
    rng = np.random.default_rng(6)
    w1, b1 = rng.normal(0, 0.5, (8, 3, 3, 3)), rng.normal(0, 0.1, 8)
    wd, bd = rng.normal(0, 0.5, (8, 1, 3, 3)), rng.normal(0, 0.1, 8)
    w3, b3 = rng.normal(0, 0.3, (4, 8, 1, 1)), rng.normal(0, 0.1, 4)
    w1[0] *= OUTLIER
    b1[0] *= OUTLIER
    wd[0] /= OUTLIER
    wd[3] *= 40.0  # and a depthwise outlier compensated in conv3
    bd[3] *= 40.0
    w3[:, 3] /= 40.0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], name="dw", pads=[1] * 4, group=8),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    inits = [_init(n, a) for n, a in [("w1", w1), ("b1", b1), ("wd", wd), ("bd", bd), ("w3", w3), ("b3", b3)]]
    model = _model(nodes, inits, ["N", 3, 6, 6])
    before = _weights(model)
    assert not _balanced(_ranges(before["w1"], 0), _ranges(before["wd"], 0))
    assert not _balanced(_ranges(before["wd"], 0), _ranges(before["w3"], 1))

    eq, pairs = equalize(model)

    assert pairs == [("conv1", "dw"), ("dw", "conv3")]
    w = _weights(eq)
    assert _balanced(_ranges(w["w1"], 0), _ranges(w["wd"], 0))  # depthwise: input channel i = output channel i
    assert _balanced(_ranges(w["wd"], 0), _ranges(w["w3"], 1))
    onnx.checker.check_model(eq, full_check=True)
    _assert_same_outputs(model, eq, rng.normal(size=(4, 3, 6, 6)).astype(np.float32))


@pytest.mark.parametrize("kind", ["Gemm", "MatMul"])
def test_cle_fully_connected(kind):
    rng = np.random.default_rng(7)
    w1, b1 = rng.normal(0, 0.4, (12, 16)), rng.normal(0, 0.1, 12)  # (out, in)
    w2, b2 = rng.normal(0, 0.4, (5, 12)), rng.normal(0, 0.1, 5)
    w1[2] *= OUTLIER
    b1[2] *= OUTLIER
    w2[:, 2] /= OUTLIER
    if kind == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
        inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)]
        axes = (0, 1)
    else:  # MatMul weights are (in, out); the first carries its bias in an Add
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="fc1"),
                 helper.make_node("Add", ["m", "b1"], ["h"], name="add1"),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
        inits = [_init("w1", w1.T), _init("b1", b1), _init("w2", w2.T)]
        axes = (1, 0)
    model = _model(nodes, inits, ["N", 16])
    before = _weights(model)
    assert not _balanced(_ranges(before["w1"], axes[0]), _ranges(before["w2"], axes[1]))

    eq, pairs = equalize(model)

    assert pairs == [("fc1", "fc2")]
    w = _weights(eq)
    assert _balanced(_ranges(w["w1"], axes[0]), _ranges(w["w2"], axes[1]))
    onnx.checker.check_model(eq, full_check=True)
    _assert_same_outputs(model, eq, rng.normal(size=(6, 16)).astype(np.float32))


def test_cle_skips_non_homogeneous_and_shared_intermediates():
    for op in ("Sigmoid", "Tanh"):
        model = _conv_act_conv(op)
        eq, pairs = equalize(model)
        assert pairs == []
        assert eq.SerializeToString() == model.SerializeToString()

    model = _conv_act_conv("PRelu")  # a negative slope: not accepted
    slope = next(t for t in model.graph.initializer if t.name == "slope")
    arr = numpy_helper.to_array(slope).copy()
    arr[1] = -0.2
    slope.CopyFrom(_init("slope", arr))
    assert equalize(model)[1] == []

    model = _conv_act_conv("Relu")  # the activation also feeds a graph output
    model.graph.output.append(helper.make_tensor_value_info("a1", TensorProto.FLOAT, [None] * 4))
    assert equalize(model)[1] == []


# ------------------------------------------------------------------------------ CLE vs per-tensor int8 weights


def _quantize_weights_per_tensor(model, names):
    """Weights replaced by their symmetric per-tensor int8 fake-quantized values (scale = max|W| / 127)."""
    q = onnx.ModelProto()
    q.CopyFrom(model)
    for t in q.graph.initializer:
        if t.name in names:
            w = numpy_helper.to_array(t).astype(np.float64)
            scale = np.abs(w).max() / 127.0
            t.CopyFrom(_init(t.name, np.clip(np.round(w / scale), -127, 127) * scale))
    return q


def test_cle_improves_per_tensor_int8_weight_sqnr():
    model = _conv_act_conv("Relu", seed=8)
    x = np.random.default_rng(9).normal(size=(8, 3, 6, 6)).astype(np.float32)
    reference = _run(model, x)

    eq, pairs = equalize(model)
    assert pairs == [("conv1", "conv2")]
    naive = sqnr_db(reference, _run(_quantize_weights_per_tensor(model, {"w1", "w2"}), x))
    equalized = sqnr_db(reference, _run(_quantize_weights_per_tensor(eq, {"w1", "w2"}), x))

    assert equalized > naive + 10.0, (naive, equalized)
