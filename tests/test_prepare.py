"""Model preparation on small real models: Constant weights, old opsets, constant If, external data, the report.

Every model is built with onnx.helper, run with real onnxruntime sessions and quantized with ORT's quantizer
through autoquant.build (ranges from autoquant.stats on random feeds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import model as model_mod
from autoquant.build import RangeCache, build_qdq_model
from autoquant.data import CalibrationSource
from autoquant.errors import ModelError
from autoquant.model import float_activation_tensors, load_model, model_opset, prepare_model
from autoquant.prepare import (NOTHING_QUANTIZABLE, constants_to_initializers, fold_constant_ifs,
                               quantizable_summary)
from autoquant.stats import collect_statistics

X_SHAPE = [1, 3, 8, 8]
RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
B = RNG.normal(size=(4,)).astype(np.float32)
W_FC = RNG.normal(size=(4 * 8 * 8, 5)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ helpers
def _t(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _const(name: str, arr) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=_t(name, arr), name=f"const_{name}")


def _model(nodes, inits=(), opset=17, extra_inputs=(), out_shape=(None,) * 4) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 13 else 8
    onnx.checker.check_model(model)
    return model


def _feeds(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=X_SHAPE).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto | Path, feed: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _quantize(prepared, tmp_path: Path, per_channel: bool = False) -> onnx.ModelProto:
    """Statistics on random feeds, then ORT's QDQ quantizer through autoquant.build."""
    proto = prepared.load()
    stats, _ = collect_statistics(proto, float_activation_tensors(proto),
                                  CalibrationSource(_feeds(), prepared.input_specs), prepared.sha256)
    config = {"calibration": "minmax", "percentile": None, "weight_granularity": "per_channel" if per_channel
              else "per_tensor", "weight_symmetric": True, "activation_symmetric": False, "weight_bits": 8,
              "activation_bits": 8, "weight_rounding": "nearest_even", "fallback_k": 0}
    out = tmp_path / "qdq.onnx"
    build_qdq_model(prepared.path, RangeCache(stats).ranges(config), config, out)
    qdq = onnx.load(str(out))
    _run(out, _feeds(1)[0])  # the QDQ model runs
    return qdq


def _weight_dq(qdq: onnx.ModelProto, op_type: str = "Conv") -> onnx.NodeProto:
    """The DequantizeLinear feeding ``op_type``'s weight; asserts it dequantizes an int8 initializer."""
    inits = {t.name: t for t in qdq.graph.initializer}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    node = next(n for n in qdq.graph.node if n.op_type == op_type)
    dq = producers[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    assert dq.input[0] in inits and inits[dq.input[0]].data_type == TensorProto.INT8
    return dq


def _prepare(model: onnx.ModelProto, tmp_path: Path):
    return prepare_model(load_model(model), tmp_path / "prepared.onnx")


# ------------------------------------------------------------------------------------ 1. Constant -> initializer
def test_constant_weights_become_initializers_and_get_quantized(tmp_path):
    model = _model([_const("w", W), _const("b", B), helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4),
                    helper.make_node("Relu", ["c"], ["y"])])
    moved, steps = constants_to_initializers(model)
    assert [n.op_type for n in moved.graph.node] == ["Conv", "Relu"]
    assert {t.name for t in moved.graph.initializer} == {"w", "b"}
    assert steps == ["2 Constant node(s) turned into initializers (2 weight(s) / bias(es) of "
                     "Conv/ConvTranspose/Gemm/MatMul/Gather among them)"]
    assert len(model.graph.node) == 4  # the input is not modified

    prepared = _prepare(model, tmp_path)
    assert any("2 Constant node(s)" in s for s in prepared.steps)
    feed = _feeds(1)[0]
    np.testing.assert_allclose(_run(prepared.path, feed)[0], _run(model, feed)[0], atol=1e-6)
    _weight_dq(_quantize(prepared, tmp_path))


def test_constant_that_is_a_graph_output_is_kept():
    model = _model([_const("y", np.ones((2,), np.float32))], out_shape=[2])
    moved, steps = constants_to_initializers(model)
    assert [n.op_type for n in moved.graph.node] == ["Constant"] and steps == []


