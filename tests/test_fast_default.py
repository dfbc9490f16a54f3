"""Fast by default: the quantization scope is searched, fallback reaches elementwise nodes, and the delivered
model is never slower than fp32 when a feasible model at fp32 speed was found."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import optimize
from autoquant import cost
from autoquant.cli import main
from autoquant.scope import ORT_OPS, SCOPES, in_scope, normalize
from autoquant.space import SearchSpace
from autoquant.errors import SearchSpaceError

T, D, N_CLS = 8, 16, 4


def attention_pool_model(seed: int = 0) -> onnx.ModelProto:
    """Attention pooling with additive-mask arithmetic (-1e4 on padded positions, as exported Transformers
    write it): quantizing the mask Add collapses the scores to one level, so only the compute-only scope
    (MatMuls quantized, mask / Softmax / Mul float) keeps the model's decisions."""
    r = np.random.default_rng(seed)
    wa = (3.0 * r.standard_normal((D, 1)) / np.sqrt(D)).astype(np.float32)
    w2 = (r.standard_normal((D, N_CLS)) / np.sqrt(D)).astype(np.float32)
    mask = np.zeros((1, T, 1), np.float32)
    mask[:, T - 2:] = -10000.0
    inits = [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wa"], ["scores"], name="score"), n("Add", ["scores", "mask"], ["masked"], name="mask_add"),
             n("Softmax", ["masked"], ["attn"], axis=1, name="softmax"), n("Mul", ["attn", "x"], ["weighted"], name="weight"),
             n("ReduceSum", ["weighted", "axis1"], ["pooled"], keepdims=0, name="pool"),
             n("MatMul", ["pooled", "w2"], ["logits"], name="classifier")]
    graph = helper.make_graph(nodes, "attention_pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLS])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def attention_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attention")
    path = folder / "model.onnx"
    onnx.save(attention_pool_model(), path)
    xs = np.random.default_rng(1).standard_normal((600, T, D)).astype(np.float32)
    calib = [{"x": xs[i:i + 8]} for i in range(0, 64, 8)]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": xs[64:]})[0].argmax(1)

    def evaluate(model_path: str) -> float:
        out = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(None, {"x": xs[64:]})[0]
        return float((out.argmax(1) == ref).mean())

    return path, calib, evaluate


def _run(task, tmp_path, space, **kw):
    path, calib, evaluate = task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(str(path), calib, evaluate, search_space=space, output_dir=tmp_path, show_progress=False, **kw)


def _quantized_by(model_path: str) -> set[str]:
    """Op types of the nodes that run quantized: every input is a DequantizeLinear output (in QDQ form a
    float node may read one DequantizeLinear output, e.g. the Mul beside a quantized MatMul input)."""
    model = onnx.load(model_path)
    dq = {o for node in model.graph.node if node.op_type == "DequantizeLinear" for o in node.output}
    return {node.op_type for node in model.graph.node if node.op_type in ORT_OPS
            and all(i in dq for i in node.input[:2] if i and not i.startswith("axis"))}


@pytest.mark.parametrize("scope", ["compute", "compute_and_movement", "all", "MatMul"])
def test_the_scope_reaches_the_built_model(attention_task, tmp_path, scope):
    r = _run(attention_task, tmp_path, {"knobs": {"quantize_ops": scope}}, n_trials=1, measure_latency=False)
    assert r.config["quantize_ops"] == normalize(scope)
    quantized = _quantized_by(r.model_path)  # outputs quantized: only nodes in the scope
    assert "MatMul" in quantized
    assert all(in_scope(op, r.config["quantize_ops"]) for op in quantized)
    if scope == "all":  # ORT's registry: the mask arithmetic gets Q/DQ too
        assert {"Add", "Softmax", "Mul"} <= quantized
    else:
        assert not {"Add", "Softmax", "Mul"} & quantized


