"""Sensitivity from one full quantize_static per precision: agrees with one build per node, cached lazily."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import sensitivity as S
from autoquant.build import RangeCache
from autoquant.data import CalibrationSource
from autoquant.model import compute_nodes, float_activation_tensors, load_model, prepare_model
from autoquant.stats import collect_statistics


def _branchy_model() -> onnx.ModelProto:
    """conv -> relu -> avgpool -> conv -> residual add -> concat -> 1x1 conv -> gap -> flatten (an output,
    also read by the gemm) -> gemm (an output) -> softmax (an output): skip connections, an op ORT
    quantizes only next to quantized neighbours, a scalar Mul constant, several graph outputs."""
    rng = np.random.default_rng(1)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("b1", 8, scale=0.1), init("w2", 8, 8, 3, 3, scale=0.15),
             init("b2", 8, scale=0.1), init("w3", 8, 16, 1, 1), init("wg", 4, 8, scale=0.5), init("bg", 4, scale=0.1),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("AveragePool", ["r1"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["a1"], "add1"),
        helper.make_node("Mul", ["a1", "half"], ["m1"], "mul1"),
        helper.make_node("Concat", ["m1", "p1"], ["cat"], "concat1", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["c3"], "conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g1"], "gap1"),
        helper.make_node("Flatten", ["g1"], ["features"], "flatten1"),
        helper.make_node("Gemm", ["features", "wg", "bg"], ["logits"], "gemm1", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], "softmax1", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", k]) for n, k in
         (("features", 8), ("logits", 4), ("probs", 4))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def branchy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("branchy")
    prepared = prepare_model(load_model(_branchy_model()), folder / "prepared.onnx")
    proto = prepared.load()
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    source = CalibrationSource(feeds, prepared.input_specs)
    stats, _ = collect_statistics(proto, float_activation_tensors(proto), source, prepared.sha256)
    return prepared.path, stats, compute_nodes(proto)


def _reference(path, stats, nodes, precision, n_samples=S.MAX_SAMPLES):
    """One quantize_static(nodes_to_quantize=[node]) build and session per node."""
    config = S.PRECISIONS[precision]
    samples = stats.samples[:n_samples]
    reference = S.run_outputs(S.session(path, S.fast_session_options()), samples)
    return S.measure_sensitivity_per_node(path, RangeCache(stats).ranges(config), config, nodes, samples, reference)


def _close(a: float, b: float, tol: float) -> bool:
    """Equal within ``tol`` dB. The fp32 reference runs the prepared model, int4 / int16 builds start from
    its opset-21 copy: float rounding (~140 dB) shows above 80 dB, and above 120 dB it is all there is
    (the same as nothing quantized, inf)."""
    a, b = (float("inf") if v > 120 else v for v in (a, b))
    if not np.isfinite(a) or not np.isfinite(b):
        return a == b
    return abs(a - b) <= (tol if min(a, b) < 80 else 0.5)


@pytest.mark.parametrize("precision", list(S.PRECISIONS))
def test_derived_single_node_models_match_one_build_per_node(branchy, precision, tmp_path):
    path, stats, nodes = branchy
    ref = _reference(path, stats, nodes, precision)
    got = S.measure_sensitivity(path, stats, nodes, tmp_path, precisions=[precision])
    assert set(got) == set(nodes)
    assert sum(v < 120 for v in ref.values()) >= 6  # most nodes do get quantized alone
    for n in nodes:
        assert _close(got[n][precision], ref[n], 0.01), (n, got[n][precision], ref[n])
    ranking = S.rank_nodes(got, precision)
    assert ranking == sorted(nodes, key=lambda n: (ref[n], nodes.index(n)))


def test_demo_model_matches_one_build_per_node(prepared_demo, tmp_path):
    prepared, stats = prepared_demo
    nodes = compute_nodes(prepared.load())
    got = S.measure_sensitivity(prepared.path, stats, nodes, tmp_path)
    for precision in S.PRECISIONS:
        ref = _reference(prepared.path, stats, nodes, precision)
        for n in nodes:
            assert _close(got[n][precision], ref[n], 0.01), (precision, n, got[n][precision], ref[n])


def test_cut_and_checkpointed_graphs_give_the_whole_graph_result(branchy, monkeypatch):
    """Running only the downstream part, from every cached fp32 tensor or from a few checkpoints with
    the rest recomputed, gives what running the whole single-node model gives."""
    path, stats, nodes = branchy
    config = S.PRECISIONS["w8a8"]
    ranges = RangeCache(stats).ranges(config)
    samples = stats.samples[:2]
    whole = S.SingleNodeModels(path, ranges, config, nodes, samples, cut=False)
    assert whole.values is None
    everything = S.SingleNodeModels(path, ranges, config, nodes, samples)
    monkeypatch.setattr(S, "MAX_CACHED_BYTES", 2 * 2 * 8 * 8 * 8 * 4 * 2)  # ~2 activations of 2 samples
    monkeypatch.setattr(S, "SHARED_INITIALIZER_BYTES", 0)  # every float weight passed to the sessions
    few = S.SingleNodeModels(path, ranges, config, nodes, samples)
    n_tensors = len({t for n in onnx.load(str(path)).graph.node for t in n.output})
    assert len(few.cached - {"x"}) < len(everything.cached - {"x"}) == n_tensors
    assert not everything._shared and len(few._shared) >= 5
    for n in nodes:
        a, b, c = whole.sqnr(n), everything.sqnr(n), few.sqnr(n)
        assert _close(a, b, 1e-3) and _close(a, c, 1e-3), (n, a, b, c)
        if everything.groups_of(n):
            model = everything.model(n)  # the cut model is a valid graph with fewer nodes
            assert len(model.graph.node) <= len(whole.model(n).graph.node)


def test_precisions_are_measured_lazily_and_cached(branchy, tmp_path):
    path, stats, nodes = branchy
    first = S.measure_sensitivity(path, stats, nodes, tmp_path, precisions=("w8a8",))
    assert all(set(d) == {"w8a8"} for d in first.values())
    (cache,) = tmp_path.glob("sensitivity-*.json")
    data = json.loads(cache.read_text())
    assert set(data["sqnr_db"]) == {"w8a8"}
    data["sqnr_db"]["w8a8"][nodes[0]] = -123.0  # a value only the cache can return
    cache.write_text(json.dumps(data))
    both = S.measure_sensitivity(path, stats, nodes, tmp_path, precisions=("w8a8", "w4a8"))
    assert both[nodes[0]]["w8a8"] == -123.0  # w8a8 read back, not measured again
    assert all(set(d) == {"w8a8", "w4a8"} for d in both.values())
    assert set(json.loads(cache.read_text())["sqnr_db"]) == {"w8a8", "w4a8"}
    with pytest.raises(ValueError, match="unknown precision"):
        S.measure_sensitivity(path, stats, nodes, tmp_path, precisions=("w2a2",))


def test_time_budget_leaves_nodes_unmeasured_and_ranking_works(branchy, tmp_path):
    path, stats, nodes = branchy
    none = S.measure_sensitivity(path, stats, nodes, tmp_path, precisions=("w8a8",), time_budget=0.0)
    assert none == {n: {} for n in nodes}
    assert S.rank_nodes(none, "w8a8") == nodes  # nothing measured: graph order, no crash
    full = S.measure_sensitivity(path, stats, nodes, tmp_path, precisions=("w8a8",))  # measures the rest
    assert all("w8a8" in d for d in full.values())
    partial = {n: (dict(d) if i % 2 else {}) for i, (n, d) in enumerate(full.items())}
    ranking = S.rank_nodes(partial, "w8a8")
    assert sorted(ranking) == sorted(nodes)
    measured = [n for n in ranking if partial[n]]
    assert measured == sorted(measured, key=lambda n: (partial[n]["w8a8"], nodes.index(n)))
    unmeasured = [ranking.index(n) for n in nodes if not partial[n]]
    assert min(unmeasured) > 0 and max(unmeasured) < len(nodes) - 1  # in the middle, not at either end
    none_values = {n: {"w8a8": None} for n in nodes}
    assert S.rank_nodes(none_values, "w8a8") == nodes  # None (as recorded in a study) counts as unmeasured