# ------------------------------------------------------------------------------------------ 2. opset upgrade
def test_opset_11_model_is_upgraded_and_quantized_per_channel(tmp_path):
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4),
                    helper.make_node("Relu", ["c"], ["r"]),
                    helper.make_node("Flatten", ["r"], ["f"], axis=1),
                    helper.make_node("Gemm", ["f", "wf"], ["y"])],
                   [_t("w", W), _t("b", B), _t("wf", W_FC)], opset=11)
    prepared = _prepare(model, tmp_path)
    assert "opset upgraded 11 -> 13" in prepared.steps
    assert model_opset(prepared.load()) == 13
    feed = _feeds(1)[0]
    np.testing.assert_allclose(_run(prepared.path, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)
    qdq = _quantize(prepared, tmp_path, per_channel=True)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    assert inits[_weight_dq(qdq, "Conv").input[1]].shape == (4,)  # one scale per output channel
    assert inits[_weight_dq(qdq, "Gemm").input[1]].shape == (5,)


# ------------------------------------------------------------------------------------------ 3. control flow
def _if_model(cond_as_constant: bool, cond: bool = True) -> onnx.ModelProto:
    """x -> If(cond) -> relu -> y; then: Conv with a branch-local weight, else: Sigmoid then outer x as-is."""
    then_branch = helper.make_graph(
        # "c" and "relu" are also names in the main graph: the inlined branch must not clash with them
        [helper.make_node("Conv", ["x", "w_then", "b"], ["c"], pads=[1] * 4, name="conv_then"),
         helper.make_node("LeakyRelu", ["c"], ["t_out"], name="relu")],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [None] * 4)], [_t("w_then", W)])
    else_branch = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["s"], name="sig_else")], "else", [],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [None] * 4)])
    nodes = [helper.make_node("If", ["cond"], ["branch_out"], then_branch=then_branch, else_branch=else_branch,
                              name="the_if"),
             helper.make_node("Relu", ["branch_out"], ["c"], name="relu"),
             helper.make_node("Identity", ["c"], ["y"], name="out")]
    inits = [_t("b", B)]
    if cond_as_constant:
        nodes.insert(0, _const("cond", np.array(cond)))
    else:
        inits.append(_t("cond", np.array(cond)))
    return _model(nodes, inits)


@pytest.mark.parametrize("cond_as_constant", [False, True])
def test_if_with_constant_condition_is_replaced_by_the_taken_branch(tmp_path, cond_as_constant):
    model = _if_model(cond_as_constant)
    folded, steps = fold_constant_ifs(model)
    assert steps == ["1 If node(s) with a constant condition replaced by the branch taken: the_if (then)"]
    assert "If" not in [n.op_type for n in folded.graph.node]
    assert "cond" not in {t.name for t in folded.graph.initializer} | {o for n in folded.graph.node for o in n.output}
    assert [(n.name, list(n.output)) for n in folded.graph.node] == [
        ("conv_then", ["the_if/c"]), ("the_if/relu", ["branch_out"]), ("relu", ["c"]), ("out", ["y"])]
    onnx.checker.check_model(folded)

    prepared = _prepare(model, tmp_path)
    proto = prepared.load()
    assert "If" not in [n.op_type for n in proto.graph.node]
    assert any("If node(s) with a constant condition" in s for s in prepared.steps)
    for feed in _feeds(2):
        np.testing.assert_allclose(_run(prepared.path, feed)[0], _run(model, feed)[0], atol=1e-6, rtol=0)
    assert prepared.report.float_nodes.get("out") == "unsupported op Identity"
    assert not any("subgraph" in r for r in prepared.report.float_nodes.values())
    _weight_dq(_quantize(prepared, tmp_path))


def test_else_branch_returning_an_outer_name_is_wired_with_identity():
    model = _if_model(cond_as_constant=False, cond=False)
    # the else branch now outputs the outer input x itself
    else_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    else_branch.output[0].name = "x"
    folded, steps = fold_constant_ifs(model)
    assert steps[0].endswith("the_if (else)")
    onnx.checker.check_model(folded)
    feed = _feeds(1)[0]
    np.testing.assert_allclose(_run(folded, feed)[0], np.maximum(feed["x"], 0), atol=1e-6)


def test_nested_constant_ifs_are_folded_and_outer_references_renamed():
    """The taken branch holds an If whose condition is a Constant of that branch and whose branches read a
    branch-local tensor ("c", renamed when inlined since the main graph also has a "c")."""
    model = _if_model(cond_as_constant=False)
    then_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    inner_then = helper.make_graph([helper.make_node("Neg", ["c"], ["n"])], "it", [],
                                   [helper.make_tensor_value_info("n", TensorProto.FLOAT, [None] * 4)])
    inner_else = helper.make_graph([helper.make_node("Abs", ["c"], ["a"])], "ie", [],
                                   [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None] * 4)])
    then_branch.node[1].input[0] = "inner_out"
    then_branch.node.insert(1, _const("inner_cond", np.array([True])))
    then_branch.node.insert(2, helper.make_node("If", ["inner_cond"], ["inner_out"], then_branch=inner_then,
                                                else_branch=inner_else, name="inner_if"))
    onnx.checker.check_model(model)
    folded, steps = fold_constant_ifs(model)
    assert steps == ["2 If node(s) with a constant condition replaced by the branch taken: the_if (then), "
                     "inner_if (then)"]
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Neg", "LeakyRelu", "Relu", "Identity"]
    onnx.checker.check_model(folded)
    for feed in _feeds(2):
        np.testing.assert_allclose(_run(folded, feed)[0], _run(model, feed)[0], atol=1e-6, rtol=0)