def test_only_the_compute_scope_is_feasible_and_optimize_delivers_it(attention_task, tmp_path):
    full = _run(attention_task, tmp_path / "all", {"knobs": {"quantize_ops": "all"}}, n_trials=1,
                allowed_accuracy_drop=0.03, measure_latency=False)
    assert not full.feasible  # precondition: ORT's default scope collapses the attention
    # the default space, static mode, no float / 16-bit nodes (dynamic quantization of the MatMuls, or ORT's
    # scope with the mask nodes float, would be feasible too: not the point here); timing on a model this small
    # is noise, so the rule decides by size
    default = SearchSpace.load("default").to_json()
    space = {"knobs": {**default["knobs"], "mode": "static", "fallback_k": 0, "a16_k": 0}}
    r = _run(attention_task, tmp_path / "default", space, n_trials=6, allowed_accuracy_drop=0.03,
             measure_latency=False)
    assert r.feasible and r.config["quantize_ops"] in ("compute", "compute_and_movement")
    assert not {"Add", "Softmax", "Mul"} & _quantized_by(r.model_path)
    assert r.eval_calls <= 7  # fp32 + at most n_trials


def test_elementwise_nodes_are_kept_float_by_the_ladder(attention_task, tmp_path):
    """In ORT's full scope the mask arithmetic (the Add, and the Softmax that quantizes its input) is the most
    sensitive: fallback_k=2 keeps both float, which restores the accuracy, and the report says why."""
    r = _run(attention_task, tmp_path, {"knobs": {"quantize_ops": "all", "fallback_k": 2}}, n_trials=1,
             measure_latency=False, allowed_accuracy_drop=0.03)
    assert sorted(r.float_nodes) == ["mask_add", "softmax"]
    assert set(r.sensitivity()["node"].iloc[:2]) == {"mask_add", "softmax"}
    assert not {"Add", "Softmax"} & _quantized_by(r.model_path) and "MatMul" in _quantized_by(r.model_path)
    assert r.feasible
    row = r.report(all_trials=True).iloc[0]
    assert row["n_float_nodes"] == 2 and "mask_add (fallback_k: sensitivity rank" in row["float_nodes"]


def test_sensitivity_is_measured_only_for_the_nodes_in_the_trials_scope(attention_task, tmp_path):
    """A compute-only trial with fallback_k ranks the MatMuls only: the elementwise nodes, which that scope keeps
    float, cost no measurement (on PP-OCR: 161 of 410 tensors)."""
    r = _run(attention_task, tmp_path, {"knobs": {"quantize_ops": "compute", "fallback_k": 1}}, n_trials=1,
             measure_latency=False)
    table = r.sensitivity()
    assert set(table["node"]) == {"score", "classifier"} and table["sqnr_db_w8a8"].notna().all()
    assert r.float_nodes and set(r.float_nodes) <= {"score", "classifier"}


def test_repair_narrows_the_scope_when_every_full_scope_trial_is_infeasible(attention_task, tmp_path):
    space = {"knobs": {"quantize_ops": ["all", "compute"], "weight_granularity": "per_channel"}}
    path, calib, evaluate = attention_task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = optimize(str(path), calib, evaluate, search_space=space, output_dir=tmp_path, show_progress=False,
                     n_trials=3, allowed_accuracy_drop=0.03, measure_latency=False, seed=0)
    assert r.feasible and r.config["quantize_ops"] == "compute"


def test_space_values_of_the_scope_knob():
    space = SearchSpace({"knobs": {"quantize_ops": ["compute", ["Gather", "MatMul"], "Conv+Gemm"]}})
    assert space.domains["quantize_ops"].values == ("compute", "Gather+MatMul", "Conv+Gemm")
    with pytest.raises(SearchSpaceError, match="not quantized by ONNX Runtime"):
        SearchSpace({"knobs": {"quantize_ops": ["Erf"]}})
    with pytest.raises(SearchSpaceError, match="quantize_ops"):
        SearchSpace({"knobs": {"quantize_ops": [3]}})
    assert set(SCOPES) == {"compute", "compute_and_movement", "all"}
    # a space that drops the knob gets the fast recipe; dynamic / weight-only trials carry no scope
    config = SearchSpace({"knobs": {"mode": "dynamic"}}).suggest(None, 1)
    assert config["quantize_ops"] is None
    assert SearchSpace({"knobs": {}}).suggest(None, 1)["quantize_ops"] == "compute"


