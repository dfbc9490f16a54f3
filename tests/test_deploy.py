"""Deploy what was scored: every export names the tensors of the float model it writes beside it, that float
model + the encodings rebuild the delivered model bit for bit, and what a format cannot hold is refused with
nothing written."""

import json
import warnings

import numpy as np
import onnx
import optuna
import pytest

from autoquant import optimize
from autoquant.cli import main
from autoquant.deploy import float_graph, float_model_path, max_abs_diff, rebuild_from_tensorrt_cache
from autoquant.errors import ConfigError
from autoquant.export import FORMATS, export, import_encodings

#: (label, knobs): the default path, every refinement that changes integers or biases, mixed precision with
#: float fallback, 4-bit per-channel weights, weight-only
CASES = {
    "default": {},
    "cle+adaround+bias": {"cle": True, "weight_rounding": "adaround", "bias_correction": True,
                          "weight_granularity": "per_channel", "activation_symmetric": True},
    "ties-away+fallback": {"weight_rounding": "nearest_away", "fallback_k": 1},
    "w4-per-channel": {"weight_granularity": "per_channel", "weight_bits": 4},
    "weight-only": {"mode": "weight_only"},
    "dynamic": {"mode": "dynamic"},
    "sym-acts-per-tensor-weights": {"activation_symmetric": True, "weight_granularity": "per_tensor"},
    "tensorrt-style": {"activation_symmetric": True, "weight_granularity": "per_channel", "weight_symmetric": True,
                       "quantize_ops": "compute"},
}


def _optimize(demo, out, knobs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, search_space={"knobs": knobs},
                        output_dir=out, show_progress=False, n_trials=1, measure_latency=False)


@pytest.fixture(scope="module")
def delivered(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    return {label: _optimize(demo, folder / label.replace("+", "_"), knobs) for label, knobs in CASES.items()}


def _names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.input} | {t.name for t in g.initializer}


@pytest.mark.parametrize("label", [c for c in CASES if c != "dynamic"])
def test_delivered_encodings_rebuild_the_delivered_model_bit_for_bit(delivered, demo, tmp_path, label):
    r = delivered[label]
    assert r.roundtrip_max_abs_diff == 0.0
    record = json.loads(open(f"{r.output_dir}/result.json").read())
    assert record["roundtrip_max_abs_diff"] == 0.0 and record["float_model_path"] == "quantized.float.onnx"
    float_model = onnx.load(r.float_model_path)
    onnx.checker.check_model(float_model)
    assert not {n.op_type for n in float_model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    enc = json.loads(open(r.encodings_path).read())
    names = {e["name"] for k in ("activation_encodings", "param_encodings") for e in enc[k]}
    assert names and names <= _names(float_model)  # every encoding names a tensor of the float model
    assert not any(n.endswith("_QuantizeLinear_Input") for n in names)
    # rebuilt again here, on other feeds than the pipeline's: still the delivered model
    rebuilt = import_encodings(r.float_model_path, r.encodings_path, tmp_path / "rebuilt.onnx")
    feeds = list(demo.calibration_data())[-3:]
    assert max_abs_diff(r.model_path, rebuilt, feeds) == 0.0


def test_the_float_model_carries_the_refined_integers(delivered):
    """AdaRound / bias correction / CLE live in the delivered integers: the float model's weights are exactly
    their dequantized values, so a quantizer given the same scales lands on the same integers."""
    r = delivered["cle+adaround+bias"]
    qdq = onnx.load(r.model_path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    fg = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(r.float_model_path).graph.initializer}
    for n in qdq.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] == "conv1.w_quantized":
            q, s = inits[n.input[0]].astype(np.float32), inits[n.input[1]].astype(np.float32)
            assert np.array_equal(fg["conv1.w"], q * s.reshape(-1, 1, 1, 1))
            assert np.array_equal(np.rint(fg["conv1.w"] / s.reshape(-1, 1, 1, 1)), q)
            break
    else:
        raise AssertionError("no quantized conv1 weight")


