"""Exporters (AIMET 1.0.0 / 0.6.1, TensorRT calibration cache, ncnn table) and the AIMET import."""

import json
import struct
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from autoquant._io import atomic_write_json
from autoquant.build import RangeCache, build_qdq_model
from autoquant.deploy import deployment
from autoquant.encodings import encodings_from_model
from autoquant.errors import ConfigError
from autoquant.export import FORMATS, TRT_CACHE_HEADER, export, import_encodings, legacy_encodings

from _util import init_array
from conftest import BASE_CONFIG

CONFIGS = {
    "affine-u8": {},  # ORT defaults: per-tensor int8 weights, affine uint8 activations
    "sym-i8-pc": {"activation_symmetric": True, "weight_granularity": "per_channel"},
    "sym-i8-w4": {"activation_symmetric": True, "weight_bits": 4},
    "i16-w4-pc": {"activation_bits": 16, "activation_symmetric": True, "weight_bits": 4,
                  "weight_granularity": "per_channel"},
    "u16-w8asym-pc": {"activation_bits": 16, "weight_symmetric": False, "weight_granularity": "per_channel"},
    "u8-away": {"weight_rounding": "nearest_away"},  # integer weights that ORT's own rounding would not give
}


@pytest.fixture(scope="module")
def models(prepared_demo, tmp_path_factory):
    """name -> path of a QDQ model autoquant built from the demo task, plus the float model it came from."""
    prepared, stats = prepared_demo
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for name, knobs in CONFIGS.items():
        cfg = dict(BASE_CONFIG, **knobs)
        out[name] = folder / f"{name}.onnx"
        build_qdq_model(prepared.path, RangeCache(stats).ranges(cfg), cfg, out[name])
    cfg = dict(BASE_CONFIG, activation_symmetric=True)
    out["fallback"] = folder / "fallback.onnx"
    build_qdq_model(prepared.path, RangeCache(stats).ranges(cfg), cfg, out["fallback"], fallback_nodes=["conv2"])
    out["float"] = prepared.path
    return out


def q_scale(model, tensor):
    """Scale initializer of the QuantizeLinear of an activation (or of a graph output's renamed producer)."""
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
             and n.input[0] in (tensor, f"{tensor}_QuantizeLinear_Input"))
    return init_array(model, q.input[1]).reshape(-1)


def dq_scale(model, param):
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{param}_quantized")
    return init_array(model, dq.input[1]).reshape(-1)


def bits(x):
    return [struct.pack("<f", v) for v in np.asarray(x, np.float32).reshape(-1)]


def test_unknown_format_names_every_format(models, tmp_path):
    with pytest.raises(ConfigError) as err:
        export(models["affine-u8"], tmp_path / "x", "tflite")
    assert all(f in str(err.value) for f in FORMATS)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["affine-u8", "i16-w4-pc"])
def test_aimet_1_0_0_scales_are_the_models(models, tmp_path, name):
    model = onnx.load(str(models[name]))
    enc = json.loads(export(models[name], tmp_path / "e.json", "aimet").read_text())
    assert enc["version"] == "1.0.0" and enc["activation_encodings"] and enc["param_encodings"]
    for e in enc["activation_encodings"]:
        assert bits(e["scale"]) == bits(q_scale(model, e["name"].removesuffix("_QuantizeLinear_Input")))
    for e in enc["param_encodings"]:
        assert bits(e["scale"]) == bits(dq_scale(model, e["name"]))
        assert e["enc_type"] == ("PER_CHANNEL" if len(e["scale"]) > 1 else "PER_TENSOR")


@pytest.mark.parametrize("name", ["affine-u8", "i16-w4-pc", "u16-w8asym-pc"])
def test_aimet_0_6_1_layout_and_min_max_offset(models, tmp_path, name):
    model = onnx.load(str(models[name]))
    new = deployment(model)[1]  # the float model's names: a graph output is 'logits', not ORT's rename
    old = json.loads(export(models[name], tmp_path / "e.json", "aimet-0.6.1").read_text())
    assert old["version"] == "0.6.1"
    assert isinstance(old["activation_encodings"], dict) and isinstance(old["param_encodings"], dict)
    for kind in ("activation_encodings", "param_encodings"):
        assert set(old[kind]) == {e["name"] for e in new[kind]}
        for e in new[kind]:
            chans = old[kind][e["name"]]
            assert len(chans) == len(e["scale"])  # one dict per channel
            for c, s, o in zip(chans, e["scale"], e["offset"]):
                assert set(c) == {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}
                assert c["dtype"] == "int" and c["is_symmetric"] == str(e["is_sym"]) and c["bitwidth"] == e["bw"]
                assert c["scale"] == s and c["offset"] == o
                assert c["min"] == pytest.approx(c["scale"] * c["offset"], rel=1e-12, abs=0)
                assert c["max"] == pytest.approx(c["scale"] * (c["offset"] + 2 ** c["bitwidth"] - 1), rel=1e-12)
                assert c["min"] <= 0 <= c["max"]  # zero is on the grid
            scales = [c["scale"] for c in chans]
            model_scale = (dq_scale(model, e["name"]) if kind == "param_encodings"
                           else q_scale(model, e["name"].removesuffix("_QuantizeLinear_Input")))
            assert bits(scales) == bits(model_scale)