class ControlledMeter(cost.SpeedMeter):
    """A SpeedMeter whose ratios are set by the test per quantization mode (measured ones are noise on a
    tiny model): the delivery rule must follow them."""

    ratios: dict[str, float] = {}

    def measure(self, path, details=None, *, both=True):
        model = onnx.load(str(path), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        mode = "dynamic" if "DynamicQuantizeLinear" in ops else "static" if "QuantizeLinear" in ops else "weight_only"
        r = self.ratios[mode]
        return {"latency_ms": r, "latency_ratio": r, "latency_ms_default_threads": r, "latency_ratio_default_threads": r}


@pytest.fixture
def controlled(monkeypatch):
    monkeypatch.setattr("autoquant.api.SpeedMeter", ControlledMeter)
    return ControlledMeter


def _run_demo(demo, tmp_path, space, **kw):
    """The bundled demo CNN (its int8 files are 0.28x fp32's: a real compression), any mode within 0.1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, search_space=space,
                        output_dir=tmp_path, show_progress=False, allowed_accuracy_drop=0.1, **kw)


MODES = {"knobs": {"mode": ["static", "dynamic"], "quantize_ops": "compute", "weight_granularity": "per_channel"}}


@pytest.mark.parametrize("fast_mode", ["static", "dynamic"])
def test_delivery_never_picks_a_slower_feasible_model_over_a_faster_one(demo, tmp_path, controlled, fast_mode):
    controlled.ratios = {"static": 2.0, "dynamic": 2.0, fast_mode: 0.5}
    r = _run_demo(demo, tmp_path, MODES, n_trials=2, prune=False)  # both scored, whatever the order
    feasible = {t.user_attrs["config"]["mode"] for t in r.study.trials if t.user_attrs.get("feasible")}
    assert feasible == {"static", "dynamic"}  # both are feasible: the choice is speed's
    assert r.config["mode"] == fast_mode and r.latency_ratio_default_threads == 0.5 and not r.warnings


def test_a_slower_model_is_delivered_only_with_a_warning_and_the_search_goes_on(demo, tmp_path, controlled):
    controlled.ratios = {"static": 1.7, "dynamic": 1.7, "weight_only": 1.7}
    r = _run_demo(demo, tmp_path, MODES, n_trials=4, stop_when_feasible=True)
    done = [t for t in r.study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 4  # a feasible but slower model does not stop a stop_when_feasible search
    assert r.feasible and len(r.warnings) == 1 and "1.70x fp32's latency" in r.warnings[0]
    # the constraint Optuna's sampler sees: slower than fp32 is infeasible
    t = r.study.trials[r.trial_number]
    assert t.system_attrs["constraints:latency_ratio"] == pytest.approx(0.7)


def test_stop_when_feasible_stops_at_the_first_fast_feasible_model(demo, tmp_path, controlled):
    controlled.ratios = {"static": 0.6, "dynamic": 0.6, "weight_only": 0.6}
    r = _run_demo(demo, tmp_path, MODES, n_trials=4, stop_when_feasible=True)
    assert len([t for t in r.study.trials if t.state.name == "COMPLETE"]) == 1 and r.feasible and not r.warnings


def test_cli_prints_the_warning(demo, tmp_path, controlled, capsys):
    controlled.ratios = {"static": 1.5, "dynamic": 1.5, "weight_only": 1.5}
    path = demo.model_path
    feeds = list(demo.calibration_data())
    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    (tmp_path / "ev.py").write_text(
        "import numpy as np, onnxruntime as ort\n"
        "def evaluate(p):\n"
        "    return 1.0\n")
    (tmp_path / "space.yaml").write_text("knobs:\n  quantize_ops: compute\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = main(["optimize", str(path), "--calib", str(tmp_path / "calib.npz"), "--calib-batch-size", "8",
                     "--eval", f"{tmp_path / 'ev.py'}:evaluate", "--space", str(tmp_path / "space.yaml"),
                     "--n-trials", "1", "--output-dir", str(tmp_path / "o"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "warning: the delivered model runs at 1.50x fp32's latency" in out


def test_both_latency_ratios_recorded_and_single_thread_rule_selectable(attention_task, tmp_path):
    r = _run(attention_task, tmp_path, {"knobs": {"quantize_ops": "compute"}}, n_trials=1,
             latency_threading="single")
    d = r.study.trials[r.trial_number].user_attrs["details"]
    assert d["latency_ratio"] > 0 and d["latency_ratio_default_threads"] > 0
    assert r.latency_ratio == d["latency_ratio"]
    assert r.study.user_attrs["launch"]["latency_threading"] == "single"
    with pytest.raises(Exception, match="latency_threading"):
        _run(attention_task, tmp_path / "bad", "default", n_trials=1, latency_threading="all cores")
