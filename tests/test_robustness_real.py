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