def test_tensorrt_cache_hex_decodes_to_activation_scales(models, tmp_path):
    model = onnx.load(str(models["sym-i8-pc"]))
    lines = export(models["sym-i8-pc"], tmp_path / "calib.cache", "tensorrt-cache").read_text().splitlines()
    assert lines[0] == TRT_CACHE_HEADER and lines[0].startswith("TRT-") and lines[0].endswith("-EntropyCalibration2")
    entries = dict(line.split(": ") for line in lines[1:])
    acts = {e["name"].removesuffix("_QuantizeLinear_Input") for e in encodings_from_model(model)["activation_encodings"]}
    assert set(entries) == acts and "logits" in entries  # the float model's names
    for name, hexed in entries.items():
        assert len(hexed) == 8
        scale = struct.unpack(">f", bytes.fromhex(hexed))[0]
        assert bits(scale) == bits(q_scale(model, name))


def test_tensorrt_cache_refuses_affine_activations(models, tmp_path):
    with pytest.raises(ConfigError, match="not TensorRT-compatible.*affine 8-bit.*activation_symmetric: true"):
        export(models["affine-u8"], tmp_path / "calib.cache", "tensorrt-cache")
    assert not (tmp_path / "calib.cache").exists()


@pytest.mark.parametrize("name", ["sym-i8-pc", "sym-i8-w4"])
def test_ncnn_table_holds_reciprocal_scales(models, tmp_path, name):
    model = onnx.load(str(models[name]))
    lines = export(models[name], tmp_path / "model.table", "ncnn-table").read_text().splitlines()
    rows = {line.split()[0]: np.array([np.float32(float(v)) for v in line.split()[1:]]) for line in lines}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(lines) == 2 * len(layers) and all("_param_0" in line for line in lines[: len(layers)])
    for node in layers:
        weight = node.input[1].removesuffix("_DequantizeLinear_Output")
        channels = init_array(model, f"{weight}_quantized").shape[0]  # Conv, Gemm transB=1: output channels first
        w_scales = np.broadcast_to(dq_scale(model, weight), (channels,))
        assert bits(rows[f"{node.name}_param_0"]) == bits(np.float32(1) / w_scales)
        act = node.input[0].removesuffix("_DequantizeLinear_Output")
        assert bits(rows[node.name]) == bits(np.float32(1) / q_scale(model, act))


@pytest.mark.parametrize("name", ["affine-u8", "u16-w8asym-pc"])
def test_ncnn_table_refuses_asymmetric_models(models, tmp_path, name):
    with pytest.raises(ConfigError, match="not ncnn-compatible"):
        export(models[name], tmp_path / "model.table", "ncnn-table")


def _round_trip(models, tmp_path, name, version):
    model = onnx.load(str(models[name]))
    enc = encodings_from_model(model)
    path = atomic_write_json(tmp_path / "in.json", enc if version == "1.0.0" else legacy_encodings(enc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor ORT could not follow would warn
        out = import_encodings(models["float"], path, tmp_path / "imported.onnx")
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return model, enc, onnx.load(str(out))


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
@pytest.mark.parametrize("name", ["affine-u8", "sym-i8-pc", "i16-w4-pc", "u16-w8asym-pc", "u8-away", "fallback"])
def test_import_round_trip_is_bit_exact(models, tmp_path, name, version):
    model, enc, imported = _round_trip(models, tmp_path, name, version)
    again = encodings_from_model(imported)
    assert again == enc  # names, bw, is_sym, enc_type, offsets; then the scales' float32 bits:
    for kind in ("activation_encodings", "param_encodings"):
        assert [bits(e["scale"]) for e in again[kind]] == [bits(e["scale"]) for e in enc[kind]]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in imported.graph.initializer}
    if name == "fallback":
        # a fallback conv reads its float input through a Clip to the range its Q/DQ pair had; that range
        # is not in the encodings (the pair is gone), so the import reads the float tensor unclipped
        same = set(inits) & set(got)
        assert set(inits) - same == {"conv2_fallback_input_min", "conv2_fallback_input_max"} and got.keys() <= inits.keys()
        assert all(np.array_equal(inits[k], got[k]) for k in same)
    elif name != "u8-away":  # ORT rounds ties to even: with its own rounding the whole model comes back
        assert inits.keys() == got.keys() and all(np.array_equal(inits[k], got[k]) for k in inits)
        assert [n.op_type for n in model.graph.node] == [n.op_type for n in imported.graph.node]


def test_import_keeps_nodes_without_encodings_float(models, tmp_path):
    _, enc, imported = _round_trip(models, tmp_path, "fallback", "1.0.0")
    assert "conv2.w" not in {e["name"] for e in enc["param_encodings"]}
    conv2 = next(n for n in imported.graph.node if n.name == "conv2")
    assert conv2.input[1] == "conv2.w"  # the float weight itself, no DequantizeLinear


def test_import_warns_where_ort_decides_itself(models, tmp_path):
    enc = encodings_from_model(onnx.load(str(models["affine-u8"])))
    flat = next(e for e in enc["activation_encodings"] if e["name"] == "flat")
    flat["scale"] = [flat["scale"][0] * 2]  # Flatten's output always takes its input's parameters in ORT
    path = atomic_write_json(tmp_path / "in.json", enc)
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) .* differ .*flat \(ORT chose"):
        import_encodings(models["float"], path, tmp_path / "imported.onnx")


def test_import_rejects_bad_files(models, tmp_path):
    enc = encodings_from_model(onnx.load(str(models["affine-u8"])))
    enc["activation_encodings"].append(dict(enc["activation_encodings"][0], name="no_such_tensor"))
    with pytest.raises(ConfigError, match="no_such_tensor"):
        import_encodings(models["float"], atomic_write_json(tmp_path / "a.json", enc), tmp_path / "out.onnx")
    mixed = {"version": "1.0.0", "activation_encodings": {}, "param_encodings": {}}
    with pytest.raises(ConfigError, match="expected lists"):
        import_encodings(models["float"], atomic_write_json(tmp_path / "b.json", mixed), tmp_path / "out.onnx")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read encodings"):
        import_encodings(models["float"], tmp_path / "c.json", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
