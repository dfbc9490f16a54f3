"""The delivered QDQ model's quantization parameters in other tools' formats, and the way back.

``export(model, out, fmt)`` reads every scale / zero point off the model's Q/DQ nodes:

    aimet            AIMET encodings, layout 1.0.0 (:func:`autoquant.encodings.encodings_from_model`)
    aimet-0.6.1      AIMET encodings, legacy layout 0.6.1 (one dict per channel, min / max included)
    tensorrt-cache   TensorRT int8 calibration cache: per-tensor activation scales as float32 hex
    ncnn-table       ncnn int8 table (ncnn2int8 input): per-output-channel weight scales and the input
                     scale of each Conv / Gemm / MatMul, as ncnn defines them (1 / the ONNX scale)

``import_encodings(float_model, encodings, out)`` builds a QDQ model from AIMET encodings (either
layout) with ONNX Runtime's quantizer, every scale and zero point given explicitly.

Offsets follow :mod:`autoquant.encodings`: x = scale * (q_u + offset) on the unsigned grid
q_u in [0, 2^bw - 1], so min = scale * offset and max = scale * (offset + 2^bw - 1).
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.calibrate import (
    TensorData,
    TensorsData,
    save_tensors_data,
)
from onnxruntime.quantization.quant_utils import ONNX_TYPE_TO_NP_TYPE
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from ._io import atomic_write
from .build import OPSET_FOR_LOW_OR_WIDE_BITS, keep_fallback_float, weight_channel_axes
from .deploy import (
    deployment,
    float_model_path,
    refuse_dynamic,
    save_float_model,
)
from . import __version__
from .encodings import encodings_from_model, v2_encodings
from .errors import ConfigError, ModelError
from .formats import FORMATS
from .qtypes import ONNX_INT_TYPES, quant_type

#: the ONNX ops whose ncnn layers ncnn2int8 quantizes (Convolution / ConvolutionDepthWise, InnerProduct)
NCNN_INT8_OPS = ("Conv", "Gemm")

#: TensorRT 8.6.1's entropy-calibrator header by default. TensorRT checks the version digits and some releases
#: refuse a cache made for another one: export(tensorrt_version=...) / `--tensorrt-version` write another.
TRT_VERSION = "8601"
TRT_CACHE_HEADER = f"TRT-{TRT_VERSION}-EntropyCalibration2"

_OUT_SUFFIX = "_QuantizeLinear_Input"  # ORT's new name for the producer output of a quantized graph output
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_WIDE = (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT16, TensorProto.UINT16)  # Q/DQ need opset 21


def export(model_path: str | Path, out_path: str | Path, fmt: str, *, tensorrt_version: str = TRT_VERSION) -> Path:
    """Write the quantization parameters of the QDQ model at ``model_path`` to ``out_path`` as ``fmt``, and the
    float model they refer to beside it (:func:`autoquant.deploy.float_model_path`: the delivered model's graph
    with its exact dequantized weights, see autoquant.deploy). Tensor names are that float model's. A model the
    format cannot represent (dynamic quantization; nothing the format holds; weights a runtime would requantize
    to other integers) is refused with a ConfigError before anything is written. ``tensorrt_version``: the digits
    of the TensorRT release the cache is for (its header, e.g. 8601 for 8.6.1; some releases refuse another's)."""
    if not (isinstance(tensorrt_version, str) and tensorrt_version.isdigit()):
        raise ConfigError(f"tensorrt_version must be the release's digits (e.g. '8601' for 8.6.1), got "
                          f"{tensorrt_version!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    qdq = _load(model_path)
    out, float_path = Path(out_path), float_model_path(out_path)
    if float_path.resolve() == Path(model_path).resolve():
        raise ConfigError(f"export to {out} would write its float model over {model_path}; name another file")
    fg, enc = deployment(qdq)
    if fmt.startswith("aimet"):
        if not any(e["dtype"] == "INT" for k in ("activation_encodings", "param_encodings") for e in enc[k]):
            raise ConfigError(f"{model_path} quantizes no tensor: an encodings file would be empty")
        layout = {"aimet": lambda: enc, "aimet-0.6.1": lambda: legacy_encodings(enc),
                  "aimet-2.0.0": lambda: v2_encodings(enc, __version__, weight_channel_axes(fg.model))}[fmt]
        text = json.dumps(layout(), indent=2)
    else:
        text = tensorrt_cache(qdq, enc, tensorrt_version) if fmt == "tensorrt-cache" else ncnn_table(qdq)
    save_float_model(fg, float_path)
    return atomic_write(out, lambda tmp: Path(tmp).write_text(text))


def _load(path: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as e:  # missing file, not a protobuf
        raise ModelError(f"cannot load ONNX model {path}: {e}") from e


def _listing(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def _float_name(name: str, outputs: set[str]) -> str:
    """The float model's name of a tensor (ORT renames the producer output of a quantized graph output)."""
    base = name[: -len(_OUT_SUFFIX)] if name.endswith(_OUT_SUFFIX) else None
    return base if base in outputs else name


# ---------------------------------------------------------------- AIMET 0.6.1

def legacy_encodings(enc: dict[str, Any]) -> dict[str, Any]:
    """1.0.0 encodings -> the 0.6.1 layout ``{tensor: [one dict per channel]}``.

    Checked against quic/aimet: aimet_onnx ``QcQuantizeOp._export_legacy_encodings`` (keys bitwidth,
    dtype "int", is_symmetric as the string "True" / "False", min, max, offset, scale), aimet_torch v2
    ``AffineEncoding._to_legacy_format`` (offset shifted by qmin; min = (offset + qmin) * scale,
    max = (offset + qmax) * scale, i.e. min = scale * offset, max = scale * (offset + 2^bw - 1) with the
    shifted offset) and aimet_common ``recompute_grid_params`` (symmetric: offset -2^(bw-1)). The offsets
    are the 1.0.0 ones; ``quantizer_args`` is 1.0.0's with its booleans as strings; FLOAT entries become
    ``{"bitwidth", "dtype": "float"}``.
    """
    def entry(e: dict[str, Any]) -> list[dict[str, Any]]:
        bw = e["bw"]
        if e["dtype"] != "INT":  # a tensor that stays float
            return [{"bitwidth": bw, "dtype": "float"}]
        return [{"bitwidth": bw, "dtype": "int", "is_symmetric": str(bool(e["is_sym"])),
                 "min": s * o, "max": s * (o + 2**bw - 1), "offset": o, "scale": s}
                for s, o in zip(e["scale"], e["offset"])]

    out = {"version": "0.6.1",
           "activation_encodings": {e["name"]: entry(e) for e in enc["activation_encodings"]},
           "param_encodings": {e["name"]: entry(e) for e in enc["param_encodings"]}}
    if "quantizer_args" in enc:  # 0.6.1 writes its booleans as strings
        out["quantizer_args"] = {k: str(v) if isinstance(v, bool) else v for k, v in enc["quantizer_args"].items()}
    return out


# ---------------------------------------------------------------- TensorRT

def _trt_requantizes_differently(model: onnx.ModelProto) -> list[str]:
    """Weights whose integers TensorRT's implicit int8 would not reproduce: it derives each Conv / Gemm /
    MatMul weight's scale per output channel as max |w| / 127 from the float model, so a channel whose
    largest integer is not +-127 (per-tensor scales, a clipped range, a rounding that moved the maximum) gets
    another scale and other integers."""
    dq = _dequantized(model)
    inits = {t.name: t for t in model.graph.initializer}
    bad = []
    for node in model.graph.node:
        w = dq.get(node.input[1]) if node.op_type in _WEIGHT_OPS and len(node.input) > 1 else None
        if w is None or w.source not in inits:
            continue
        q = numpy_helper.to_array(inits[w.source]).astype(np.int64)
        axis = _output_axis(node)
        peak = np.abs(np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)).max(axis=1)
        if w.elem_type != TensorProto.INT8 or w.zero_point.any() or np.any(peak[peak > 0] != 127):
            bad.append(node.name or node.output[0])
    return bad


def tensorrt_cache(model: onnx.ModelProto, enc: dict | None = None, version: str = TRT_VERSION) -> str:
    """TensorRT calibration cache: the header line, then ``<tensor>: <scale as big-endian float32 hex>``.

    Checked against onnxruntime's TensorRT EP reader ``ReadDynamicRange`` ("tensor name : scale in
    32-bit single precision IEEE754 format", dynamic range = scale * 127, header starting "TRT-") and
    NVIDIA TAO's cache writer (amax / 127 packed as float32, written as hex). The cache is for an
    implicit-quantization TensorRT build of the float model, so tensors carry the float model's names,
    and TensorRT picks weight scales itself. Only symmetric int8 activations are representable: other
    encodings are refused rather than re-ranged to max(|min|, |max|) / 127, which would change them.
    """
    enc = deployment(model)[1] if enc is None else enc  # the float model's names (export passes its own)
    acts = [e for e in enc["activation_encodings"] if e["dtype"] == "INT"]
    if not acts:
        raise ConfigError("model quantizes no activation (weight-only): a TensorRT calibration cache would be "
                          "empty; deploy the QDQ model, or search static mode")
    bad = [f"{e['name']} ({'' if e['is_sym'] else 'affine '}{e['bw']}-bit)" for e in acts
           if e["bw"] != 8 or not e["is_sym"]]
    if bad:
        raise ConfigError(
            f"model is not TensorRT-compatible: a TensorRT calibration cache holds symmetric int8 activation "
            f"scales only, and {len(bad)} activation(s) are not: {_listing(bad)}. Quantize with symmetric int8 "
            f"activations (activation_bits: 8, activation_symmetric: true; e.g. the tensorrt target)")
    if requant := _trt_requantizes_differently(model):
        raise ConfigError(
            f"TensorRT's implicit int8 would requantize the weights of {len(requant)} layer(s) to other integers "
            f"({_listing(requant)}): it takes max |w| / 127 per output channel, and these weights are not "
            f"symmetric per-channel int8 with +-127 in every channel. Deploy the QDQ model (explicit "
            f"quantization), or search weight_granularity: per_channel, weight_symmetric: true, weight_bits: 8")
    lines = [f"TRT-{version}-EntropyCalibration2"]
    lines += [f"{e['name']}: {struct.pack('>f', e['scale'][0]).hex()}" for e in acts]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- ncnn

@dataclass
class _QParams:
    scale: np.ndarray  # float32, 1-D
    zero_point: np.ndarray  # int64, 1-D
    elem_type: int
    source: str  # the DequantizeLinear's quantized input
    axis: int | None


def _dequantized(model: onnx.ModelProto) -> dict[str, _QParams]:
    """DequantizeLinear output -> its quantization parameters."""
    arrays = {t.name: t for t in model.graph.initializer}
    arrays.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute})
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[1] in arrays and n.input[2] in arrays:
            zp = arrays[n.input[2]]
            out[n.output[0]] = _QParams(
                numpy_helper.to_array(arrays[n.input[1]]).reshape(-1).astype(np.float32),
                numpy_helper.to_array(zp).reshape(-1).astype(np.int64), zp.data_type, n.input[0],
                next((a.i for a in n.attribute if a.name == "axis"), None))
    return out


def _output_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return 0 if node.op_type == "Conv" else 1


def _fmt(x: np.float32) -> str:
    return np.format_float_positional(x, unique=True, trim="0")  # shortest text that reads back to x


def ncnn_table(model: onnx.ModelProto) -> str:
    """ncnn int8 table: ``<layer>_param_0 s_0 s_1 ...`` (one weight scale per output channel) for every
    Conv / Gemm whose weight and input are both quantized (ncnn2table writes Convolution, ConvolutionDepthWise
    and InnerProduct lines only: a MatMul runs in float in ncnn), then ``<layer> s`` (its input scale).
    Layer names are the ONNX node names (an unnamed node: its first output's name).

    Checked against Tencent/ncnn tools/quantize: ncnn2table ``save_table`` writes these two kinds of
    line, weight lines first, with scales 127 / absmax (ncnn multiplies a float by the scale to get its
    int8 value, so ncnn scale = 1 / ONNX scale); ncnn2int8 ``read_int8scale_table`` splits each line on
    spaces, reads a key containing "_param_" as that layer's weight scales and any other key as the
    input (bottom blob) scales of the layer so named. ncnn int8 is symmetric: weights must be signed
    with zero point 0 (int8, or int4 whose integers lie on the int8 grid), inputs int8 with zero point 0.
    """
    refuse_dynamic(model, "no ncnn table")
    dq = _dequantized(model)
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    inits = {t.name: t for t in model.graph.initializer}
    weights, inputs, bad = [], [], []
    for node in model.graph.node:
        if node.op_type not in NCNN_INT8_OPS or len(node.input) < 2:
            continue
        w, a = dq.get(node.input[1]), dq.get(node.input[0])
        if w is None or a is None or w.source not in inits or a.source not in q_outputs:
            continue  # stays float in ncnn
        name = node.name or node.output[0]
        bits, signed = ONNX_INT_TYPES.get(w.elem_type, (0, False))
        if not signed or bits > 8 or w.zero_point.any():
            bad.append(f"{name} weight")
        if a.elem_type != TensorProto.INT8 or a.zero_point.any():
            bad.append(f"{name} input")
        axis = _output_axis(node)
        channels = inits[w.source].dims[axis]
        if w.scale.size not in (1, channels) or (w.scale.size > 1 and w.axis not in (None, axis)):
            raise ConfigError(f"layer {name}: weight scales are not per output channel (axis {w.axis}); "
                              f"ncnn needs one scale per output channel")
        scales = np.float32(1) / np.broadcast_to(w.scale, (channels,))
        weights.append(f"{name}_param_0 " + " ".join(_fmt(s) for s in scales))
        inputs.append(f"{name} {_fmt(np.float32(1) / a.scale[0])}")
    if not weights:
        raise ConfigError("no Conv / Gemm has both a quantized weight and a quantized input (a weight-only or "
                          "float model): an ncnn table would be empty; search static mode for ncnn")
    if bad:
        raise ConfigError(
            f"model is not ncnn-compatible: ncnn int8 needs symmetric int8 inputs and symmetric signed weights "
            f"of at most 8 bits, and these are not: {_listing(bad, 6)}. Quantize with activation_bits: 8, "
            f"activation_symmetric: true, weight_symmetric: true, weight_bits 8 or 4")
    return "\n".join(weights + inputs) + "\n"


# ---------------------------------------------------------------- import: reading AIMET files

@dataclass(frozen=True)
class _Enc:
    bw: int
    sym: bool
    scale: tuple[float, ...]
    offset: tuple[int, ...]
    per_channel: bool


def _true(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() == "true"


def _checked(name: str, enc: _Enc) -> _Enc:
    if not enc.scale or len(enc.scale) != len(enc.offset) or (len(enc.scale) > 1 and not enc.per_channel):
        raise ValueError(f"{name}: {len(enc.scale)} scale(s) and {len(enc.offset)} offset(s)"
                         f"{'' if enc.per_channel else ' in a per-tensor encoding'}")
    if not all(np.isfinite(enc.scale)) or min(enc.scale) <= 0:
        raise ValueError(f"{name}: scales must be finite and positive")
    return enc


def _parse_v1(entries: list[dict]) -> dict[str, _Enc]:
    out = {}
    for e in entries:
        if str(e.get("dtype", "INT")).upper() != "INT":
            continue  # a float encoding: the tensor stays float
        if e.get("enc_type", "PER_TENSOR") not in ("PER_TENSOR", "PER_CHANNEL"):
            raise ValueError(f"{e['name']}: enc_type {e['enc_type']} is not supported (per-tensor / per-channel only)")
        out[e["name"]] = _checked(e["name"], _Enc(int(e["bw"]), _true(e["is_sym"]), tuple(map(float, e["scale"])),
                                                  tuple(map(int, e["offset"])), e.get("enc_type") == "PER_CHANNEL"))
    return out


def _parse_legacy(entries: dict[str, list[dict]]) -> dict[str, _Enc]:
    out = {}
    for name, chans in entries.items():
        if not chans or str(chans[0].get("dtype", "int")).lower() != "int":
            continue
        bws, syms = {int(c["bitwidth"]) for c in chans}, {_true(c["is_symmetric"]) for c in chans}
        if len(bws) != 1 or len(syms) != 1:
            raise ValueError(f"{name}: channels differ in bitwidth or symmetry")
        out[name] = _checked(name, _Enc(bws.pop(), syms.pop(), tuple(float(c["scale"]) for c in chans),
                                        tuple(int(c["offset"]) for c in chans), len(chans) > 1))
    return out


def _parse_v2(entries: list[dict], inits: set[str]) -> tuple[dict[str, _Enc], dict[str, _Enc]]:
    """2.0.0 entries (onnx::QuantizeLinear fields) -> (activations, parameters): initializers are parameters."""
    acts, params = {}, {}
    for e in entries:
        dtype = str(e["output_dtype"])
        signed = dtype.startswith("int")
        if not dtype.lstrip("u").startswith("int"):
            continue  # a float format (float8 ...): not an integer grid autoquant builds
        bw = int(dtype.lstrip("u").removeprefix("int"))
        scale = np.atleast_1d(np.asarray(e["y_scale"], np.float64)).ravel()
        zp = np.broadcast_to(np.atleast_1d(np.asarray(e.get("y_zero_point", 0))).ravel(), scale.shape)
        if "block_size" in e or isinstance(e["y_scale"], dict):
            raise ValueError(f"{e['name']}: per-block / double-quantized encodings are not supported")
        shift = 2 ** (bw - 1) if signed else 0
        enc = _checked(e["name"], _Enc(bw, bool(signed and not zp.any()), tuple(float(s) for s in scale),
                                       tuple(int(-(int(z) + shift)) for z in zp), isinstance(e["y_scale"], list)))
        (params if e["name"] in inits else acts)[e["name"]] = enc
    return acts, params


def _read_encodings(path: str | Path, inits: set[str] = frozenset()) -> tuple[dict[str, _Enc], dict[str, _Enc]]:
    """Activation and parameter encodings of an AIMET file: layout 2.0.0 (one list under "encodings"; the
    model's initializers are its parameters), 1.0.0 (lists of named entries) or 0.6.x (dicts of per-channel
    lists), told apart by the layout and checked against "version"."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read encodings {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not an AIMET encodings file (expected a JSON object)")
    version = str(data.get("version", ""))
    if isinstance(data.get("encodings"), list):
        if version and version[0] != "2":
            raise ConfigError(f"{path}: version {version} with a 2.0.0 'encodings' list")
        try:
            return _parse_v2(data["encodings"], set(inits))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: malformed encoding entry ({type(e).__name__}: {e})") from e
    acts = data.get("activation_encodings", {})
    params = data.get("param_encodings", [] if isinstance(acts, list) else {})
    layout = "1" if isinstance(acts, list) and isinstance(params, list) else \
        "0" if isinstance(acts, dict) and isinstance(params, dict) else None
    if layout is None or (version and version[0] != layout):
        raise ConfigError(f"{path}: version {version or '(none)'} with activation / param encodings as "
                          f"{type(acts).__name__} / {type(params).__name__}; expected lists (1.0.0) or dicts (0.6.1)")
    parse = _parse_v1 if layout == "1" else _parse_legacy
    try:
        return parse(acts), parse(params)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed encoding entry ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- import: ORT's quantizer

def _override(name: str, enc: _Enc, signed: bool, axis: int | None = None) -> list[dict[str, Any]]:
    """ORT TensorQuantOverrides entry with explicit quant_type, scale and zero point (one dict per channel)."""
    shift = 2 ** (enc.bw - 1) if signed else 0
    zps = [-o - shift for o in enc.offset]
    lo, hi = (-shift, shift - 1) if signed else (0, 2**enc.bw - 1)
    if any(z < lo or z > hi for z in zps):
        raise ConfigError(f"encoding of {name}: offsets {list(enc.offset[:4])} put the zero point outside the "
                          f"{'signed' if signed else 'unsigned'} {enc.bw}-bit grid")
    try:
        qt = quant_type(enc.bw, signed)
    except ValueError as e:
        raise ConfigError(f"encoding of {name}: {e}") from e
    base: dict[str, Any] = {"quant_type": qt} if axis is None else {"quant_type": qt, "axis": axis}
    return [dict(base, scale=np.array(s, np.float32), zero_point=np.array(z, ONNX_TYPE_TO_NP_TYPE[qt.tensor_type]))
            for s, z in zip(enc.scale, zps)]


def _signed_grid(enc: _Enc) -> bool:
    """Symmetric on the signed grid (offset -2^(bw-1), zero point 0)."""
    return enc.sym and all(o == -(2 ** (enc.bw - 1)) for o in enc.offset)


def _overrides(model: onnx.ModelProto, acts: dict[str, _Enc], params: dict[str, _Enc]) -> dict[str, list[dict]]:
    """Overrides of every encoded tensor. Weights of Conv / Gemm / MatMul are signed (per-channel along
    ORT's output-channel axis); activations and other initializers are signed when symmetric on the
    signed grid, unsigned otherwise (as autoquant.qtypes chooses)."""
    inits = {t.name: t for t in model.graph.initializer}
    weights = weight_channel_axes(model)
    out = {}
    for name, enc in params.items():
        axis = weights.get(name) if enc.per_channel else None
        if enc.per_channel and (axis is None or inits[name].dims[axis] != len(enc.scale)):
            raise ConfigError(f"per-channel encoding of {name} has {len(enc.scale)} channels; its output-channel "
                              f"axis {axis} has {None if axis is None else inits[name].dims[axis]}")
        out[name] = _override(name, enc, name in weights or _signed_grid(enc), axis)
    for name, enc in acts.items():
        if enc.per_channel:
            raise ConfigError(f"activation {name}: per-channel activation encodings are not supported")
        out[name] = _override(name, enc, _signed_grid(enc))
    return out


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Float (non-initializer) tensors as ORT's quantizer types them (after ONNX shape inference)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    return {v.name for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in _FLOAT_TYPES}


def _nodes_to_quantize(model: onnx.ModelProto, acts: set[str], params: set[str], remove_activations: bool,
                       excluded: set[str]) -> set[str]:
    """Nodes ORT can quantize without inventing parameters: every float activation in or out and the
    weight of a Conv / Gemm / MatMul have encodings. A Relu / Clip after a quantized node may stand in
    for its input, which ORT removes when activations are affine. Iterated, since excluding a node can
    disqualify its neighbours. (Other initializers are checked on the built model.)"""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    floats, outputs = _float_tensors(model), {o.name for o in g.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
        producer.update({t: n for t in n.output})
    ops = set(QDQRegistry) | set(QLinearOpsRegistry)  # quantize_static's default op types
    chosen = {n.name for n in g.node if n.op_type in ops and n.name not in excluded}

    def replaced(t: str) -> bool:  # t only feeds a chosen Relu / Clip that ORT removes
        c = consumers.get(t, [])
        return (remove_activations and len(c) == 1 and c[0].op_type in ("Relu", "Clip") and c[0].name in chosen
                and c[0].output[0] in acts and t not in outputs and t in producer and producer[t].name in chosen)

    def ok(n: onnx.NodeProto) -> bool:
        for k, t in enumerate(n.input):
            if t in inits:
                if (n.op_type in _WEIGHT_OPS and (k == 1 or n.op_type == "MatMul")
                        and inits[t].data_type in _FLOAT_TYPES and t not in params):
                    return False
            elif t in floats and t not in acts and not (k == 0 and replaced(t)):
                return False
        return all(t not in floats or t in acts or replaced(t) for t in n.output)

    while True:
        keep = {n.name for n in g.node if n.name in chosen and ok(n)}
        if keep == chosen:
            return chosen
        chosen = keep


def _most_common(types: list, default):
    return Counter(types).most_common(1)[0][0] if types else default


def _quantize(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], overrides: dict[str, list[dict]],
              exclude: list[str], symmetric_activations: bool) -> onnx.ModelProto:
    """``quantize_static`` with the given calibration ranges, overrides and excluded nodes."""
    tensors = TensorsData(CalibrationMethod.MinMax, {k: TensorData(lowest=np.array(lo, np.float32),
                                                                   highest=np.array(hi, np.float32))
                                                     for k, (lo, hi) in ranges.items()})
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(prefix="autoquant-import-") as tmp:
        src, cache, raw = Path(tmp, "float.onnx"), Path(tmp, "ranges.json"), Path(tmp, "qdq.onnx")
        onnx.save(model, str(src))
        save_tensors_data(tensors, cache)
        root.setLevel(logging.ERROR)  # ORT logs a pre-processing hint on every call
        try:
            quantize_static(
                str(src), str(raw), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                activation_type=_most_common([overrides[k][0]["quant_type"] for k in ranges if k in overrides],
                                             QuantType.QUInt8),
                weight_type=_most_common([o[0]["quant_type"] for k, o in overrides.items() if k not in ranges],
                                         QuantType.QInt8),
                nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": symmetric_activations, "TensorQuantOverrides": overrides,
                               "QDQDisableWeightAdjustForInt32Bias": True, "ForceQuantizeNoInputCheck": False},
            )
        finally:
            root.setLevel(level)
        return onnx.load(str(raw))


def _unrequested(built: onnx.ModelProto, acts: set[str], params: set[str]) -> set[str]:
    """Tensors ``built`` quantizes without an encoding (int32 biases aside), by their float-model names."""
    outputs = {o.name for o in built.graph.output}
    got = encodings_from_model(built)
    return ({_float_name(e["name"], outputs) for e in got["activation_encodings"]} - acts) | \
        ({e["name"] for e in got["param_encodings"] if e["bw"] <= 16} - params)


def _key(e: dict[str, Any] | _Enc) -> tuple:
    if isinstance(e, _Enc):
        return e.bw, tuple(struct.pack("<f", s) for s in e.scale), e.offset
    return e["bw"], tuple(struct.pack("<f", s) for s in e["scale"]), tuple(e["offset"])


def _warn_differences(path: str | Path, acts: dict[str, _Enc], params: dict[str, _Enc],
                      built: onnx.ModelProto) -> None:
    """Warn about every encoded tensor whose bit width, scale bits or offsets ``built`` does not have."""
    outputs = {o.name for o in built.graph.output}
    got = encodings_from_model(built)
    differ = []
    for want, have in ((acts, got["activation_encodings"]), (params, got["param_encodings"])):
        by_name = {_float_name(e["name"], outputs): e for e in have}
        for name, enc in want.items():
            e = by_name.get(_float_name(name, outputs))
            if e is None:
                differ.append(f"{name} (left float)")
            elif _key(e) != _key(enc):
                differ.append(f"{name} (ORT chose {e['bw']}-bit, scale {e['scale'][:2]}, offset {e['offset'][:2]})")
    if differ:
        warnings.warn(f"{len(differ)} tensor(s) of the built model differ from {path}: {_listing(differ)}",
                      stacklevel=3)


def _weight_only(model: onnx.ModelProto, params: dict[str, _Enc]) -> onnx.ModelProto:
    """Each encoded initializer as integers (round half to even on the encoding's grid) behind a
    DequantizeLinear, as ORT's weight-only QDQ writes it; everything else untouched. ORT's quantize_static
    has no weights-only mode without activation ranges, hence written here."""
    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    g = model_out.graph
    weights = weight_channel_axes(model_out)
    opset = next((i.version for i in model_out.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset < OPSET_FOR_LOW_OR_WIDE_BITS and any(e.bw != 8 for e in params.values()):
        model_out = onnx.version_converter.convert_version(model_out, OPSET_FOR_LOW_OR_WIDE_BITS)
        g = model_out.graph
    inits = {t.name: t for t in g.initializer}
    dq_nodes = []
    for name, enc in params.items():
        signed = name in weights or _signed_grid(enc)
        axis = weights.get(name) if enc.per_channel else None
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        o = _override(name, enc, signed, axis)
        qt = o[0]["quant_type"]
        scale = np.array([e["scale"] for e in o], np.float32)
        zp = np.array([e["zero_point"] for e in o]).astype(ONNX_TYPE_TO_NP_TYPE[qt.tensor_type])
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = scale.size
        bits = enc.bw
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape), lo, hi)
        q_t = onnx.helper.make_tensor(f"{name}_quantized", qt.tensor_type, w.shape, q.astype(np.int64).ravel().tolist())
        s_t = numpy_helper.from_array(scale if axis is not None else scale.reshape(()), f"{name}_scale")
        z_t = onnx.helper.make_tensor(f"{name}_zero_point", qt.tensor_type, [scale.size] if axis is not None else [],
                                      zp.astype(np.int64).ravel().tolist())
        g.initializer.remove(inits[name])
        g.initializer.extend([q_t, s_t, z_t])
        attrs = {"axis": axis} if axis is not None else {}
        dq_nodes.append(onnx.helper.make_node("DequantizeLinear", [q_t.name, s_t.name, z_t.name], [name],
                                              name=f"{name}_DequantizeLinear", **attrs))
    nodes = dq_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model_out


def import_encodings(float_model_path: str | Path, encodings_path: str | Path, out_path: str | Path) -> Path:
    """Build a QDQ model of ``float_model_path`` with the scales and offsets of an AIMET encodings file
    (layout 2.0.0, 1.0.0 or 0.6.1; FLOAT entries stay float); write it to ``out_path`` atomically.

    ``float_model_path`` must be the graph the encodings describe: for an autoquant result, the float model
    delivered or exported beside them (``quantized.float.onnx``, see autoquant.deploy). A file with parameter
    encodings only (weight-only) gives weights behind DequantizeLinear and float activations.
    Activation encodings reach ``quantize_static`` as calibration ranges plus TensorQuantOverrides with
    explicit scale, zero point and quant_type; parameter encodings as overrides, with the channel axis
    when per-channel. Nodes lacking an encoding for a float input or output are excluded (stay float).

    ORT decides some things itself; a warning names every tensor where the result differs from the
    file: int32 bias scales (always input scale * weight scale), outputs of data-movement ops (Flatten,
    Reshape, MaxPool, ...: the input's parameters), tensors no quantized node touches. Integer weights
    are ORT's round-half-to-even of the float weights (no AdaRound / ties-away values: those are not in
    encodings).
    """
    model = _load(float_model_path)
    acts_in, params_in = _read_encodings(encodings_path, {t.name for t in model.graph.initializer})
    g = model.graph
    outputs, inits = {o.name for o in g.output}, {t.name for t in g.initializer}
    tensors = {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.input} | outputs
    acts = {_float_name(k, outputs): v for k, v in acts_in.items()}
    unknown = [k for k in acts if k not in tensors or k in inits] + [k for k in params_in if k not in inits]
    if unknown:
        raise ConfigError(f"{len(unknown)} encoding name(s) are not tensors of {float_model_path}: "
                          f"{_listing(unknown)} (is it the float model the encodings were made for?)")
    params = {k: v for k, v in params_in.items() if v.bw <= 16}  # int32 biases: ORT derives them
    if not acts and params:  # weight-only: only weights are quantized, activations stay float
        built = _weight_only(model, params)
        atomic_write(out_path, lambda p: onnx.save(built, p))
        return Path(out_path)
    overrides = _overrides(model, acts, params)
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset < OPSET_FOR_LOW_OR_WIDE_BITS and any(o[0]["quant_type"].tensor_type in _WIDE for o in overrides.values()):
        model = onnx.version_converter.convert_version(model, OPSET_FOR_LOW_OR_WIDE_BITS)
    for i, n in enumerate(model.graph.node):  # ORT excludes nodes by name
        n.name = n.name or f"{n.op_type}_{i}_autoquant"
    symmetric = all(_signed_grid(e) for e in acts.values())

    excluded: set[str] = set()
    while True:
        chosen = _nodes_to_quantize(model, set(acts), set(params), not symmetric, excluded)
        ranges = {k: (e.scale[0] * e.offset[0], e.scale[0] * (e.offset[0] + 2**e.bw - 1)) for k, e in acts.items()}
        for n in model.graph.node:  # a Relu / Clip ORT removes: its input needs a range (never used)
            if n.name in chosen and n.op_type in ("Relu", "Clip") and n.output[0] in ranges:
                ranges.setdefault(n.input[0], ranges[n.output[0]])
        exclude = [n.name for n in model.graph.node if n.name not in chosen]
        built = _quantize(model, ranges, overrides, exclude, symmetric)
        # ORT quantizes some initializers unasked (e.g. an Add's constant): keep their consumers float
        extra = _unrequested(built, set(acts), set(params_in))
        more = {n.name for n in model.graph.node if extra.intersection(n.input)} - excluded
        if not more:
            break
        excluded |= more
    keep_fallback_float(built, exclude)  # as in autoquant's own builds: excluded Conv / Gemm really float
    atomic_write(out_path, lambda p: onnx.save(built, p))
    _warn_differences(encodings_path, acts_in, params_in, built)
    return Path(out_path)
