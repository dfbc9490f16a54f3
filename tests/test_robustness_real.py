"""Robustness on what real exports contain: masking sentinels, calibration feeds of varying shapes,
old opsets with weights in Constant nodes, and no lock files left behind.

Every case runs real ONNX models (built with onnx.helper), real onnxruntime sessions and real optimize() calls.
"""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import optimize
from autoquant.data import CalibrationSource
from autoquant.errors import CalibrationDataError
from autoquant.model import float_activation_tensors, load_model, prepare_model
from autoquant.stats import collect_statistics

FMIN = float(np.finfo(np.float32).min)


def _run(model, feed: dict) -> np.ndarray:
    path = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _mse_eval(reference: onnx.ModelProto, feeds: list[dict]):
    """eval_callback: mean squared error of a model's output against ``reference`` on ``feeds``."""
    refs = [_run(reference, f) for f in feeds]

    def evaluate(path: str) -> float:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return float(np.mean([np.mean((sess.run(None, f)[0] - r) ** 2) for f, r in zip(feeds, refs)]))

    return evaluate


# ------------------------------------------------------------------------------------------- masking sentinels
def masked_attention_model(seq: int = 6, dim: int = 16) -> onnx.ModelProto:
    """x [1, T, D] -> scores = MatMul(x, Wq) + mask (finfo.min on the last two key positions) -> Softmax
    -> MatMul(Wo): the pattern an eagerly exported HF attention layer leaves in the graph."""
    rng = np.random.default_rng(0)
    mask = np.zeros((1, seq, seq), np.float32)
    mask[..., -2:] = FMIN
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (dim, seq)).astype(np.float32), "wq"),
             numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(rng.normal(0, 0.3, (seq, dim)).astype(np.float32), "wo")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["scores"], name="q"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "wo"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(shape, n: int = 8, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def test_statistics_leave_masking_sentinels_out_of_ranges(tmp_path):
    model = masked_attention_model()
    prepared = prepare_model(load_model(model), tmp_path / "p.onnx")
    proto = prepared.load()
    feeds = _feeds((1, 6, 16))
    stats, _ = collect_statistics(proto, float_activation_tensors(proto),
                                  CalibrationSource(feeds, prepared.input_specs), prepared.sha256)
    assert stats.masked_tensors == {"masked"}
    scores = np.concatenate([_run(_scores_model(model), f) for f in feeds])  # unmasked scores
    st = stats.tensors["masked"]
    assert (st.min, st.max) == pytest.approx((scores[..., :-2].min(), scores[..., :-2].max()))
    for st in stats.tensors.values():
        assert all(np.isfinite(v) and abs(v) < 1e3 for v in (st.min, st.max, st.ema_min, st.ema_max, st.half_range))
        assert st.hist.sum() > 0
    # the cache round trip keeps the record
    stats.save(tmp_path / "s.npz")
    assert type(stats).load(tmp_path / "s.npz").masked_tensors == {"masked"}


def _scores_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the pre-mask scores as its output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    return m


def test_statistics_failure_names_the_tensor(tmp_path):
    """A failure while summarising a tensor is a CalibrationDataError that names it (here: a string tensor
    slipped into the tensor list, which no float statistic can summarise)."""
    model = masked_attention_model()
    label = helper.make_tensor("label_value", TensorProto.STRING, [1], [b"cat"])
    model.graph.node.append(helper.make_node("Constant", [], ["label"], name="label", value=label))
    with pytest.raises(CalibrationDataError, match="'label'"):
        collect_statistics(model, ["y", "label"], _feeds((1, 6, 16), n=2), "sha")


def test_optimize_on_a_model_with_masking_sentinels(tmp_path):
    model = masked_attention_model()
    feeds = _feeds((1, 6, 16))
    r = optimize(model, feeds, _mse_eval(model, feeds), allowed_accuracy_drop=1.0, higher_is_better=False,
                 search_space={"knobs": {"calibration": ["minmax", "percentile"], "fallback_k": 0}}, n_trials=2,
                 output_dir=tmp_path / "out", show_progress=False, measure_latency=False)
    assert r.feasible
    out = _run(r.model_path, feeds[0])
    assert np.isfinite(out).all()
    # the nodes around the mask stay float (quantizing them would clip the mask), and say why
    assert {n for n, why in r.preparation["float_nodes"].items() if "masking" in why} == {"add_mask", "softmax"}
    delivered = onnx.load(r.model_path)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "masked" for n in delivered.graph.node)
    assert next(n for n in delivered.graph.node if n.name == "softmax").input[0] == "masked"
    assert any(n.op_type == "DequantizeLinear" for n in delivered.graph.node)  # the MatMuls are quantized