def test_a_dynamic_model_has_no_encodings_and_every_export_refuses_it(delivered, tmp_path, capsys):
    r = delivered["dynamic"]
    assert r.encodings_path is None and r.float_model_path is None
    for fmt in FORMATS:
        out = tmp_path / f"x-{fmt}"
        with pytest.raises(ConfigError, match="dynamic quantization"):
            export(r.model_path, out, fmt)
        assert not out.exists() and not float_model_path(out).exists()
        assert main(["export", r.output_dir, "--format", fmt, "--out", str(out)]) == 2
        assert not out.exists() and not float_model_path(out).exists()
    assert "dynamic quantization" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["tensorrt-cache", "ncnn-table"])
def test_weight_only_exports_refuse_instead_of_writing_an_empty_file(delivered, tmp_path, fmt):
    r = delivered["weight-only"]
    out = tmp_path / "out.file"
    with pytest.raises(ConfigError, match="empty"):
        export(r.model_path, out, fmt)
    assert not out.exists() and not float_model_path(out).exists()


def test_tensorrt_cache_refuses_weights_tensorrt_would_requantize(delivered, tmp_path):
    # per-tensor weights: TensorRT's implicit int8 takes max |w| / 127 per output channel, other integers
    out = tmp_path / "calib.cache"
    with pytest.raises(ConfigError, match="requantize"):
        export(delivered["sym-acts-per-tensor-weights"].model_path, out, "tensorrt-cache")
    assert not out.exists()


def test_exports_name_the_float_model_written_beside_them(delivered, tmp_path):
    r = delivered["cle+adaround+bias"]
    for fmt in FORMATS:
        out = export(r.model_path, tmp_path / fmt / f"model.{fmt}", fmt)
        float_model = onnx.load(str(float_model_path(out)))
        names = _names(float_model)
        text = out.read_text()
        if fmt == "aimet-2.0.0":
            got = {e["name"] for e in json.loads(text)["encodings"]}
        elif fmt.startswith("aimet"):
            enc = json.loads(text)
            acts, params = enc["activation_encodings"], enc["param_encodings"]
            got = {e["name"] for e in acts} | {e["name"] for e in params} if fmt == "aimet" else set(acts) | set(params)
        elif fmt == "tensorrt-cache":
            got = {line.split(": ")[0] for line in text.splitlines()[1:]}
        else:  # ncnn: layer (node) names; a weight line is <layer>_param_0
            got = {line.split()[0].removesuffix("_param_0") for line in text.splitlines()}
            names = {n.name for n in float_model.graph.node}
            assert {n.op_type for n in float_model.graph.node if n.name in got} <= {"Conv", "Gemm"}
        assert got and got <= names, fmt


def test_float_graph_restores_a_renamed_graph_output(delivered):
    fg = float_graph(onnx.load(delivered["default"].model_path))
    assert fg.renamed == {"logits_QuantizeLinear_Input": "logits"}
    assert [o.name for o in fg.model.graph.output] == ["logits"]
    assert any("logits" in n.output for n in fg.model.graph.node)


def test_the_constraints_are_also_where_optuna_dashboard_reads_them(delivered):
    """optuna-dashboard decides its Pareto front's feasibility from the list in system_attrs["constraints"]:
    an infeasible trial must not appear feasible there."""
    for r in delivered.values():
        for t in r.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            listed = t.system_attrs["constraints"]
            assert listed == [t.system_attrs["constraints:accuracy_drop"], t.system_attrs["constraints:latency_ratio"]]
            assert all(v <= 0 for v in listed) == (t.user_attrs["feasible"] and listed[1] <= 0)
    assert any(not t.user_attrs["feasible"] for r in delivered.values() for t in r.study.trials
               if t.state == optuna.trial.TrialState.COMPLETE)  # the check above saw an infeasible trial


