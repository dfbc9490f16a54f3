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