# ------------------------------------------------------------------------------ feeds of different shapes
def _dynamic_conv_model() -> onnx.ModelProto:
    """x [1, 3, 8, W] -> Conv 3x3 pad 1 (+bias) -> Relu -> Conv 3x3 stride 2 (+bias): an OCR-style text-line net."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in
             (("c1.w", (8, 3, 3, 3)), ("c1.b", (8,)), ("c2.w", (4, 8, 3, 3)), ("c2.b", (4,)))]
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2])]
    graph = helper.make_graph(nodes, "lines", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _dynamic_matmul_model() -> onnx.ModelProto:
    """x [1, T, 16] -> MatMul -> Add -> Relu -> MatMul: a token-wise MLP over sequences of any length."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in
             (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _varying_feeds(make_shape, sizes, seed: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0.2, 1.0, make_shape(s)).astype(np.float32)} for s in sizes]


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)))


@pytest.mark.parametrize("make_model, make_shape, sizes, n_biased", [
    (_dynamic_conv_model, lambda w: (1, 3, 8, w), (8, 13, 16, 10, 21), 2),
    (_dynamic_matmul_model, lambda t: (1, t, 16), (3, 7, 5, 12, 4), 0),
], ids=["conv-widths", "matmul-lengths"])
def test_adaround_and_bias_correction_on_feeds_of_different_shapes(tmp_path, base_config, make_model, make_shape,
                                                                   sizes, n_biased):
    from autoquant.build import RangeCache, build_qdq_model
    from autoquant.refine import Refiner
    from autoquant.techniques import collect_layer_inputs, correct_biases

    model = make_model()
    feeds = _varying_feeds(make_shape, sizes)
    prepared = prepare_model(load_model(model), tmp_path / "p.onnx")
    proto = prepared.load()
    stats, _ = collect_statistics(proto, float_activation_tensors(proto),
                                  CalibrationSource(feeds, prepared.input_specs), prepared.sha256)
    config = dict(base_config, weight_rounding="adaround", bias_correction=True)
    refiner = Refiner(prepared.path, stats.samples, tmp_path)
    info = build_qdq_model(prepared.path, RangeCache(stats).ranges(config), config, tmp_path / "q.onnx",
                           refine=lambda m: refiner.apply(m, config))
    assert info.refinements["adaround_layers"] == 2
    assert info.refinements["bias_corrected_layers"] == n_biased
    for feed in _varying_feeds(make_shape, (11, 6), seed=9):
        assert _sqnr_db(_run(model, feed), _run(str(info.path), feed)) > 25

    # the public helpers take such feeds too: one row block per feed, and the correction shifts biases
    inputs = collect_layer_inputs(proto, feeds)
    assert set(inputs) == {n.name for n in proto.graph.node if n.op_type in ("Conv", "MatMul")}
    qdq = onnx.load(str(info.path))
    assert len(correct_biases(proto, qdq, feeds)) == n_biased


def test_optimize_with_adaround_on_feeds_of_different_widths(tmp_path):
    model = _dynamic_conv_model()
    feeds = _varying_feeds(lambda w: (1, 3, 8, w), (8, 13, 16, 10))
    r = optimize(model, feeds, _mse_eval(model, feeds), allowed_accuracy_drop=1.0, higher_is_better=False,
                 search_space={"knobs": {"weight_rounding": "adaround", "bias_correction": True, "fallback_k": 0}},
                 n_trials=2, output_dir=tmp_path / "out", show_progress=False, measure_latency=False)
    assert r.config["weight_rounding"] == "adaround" and r.config["bias_correction"]
    assert [t.state.name for t in r.study.trials] == ["COMPLETE"] * 2
    details = r.study.trials[r.trial_number].user_attrs["details"]
    assert details["adaround_layers"] == 2 and details["bias_corrected_layers"] == 2