@pytest.mark.parametrize("label", ["default", "cle+adaround+bias", "ties-away+fallback", "weight-only"])
@pytest.mark.parametrize("fmt", ["aimet", "aimet-2.0.0", "aimet-0.6.1"])
def test_every_aimet_layout_round_trips_bit_for_bit(delivered, demo, tmp_path, label, fmt):
    """Exported, then rebuilt by ONNX Runtime from the float model beside it: the delivered model's outputs."""
    r = delivered[label]
    out = export(r.model_path, tmp_path / f"e.{fmt}.json", fmt)
    rebuilt = import_encodings(float_model_path(out), out, tmp_path / "rebuilt.onnx")
    assert max_abs_diff(r.model_path, rebuilt, list(demo.calibration_data())[:3]) == 0.0


def test_aimet_1_0_0_lists_float_tensors_excluded_layers_and_its_producer(delivered):
    """A runtime quantizes a tensor with no entry: the float-fallback layer's weight and activations are written
    as FLOAT entries, the layer is in excluded_layers."""
    r = delivered["ties-away+fallback"]
    enc = json.loads(open(r.encodings_path).read())
    assert enc["producer"]["name"] == "autoquant" and enc["quantizer_args"]["dtype"] == "int"
    float_layer = r.float_nodes[0]
    assert enc["excluded_layers"] == [float_layer]
    node = next(n for n in onnx.load(r.float_model_path).graph.node if n.name == float_layer)
    params = {e["name"]: e for e in enc["param_encodings"]}
    acts = {e["name"]: e for e in enc["activation_encodings"]}
    assert params[node.input[1]]["dtype"] == "FLOAT" and params[node.input[1]]["bw"] == 32
    assert all(e["dtype"] == "INT" for n, e in params.items() if n != node.input[1] and n not in node.input)
    graph = onnx.load(r.float_model_path).graph
    every = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    assert set(acts) == every  # every activation has an entry, INT or FLOAT


def test_aimet_2_0_0_entries_are_quantize_linear_inputs(delivered):
    r = delivered["cle+adaround+bias"]
    qdq = onnx.load(r.model_path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    out = export(r.model_path, f"{r.output_dir}/v2.json", "aimet-2.0.0")
    data = json.loads(out.read_text())
    assert data["version"] == "2.0.0" and data["producer"]["name"] == "autoquant"
    by_name = {e["name"]: e for e in data["encodings"]}
    w = by_name["conv1.w"]
    assert w["output_dtype"] == "int8" and w["axis"] == 0
    assert np.array_equal(np.asarray(w["y_scale"], np.float32), inits["conv1.w_scale"].reshape(-1))
    assert not any(w["y_zero_point"])


def test_tensorrt_requantizes_the_exported_weights_to_the_delivered_integers(delivered, demo, tmp_path):
    """TensorRT's implicit int8 (emulated: the cache's activation scales, weights at max |w| / 127 per output
    channel of the float model) lands on the delivered model's weight integers, so the two models agree."""
    r = delivered["tensorrt-style"]
    cache = export(r.model_path, tmp_path / "calib.cache", "tensorrt-cache", tensorrt_version="10300")
    assert cache.read_text().splitlines()[0] == "TRT-10300-EntropyCalibration2"
    rebuilt = rebuild_from_tensorrt_cache(float_model_path(cache), cache, tmp_path / "trt.onnx")
    ints = {}
    for path in (r.model_path, rebuilt):
        m = onnx.load(str(path))
        ints[str(path)] = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer
                           if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8}
    want, got = ints[str(r.model_path)], ints[str(rebuilt)]
    assert want and want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    feeds = list(demo.calibration_data())[:3]
    scale = max(float(np.abs(y).max()) for y in onnx_outputs(r.model_path, feeds))
    assert max_abs_diff(r.model_path, rebuilt, feeds) <= 1e-5 * scale  # weight scales recomputed: ulp-level


def onnx_outputs(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [y for f in feeds for y in sess.run(None, f)]


def test_export_refuses_a_bad_tensorrt_version(delivered, tmp_path):
    with pytest.raises(ConfigError, match="tensorrt_version"):
        export(delivered["tensorrt-style"].model_path, tmp_path / "c.cache", "tensorrt-cache", tensorrt_version="8.6")
    assert not (tmp_path / "c.cache").exists()