def test_if_with_runtime_condition_stays_and_its_nodes_are_reported_float(tmp_path):
    model = _if_model(cond_as_constant=False)
    model.graph.initializer.pop()  # "cond" becomes a graph input fed at run time
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    onnx.checker.check_model(model)
    folded, steps = fold_constant_ifs(model)
    assert steps == [] and "If" in [n.op_type for n in folded.graph.node]

    prepared = _prepare(model, tmp_path)
    floats = prepared.report.float_nodes
    assert floats["the_if"] == "unsupported op If"
    assert floats["the_if/conv_then"] == floats["the_if/relu"] == floats["the_if/sig_else"] \
        == "inside an unhandled subgraph"
    assert any("their 3 inner node(s) stay float" in s for s in prepared.steps)


# ------------------------------------------------------------------------------------------ 4. external data
def _save_external(model: onnx.ModelProto, folder: Path, location: str = "w.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _conv_model() -> onnx.ModelProto:
    return _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4)], [_t("w", W), _t("b", B)])


def test_external_data_round_trip(tmp_path):
    path = _save_external(_conv_model(), tmp_path / "m")
    assert (tmp_path / "m" / "w.bin").stat().st_size > W.nbytes
    proto = load_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.initializer[0]), W)
    prepared = prepare_model(proto, tmp_path / "prep" / "prepared.onnx")
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == ["prepared.onnx"]  # small: one file
    feed = _feeds(1)[0]
    np.testing.assert_allclose(_run(prepared.path, feed)[0], _run(path, feed)[0], atol=1e-6)
    _weight_dq(_quantize(prepared, tmp_path))


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of ``path`` at ``location`` (the .onnx is rewritten, no data is read)."""
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("kind", ["parent", "absolute"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, kind):
    path = _save_external(_conv_model(), tmp_path / "m")
    outside = tmp_path / "w.bin"
    (tmp_path / "m" / "w.bin").rename(outside)  # the file exists, but outside the model's folder
    location = "../w.bin" if kind == "parent" else str(outside)
    _relocate(path, location)
    with pytest.raises(ModelError, match="outside the model's folder|absolute path") as err:
        load_model(path)
    assert "'w'" in str(err.value) and location in str(err.value)


def test_missing_external_data_and_unloaded_proto_are_refused(tmp_path):
    path = _save_external(_conv_model(), tmp_path / "m")
    with pytest.raises(ModelError, match="pass the model's path"):
        load_model(onnx.load(str(path), load_external_data=False))
    (tmp_path / "m" / "w.bin").unlink()
    with pytest.raises(ModelError, match="not found.*copy it next to the model"):
        load_model(path)


def test_large_prepared_model_is_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_mod, "LARGE_MODEL_BYTES", 0)
    w = RNG.normal(size=(32, 3, 3, 3)).astype(np.float32)  # above onnx's 1 KiB external-data threshold
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)], [_t("w", w)])
    prepared = _prepare(model, tmp_path)
    data = tmp_path / "prepared.onnx.data"
    assert data.stat().st_size >= w.nbytes and prepared.path.stat().st_size < w.nbytes
    np.testing.assert_array_equal(numpy_helper.to_array(prepared.load().graph.initializer[0]), w)
    feed = _feeds(1)[0]
    np.testing.assert_allclose(_run(prepared.path, feed)[0], _run(model, feed)[0], atol=1e-6)
    _weight_dq(_quantize(prepared, tmp_path))


# -------------------------------------------------------------------------------------------------- 5. report
def test_report_of_a_model_with_nothing_quantizable(tmp_path):
    model = _model([helper.make_node("Abs", ["x"], ["a"], name="abs"), helper.make_node("Neg", ["a"], ["y"])])
    report = quantizable_summary(model)
    assert report.n_quantizable == 0
    assert report.float_nodes == {"abs": "unsupported op Abs", "Neg_1": "unsupported op Neg"}
    assert report.warning.startswith(NOTHING_QUANTIZABLE)
    assert _prepare(model, tmp_path).report.warning.startswith(NOTHING_QUANTIZABLE)


def test_report_of_a_quantizable_model(tmp_path):
    model = _model([_const("w", W), helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
                    helper.make_node("Abs", ["c"], ["y"])])
    prepared = _prepare(model, tmp_path)
    report = prepared.report
    assert report.n_quantizable == 1 and report.warning is None
    assert list(report.float_nodes.values()) == ["unsupported op Abs"]
    assert report.float_op_counts() == {"unsupported op Abs": 1}
    assert report.steps == prepared.steps
    assert json.loads(json.dumps(report.to_dict()))["n_quantizable"] == 1