def _attention_model(dim: int = 16) -> onnx.ModelProto:
    """x [1, T, D] -> q = x Wq; scores = q x^T [1, T, T]; softmax; (probs x) Wo: activation x activation
    MatMuls whose last axis is the sequence length, as in every Transformer."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (dim, dim)).astype(np.float32), n) for n in ("wq", "wo")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="proj_q"),
             helper.make_node("Transpose", ["x"], ["xt"], name="xt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "xt"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "x"], ["ctx"], name="context"),
             helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="proj_o")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("mode", ["static", "weight_only"])
def test_adaround_skips_activation_matmuls_on_sequences_of_different_lengths(tmp_path, mode):
    """The MiniLM failure: the probs x V MatMul's input ends in the sequence length, so its feeds cannot
    be joined; it has no weight to round and must simply be left out."""
    model = _attention_model()
    feeds = _varying_feeds(lambda t: (1, t, 16), (25, 27, 30, 26))
    r = optimize(model, feeds, _mse_eval(model, feeds), allowed_accuracy_drop=1.0, higher_is_better=False,
                 search_space={"knobs": {"mode": mode, "weight_rounding": "adaround", "fallback_k": 0,
                                         "bias_correction": mode == "static"}},
                 n_trials=1, output_dir=tmp_path / "out", show_progress=False, measure_latency=False)
    assert [t.state.name for t in r.study.trials] == ["COMPLETE"]
    assert r.study.trials[0].user_attrs["details"]["adaround_layers"] == 2  # proj_q and proj_o


def test_layer_matrix_on_conv_feeds_of_different_widths():
    """Unfolding each feed on its own reproduces ONNX Runtime's Conv output per feed (all rows), and
    row sampling draws over all feeds together."""
    from autoquant.techniques import layer_matrix

    model = _dynamic_conv_model()
    w = numpy_helper.to_array(model.graph.initializer[0])
    feeds = _varying_feeds(lambda s: (1, 3, 8, s), (8, 13, 5))
    nobias = onnx.ModelProto()
    nobias.CopyFrom(model)
    del nobias.graph.node[1:]
    del nobias.graph.node[0].input[2:]
    nobias.graph.output[0].name = "c1"
    form = layer_matrix("Conv", {"pads": [1, 1, 1, 1]}, w, [f["x"] for f in feeds])
    assert form.x.shape == (1, 8 * (8 + 13 + 5), 27)
    for got, feed in zip(form.to_output(np.matmul(form.x, form.w.transpose(0, 2, 1))), feeds):
        np.testing.assert_allclose(got, _run(nobias, feed), rtol=1e-4, atol=1e-4)
    assert layer_matrix("Conv", {"pads": [1, 1, 1, 1]}, w, [f["x"] for f in feeds], max_rows=50).x.shape[1] == 50


# ---------------------------------------------------------------------------------- old opsets, Constant weights
def _opset11_constant_weights_model() -> onnx.ModelProto:
    """Opset 11, every weight a Constant node, plus Split / Squeeze / Unsqueeze whose attributes the opset-13
    converter rewrites as (new Constant) inputs:
    Conv -> Relu -> Split -> Add -> Flatten -> Unsqueeze -> MatMul -> Squeeze."""
    rng = np.random.default_rng(0)

    def const(name: str, arr: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"const_{name}",
                                value=numpy_helper.from_array(arr.astype(np.float32), name))

    nodes = [const("w", rng.normal(0, 0.3, (4, 3, 3, 3))), const("b", rng.normal(0, 0.1, (4,))),
             const("wm", rng.normal(0, 0.1, (2 * 8 * 8, 5))),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Split", ["r"], ["s1", "s2"], name="split", axis=1, split=[2, 2]),
             helper.make_node("Add", ["s1", "s2"], ["a"], name="add"),
             helper.make_node("Flatten", ["a"], ["f"], name="flat", axis=1),
             helper.make_node("Unsqueeze", ["f"], ["u"], name="unsq", axes=[1]),
             helper.make_node("MatMul", ["u", "wm"], ["m"], name="mm"),
             helper.make_node("Squeeze", ["m"], ["y"], name="sq", axes=[1])]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_constants_added_by_the_opset_upgrade_become_initializers(tmp_path, base_config, granularity):
    from autoquant.build import RangeCache, build_qdq_model

    model = _opset11_constant_weights_model()
    prepared = prepare_model(load_model(model), tmp_path / "p.onnx")
    proto = prepared.load()
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert "opset upgraded 11 -> 13" in prepared.steps
    assert [n.name for n in proto.graph.node if n.op_type == "Constant"] == []  # the converter's ones too
    assert any(s.startswith("after the opset upgrade:") for s in prepared.steps)
    inits = {t.name for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    assert {nodes["conv"].input[1], nodes["conv"].input[2], nodes["mm"].input[1]} <= inits
    assert nodes["split"].input[1] in inits and nodes["unsq"].input[1] in inits  # split sizes, axes

    feeds = _feeds((1, 3, 8, 8), n=4)
    np.testing.assert_allclose(_run(str(prepared.path), feeds[0]), _run(model, feeds[0]), rtol=1e-5, atol=1e-6)
    stats, _ = collect_statistics(proto, float_activation_tensors(proto),
                                  CalibrationSource(feeds, prepared.input_specs), prepared.sha256)
    config = dict(base_config, weight_granularity=granularity)
    out = tmp_path / "q.onnx"
    build_qdq_model(prepared.path, RangeCache(stats).ranges(config), config, out)
    qdq = onnx.load(str(out))
    q_inits = {t.name: t for t in qdq.graph.initializer}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    for name, n_scales in (("conv", 4), ("mm", 5)):
        node = next(n for n in qdq.graph.node if n.name == name)
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear" and q_inits[dq.input[0]].data_type == TensorProto.INT8
        assert numpy_helper.to_array(q_inits[dq.input[1]]).size == (n_scales if granularity == "per_channel" else 1)
    ref = _run(model, feeds[1])
    assert _sqnr_db(ref, _run(str(out), feeds[1])) > 25


# ------------------------------------------------------------------------------------------------ lock files
@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temp dir of this test's own (tempfile's documented ``tempdir`` setting, and TMPDIR for child
    processes), so the autoquant files in it are ours alone even while other test runs share /tmp."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def test_optimize_leaves_no_lock_file(tmp_path, private_tmp):
    model = _dynamic_matmul_model()
    feeds = _varying_feeds(lambda t: (1, t, 16), (4, 6))
    for _ in range(2):  # a fresh study, then a resumed one (loads everything from the cache)
        optimize(model, feeds, _mse_eval(model, feeds), allowed_accuracy_drop=1.0, higher_is_better=False,
                 search_space={"knobs": {"calibration": "minmax", "fallback_k": 0}}, n_trials=1,
                 output_dir=tmp_path / "out", show_progress=False, measure_latency=False)
    assert sorted(p.name for p in private_tmp.glob("autoquant-*")) == []  # no lock file, no staging dir


def _hold_stage_lock(out: str, log: str, rounds: int) -> None:
    import time

    from autoquant.api import _stage_lock

    for _ in range(rounds):
        with _stage_lock(Path(out)):
            with open(log, "a") as f:
                f.write("enter\n")
            time.sleep(0.01)
            with open(log, "a") as f:
                f.write("exit\n")


def test_stage_lock_excludes_other_processes_and_is_removed(tmp_path, private_tmp):
    """Processes contending for one output_dir never overlap, although every release deletes the file."""
    import multiprocessing

    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("spawn")  # the children read tempfile.tempdir from TMPDIR
    procs = [ctx.Process(target=_hold_stage_lock, args=(str(tmp_path / "out"), str(log), 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().split()
    assert lines == ["enter", "exit"] * 45  # strictly alternating: one holder at a time
    assert list(private_tmp.glob("autoquant-*")) == []


def test_dynamic_starting_point_ranks_by_sqnr_on_a_matmul_model(tmp_path):
    """No convolution: dynamic quantization is a first-class starting point, ordered by its SQNR among
    the fully quantized ones (on a CNN it waits with the rescue points)."""
    model = _attention_model()
    feeds = _varying_feeds(lambda t: (1, t, 16), (12, 9, 15, 11))
    r = optimize(model, feeds, _mse_eval(model, feeds), allowed_accuracy_drop=1.0, higher_is_better=False,
                 n_trials=8, output_dir=tmp_path / "out", show_progress=False, measure_latency=False)
    enqueued = [t for t in r.study.trials if "enqueued" in t.user_attrs]
    first_group = [t for t in enqueued if not t.user_attrs["config"]["fallback_k"]]
    assert enqueued[:len(first_group)] == first_group  # the float-fallback rescue point comes last
    assert any(t.user_attrs["config"]["mode"] == "dynamic" for t in first_group)
    sqnr = [t.user_attrs["screen_sqnr_db"] for t in first_group]
    assert sqnr == sorted(sqnr, reverse=True)
