"""AIMET-style encodings (layout version 1.0.0) read off a QDQ model.

Every entry comes from the model's own QuantizeLinear / DequantizeLinear nodes, so the scales in the
file are exactly the scales the delivered model uses.

Offset convention (AIMET / QNN): values live on an unsigned grid q_u in [0, 2^bw - 1] with
x = scale * (q_u + offset). For an ONNX unsigned type q_u = q and offset = -zero_point; for a signed
type q_u = q + 2^(bw-1), so offset = -(zero_point + 2^(bw-1)) (symmetric int8: offset = -128).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .qtypes import ONNX_INT_TYPES

VERSION = "1.0.0"


def _offsets(zp: np.ndarray, bits: int, signed: bool) -> list[int]:
    shift = 2 ** (bits - 1) if signed else 0
    return [int(-(int(z) + shift)) for z in zp.reshape(-1)]


def _entry(name: str, scale: np.ndarray, zp: np.ndarray, elem_type: int) -> dict[str, Any]:
    bits, signed = ONNX_INT_TYPES[elem_type]
    scale = scale.reshape(-1).astype(np.float32)
    zp = zp.reshape(-1).astype(np.int64)
    if zp.size == 1 and scale.size > 1:
        zp = np.repeat(zp, scale.size)
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if scale.size > 1 else "PER_TENSOR",
        "bw": bits,
        "is_sym": bool(signed and np.all(zp == 0)),
        "scale": [float(s) for s in scale],
        "offset": _offsets(zp, bits, signed),
    }


def encodings_from_model(model: onnx.ModelProto) -> dict[str, Any]:
    """Activation and parameter encodings of every quantized tensor in a QDQ model."""
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}

    def array(name: str) -> np.ndarray | None:
        t = inits.get(name) or consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def elem_type(name: str) -> int | None:
        t = inits.get(name) or consts.get(name)
        return None if t is None else t.data_type

    acts: dict[str, dict] = {}
    params: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        src, scale_name = node.input[0], node.input[1]
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        scale = array(scale_name)
        if zp_name is not None:
            zp, zp_type = array(zp_name), elem_type(zp_name)
        else:  # no zero point input: zero, with the type of the quantized input (e.g. int32 biases)
            zp, zp_type = np.zeros(1, np.int64), elem_type(src)
        if scale is None or zp is None or zp_type not in ONNX_INT_TYPES:
            continue
        if node.op_type == "DequantizeLinear" and src in inits:
            name = src[: -len("_quantized")] if src.endswith("_quantized") else src
            params.setdefault(name, _entry(name, scale, zp, zp_type))
        elif node.op_type == "QuantizeLinear" and src not in inits:
            acts.setdefault(src, _entry(src, scale, zp, zp_type))
    for name, t in inits.items():  # dynamic quantization (MatMulInteger / ConvInteger): ORT's naming
        base = name[: -len("_quantized")] if name.endswith("_quantized") else None
        if base and base not in params and f"{base}_scale" in inits and t.data_type in ONNX_INT_TYPES:
            zp_name = f"{base}_zero_point"
            zp = array(zp_name) if zp_name in inits else np.zeros(1, np.int64)
            params[base] = _entry(base, array(f"{base}_scale"), zp, t.data_type)
    return {
        "version": VERSION,
        "activation_encodings": sorted(acts.values(), key=lambda e: e["name"]),
        "param_encodings": sorted(params.values(), key=lambda e: e["name"]),
    }



_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT_ELEM = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.DOUBLE: 64}


def _float_bits(model: onnx.ModelProto) -> dict[str, int]:
    """Float tensor -> its bit width (32 for float32), graph inputs, node outputs and initializers."""
    g = onnx.shape_inference.infer_shapes(model).graph
    bits = {v.name: _FLOAT_ELEM[v.type.tensor_type.elem_type] for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in _FLOAT_ELEM}
    bits.update({t.name: _FLOAT_ELEM[t.data_type] for t in g.initializer if t.data_type in _FLOAT_ELEM})
    return bits


def complete_encodings(enc: dict[str, Any], float_model: onnx.ModelProto, producer: str) -> dict[str, Any]:
    """1.0.0 encodings of ``float_model`` as AIMET writes them: every quantized tensor (``enc``), every other float
    activation and Conv / Gemm / MatMul weight or bias as a FLOAT entry (a runtime given no entry quantizes the
    tensor itself: QNN would quantize autoquant's float-fallback layers), ``excluded_layers`` (the weighted layers
    left float), ``quantizer_args`` (the majority settings, for reading only) and ``producer``."""
    bits = _float_bits(float_model)
    inits = {t.name for t in float_model.graph.initializer}
    have = {e["name"] for k in ("activation_encodings", "param_encodings") for e in enc[k]}
    weighted = [n for n in float_model.graph.node if n.op_type in _WEIGHTED_OPS]
    params_used = {t for n in weighted for t in n.input[1:] if t in inits}
    acts = [t for t in [*(i.name for i in float_model.graph.input), *(o for n in float_model.graph.node for o in n.output)]
            if t in bits and t not in inits]

    def floating(name: str) -> dict[str, Any]:
        return {"name": name, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": bits[name]}

    out_acts = enc["activation_encodings"] + [floating(t) for t in dict.fromkeys(acts) if t not in have]
    out_params = enc["param_encodings"] + [floating(t) for t in sorted(params_used) if t not in have and t in bits]
    excluded = [n.name for n in weighted if len(n.input) > 1 and n.input[1] in inits and n.input[1] not in have]
    ints = [e for e in enc["param_encodings"] if e["dtype"] == "INT" and e["bw"] <= 16]
    acts_int = [e for e in enc["activation_encodings"] if e["dtype"] == "INT"]
    args = {
        "activation_bitwidth": _majority([e["bw"] for e in acts_int], 8), "dtype": "int",
        "is_symmetric": bool(_majority([e["is_sym"] for e in ints], True)),
        "param_bitwidth": _majority([e["bw"] for e in ints], 8),
        "per_channel_quantization": bool(_majority([e["enc_type"] == "PER_CHANNEL" for e in ints], False)),
        "quant_scheme": "post_training_tf",
    }
    return {"version": VERSION, "producer": {"name": "autoquant", "version": producer},
            "activation_encodings": sorted(out_acts, key=lambda e: e["name"]),
            "param_encodings": sorted(out_params, key=lambda e: e["name"]),
            "excluded_layers": excluded, "quantizer_args": args}


def _majority(values: list, default):
    return max(set(values), key=values.count) if values else default


def _dtype_name(bw: int, signed: bool) -> str:
    return f"{'int' if signed else 'uint'}{bw}"


def v2_encodings(enc: dict[str, Any], producer: str, axes: dict[str, int]) -> dict[str, Any]:
    """Layout 2.0.0 (AIMET >= 2.30: one list, each entry the inputs of an onnx::QuantizeLinear: output_dtype,
    y_scale, y_zero_point, axis) from 1.0.0 INT entries; FLOAT entries have no 2.0.0 form and are left out (a
    tensor without an entry stays as the model has it). ``axes``: weight -> its output-channel axis (1.0.0
    leaves it implicit, 2.0.0 writes it). A grid is written signed when 1.0.0 calls it symmetric (offset
    -2^(bw-1)), unsigned otherwise: the same values either way."""
    out = []
    for e in (*enc["activation_encodings"], *enc["param_encodings"]):
        if e["dtype"] != "INT":
            continue
        bw, sym, offsets = e["bw"], e["is_sym"], e["offset"]
        signed = bool(sym) or bw == 32  # 1.0.0 writes symmetric grids signed (offset -2^(bw-1)), int32 biases too
        shift = 2 ** (bw - 1) if signed else 0
        zps = [-(o + shift) for o in offsets]
        entry: dict[str, Any] = {"name": e["name"], "output_dtype": _dtype_name(bw, signed)}
        if e["enc_type"] == "PER_CHANNEL":
            entry.update(y_scale=list(e["scale"]), y_zero_point=zps, axis=axes.get(e["name"], 0))
        else:
            entry.update(y_scale=e["scale"][0], y_zero_point=zps[0])
        out.append(entry)
    return {"version": "2.0.0", "producer": {"name": "autoquant", "version": producer},
            "encodings": sorted(out, key=lambda x: x["name"])}
