"""Quantization modes other than static QDQ: dynamic (ORT's quantize_dynamic) and weight-only.

    static       QDQ on weights and activations, activation ranges from the calibration statistics
    dynamic      int8 weights, activations quantized at run time by ORT (MatMulInteger / ConvInteger);
                 for Transformer / LSTM-style models whose activation ranges vary per input
    weight_only  int8 / int4 weights behind DequantizeLinear, float activations: smaller files, float
                 accuracy of activations (ORT's own weight-only tool covers MatMul only, so the
                 rewrite is done here for Conv / Gemm / MatMul)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.quant_utils import quantize_data

from .qtypes import weight_quant_type

MODES = ("static", "dynamic", "weight_only")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def build_dynamic(prepared_path: Path, config: dict[str, Any], out_path: Path, exclude: list[str]) -> onnx.ModelProto:
    """ORT dynamic quantization (int8 weights; ORT's dynamic kernels take no other width)."""
    quiet = logging.getLogger()
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="autoquant-dyn-") as tmp:
        raw = Path(tmp, "dyn.onnx")
        quiet.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(prepared_path), str(raw), per_channel=config["weight_granularity"] == "per_channel",
                             weight_type=QuantType.QInt8,
                             # ORT rewrites Gemm to "<name>_MatMul" + Add before it applies the exclusions
                             nodes_to_exclude=[*exclude, *(f"{n}_MatMul" for n in exclude)],
                             extra_options={"WeightSymmetric": bool(config["weight_symmetric"])})
        finally:
            quiet.setLevel(level)
        model = onnx.load(str(raw))
    return model


def build_weight_only(model: onnx.ModelProto, config: dict[str, Any], exclude: list[str],
                      axes: dict[str, int], w4_nodes: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Replace each weight of a Conv / Gemm / MatMul by DequantizeLinear(int weight, scale, zero point).

    Integer weights come from ORT's own ``quantize_data`` (same scales, rounding and clipping as its
    static quantizer), named ``<w>_quantized`` / ``<w>_scale`` / ``<w>_zero_point`` like ORT's, so the
    rounding refinements and the encodings writer treat them the same way.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    def quantizable(w: str) -> bool:  # every reader is a weight input of a node we quantize
        return w in inits and all(n.op_type in WEIGHT_OPS and i == 1 and n.name not in exclude
                                  for n, i in consumers.get(w, []))

    per_channel = config["weight_granularity"] == "per_channel"
    dq_nodes = []
    for w in dict.fromkeys(n.input[1] for n in out.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1):
        if not quantizable(w):
            continue
        array = numpy_helper.to_array(inits[w]).astype(np.float32)
        bits = 4 if any(n.name in w4_nodes for n, _ in consumers[w]) else config["weight_bits"]
        qtype = weight_quant_type(bits, True).tensor_type
        axis = axes.get(w) if per_channel else None
        if axis is None:
            zp, scale, q = quantize_data(array.ravel(), qtype, bool(config["weight_symmetric"]))
            q, scale, zp = q.reshape(array.shape), np.asarray(scale, np.float32).reshape(()), np.asarray(zp).reshape(())
        else:
            parts = [quantize_data(np.take(array, i, axis).ravel(), qtype, bool(config["weight_symmetric"]))
                     for i in range(array.shape[axis])]
            zp = np.array([p[0] for p in parts]).reshape(-1)
            scale = np.array([p[1] for p in parts], dtype=np.float32).reshape(-1)
            q = np.stack([p[2].reshape(np.take(array, 0, axis).shape) for p in parts], axis=axis)
        out.graph.initializer.remove(inits[w])
        out.graph.initializer.extend([numpy_helper.from_array(q, f"{w}_quantized"),
                                      numpy_helper.from_array(scale, f"{w}_scale"),
                                      numpy_helper.from_array(zp, f"{w}_zero_point")])
        dq_nodes.append(helper.make_node("DequantizeLinear", [f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"],
                                         [f"{w}_DequantizeLinear_Output"], name=f"{w}_DequantizeLinear",
                                         **({"axis": axis} if axis is not None else {})))
        for node, i in consumers[w]:
            node.input[i] = f"{w}_DequantizeLinear_Output"
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(dq_nodes + nodes)  # initializer-fed DQ first keeps the graph topologically sorted
    return out


