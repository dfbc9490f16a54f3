"""Empirical bias correction: shift each quantized layer's bias by the mean error quantization adds.

For a Conv / Gemm / MatMul with a quantized weight and a bias input, the per-output-channel mean of the
node's output is measured on calibration samples in the float model and in the QDQ model, and
``mean_float - mean_quant`` is added to the QDQ model's bias (an int32 initializer behind a
DequantizeLinear, as ONNX Runtime writes it: round(shift / bias_scale) is added; or a float bias).

Layers are corrected sequentially in graph order and re-measured after each correction, so a layer's
shift already includes the corrections of the layers feeding it (one QDQ inference pass per "wave";
layers of a wave have no corrected layer upstream, so independent branches share a pass).
Node outputs are read with graph optimizations off, i.e. on the DequantizeLinear -> float op path that
QDQ defines; an optimized session computes the same values up to requantization rounding.
MatMul has no bias input in ONNX, so MatMul nodes are skipped (a MatMul + Add pair is not handled).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..stats import augmented_session

LAYER_OPS = ("Conv", "Gemm", "MatMul")
INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


def tensor_values(model: onnx.ModelProto, names: list[str],
                  samples: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Every tensor in ``names`` (graph inputs included) on every sample, in sample order."""
    feeds = {i.name for i in model.graph.input}
    inner = [n for n in names if n not in feeds]
    sess = augmented_session(model, inner)
    outputs = [o.name for o in sess.get_outputs()]
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in samples:
        got = dict(zip(outputs, sess.run(outputs, feed))) if inner else {}
        for n in names:
            values[n].append(np.asarray(feed[n] if n in feeds else got[n]))
    return values


def channel_means(outputs: list[np.ndarray], op_type: str) -> np.ndarray:
    """Mean per output channel (axis 1 for Conv, the last axis for Gemm / MatMul) over all samples."""
    def moved(y: np.ndarray) -> np.ndarray:
        y = np.moveaxis(y, 1, -1) if op_type == "Conv" else y
        return y.reshape(-1, y.shape[-1]).astype(np.float64)

    flat = [moved(y) for y in outputs]
    return sum(f.sum(axis=0) for f in flat) / sum(f.shape[0] for f in flat)


def _quantized_weight(node: onnx.NodeProto, producers: dict, inits: dict) -> bool:
    dq = producers.get(node.input[1]) if len(node.input) > 1 else None
    return dq is not None and dq.input[0] in inits


def _bias_target(node: onnx.NodeProto, producers: dict, inits: dict):
    """('int', int32 tensor, scale array) | ('float', float tensor, None) | None for the node's bias."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    name = node.input[2]
    if name in inits and inits[name].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                   onnx.TensorProto.DOUBLE):
        return "float", inits[name], None
    dq = producers.get(name)
    if dq is None or dq.input[0] not in inits or inits[dq.input[0]].data_type != onnx.TensorProto.INT32:
        return None
    if dq.input[1] not in inits or (len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits):
        return None
    return "int", inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)


def _upstream_masks(model: onnx.ModelProto, layers: list[str]) -> dict[str, int]:
    """For each layer node name, a bit mask (bit i = ``layers[i]``) of the layer nodes upstream of it.

    One pass in graph order (ONNX graphs are topologically sorted), no recursion: deep graphs are fine.
    """
    bit = {name: 1 << i for i, name in enumerate(layers)}
    reach: dict[str, int] = {}  # tensor -> layers upstream of it, including its producer
    masks: dict[str, int] = {}
    for node in model.graph.node:
        up = 0
        for t in node.input:
            up |= reach.get(t, 0)
        if node.name in bit:
            masks[node.name] = up
        for t in node.output:
            reach[t] = up | bit.get(node.name, 0)
    return masks


def _apply_shift(target, shift: np.ndarray) -> np.ndarray | None:
    kind, tensor, scale = target
    old = numpy_helper.to_array(tensor)
    if old.size != shift.size:
        return None  # e.g. a Gemm C broadcast from a scalar: no per-channel value to shift
    if kind == "float":
        new = (old.astype(np.float64) + np.broadcast_to(shift, old.shape)).astype(old.dtype)
        tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
        return new.astype(np.float64) - old.astype(np.float64)
    steps = np.rint(shift / np.where(scale > 0, scale, 1.0))
    new = np.clip(old.astype(np.int64) + np.broadcast_to(steps, old.shape).astype(np.int64), INT32_MIN,
                  INT32_MAX)
    tensor.CopyFrom(numpy_helper.from_array(new.astype(np.int32), tensor.name))
    return (new - old.astype(np.int64)) * np.broadcast_to(scale, old.shape)


def correct_biases(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto,
                   samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Add ``mean_float - mean_quant`` (per output channel, on ``samples``) to the bias of every
    Conv / Gemm in ``qdq_model`` that has a quantized weight, a bias and a same-named node in
    ``float_model``; modifies ``qdq_model`` in place. Returns the shift actually applied per node
    (after rounding to the int32 bias grid)."""
    float_nodes = {n.name: n for n in float_model.graph.node if n.op_type in LAYER_OPS and n.name}
    inits = {t.name: t for t in qdq_model.graph.initializer}
    producers = {o: n for n in qdq_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    layers = {}
    for node in qdq_model.graph.node:
        same = node.name in float_nodes and node.op_type == float_nodes[node.name].op_type
        if same and _quantized_weight(node, producers, inits):
            target = _bias_target(node, producers, inits)
            if target is not None:
                layers[node.name] = (node, target)
    if not layers:
        return {}
    names = list(layers)
    float_out = {n: float_nodes[n].output[0] for n in names}
    float_vals = tensor_values(float_model, list(float_out.values()), samples)
    float_means = {n: channel_means(float_vals[float_out[n]], layers[n][0].op_type) for n in names}
    upstream = _upstream_masks(qdq_model, names)
    bit = {name: 1 << i for i, name in enumerate(names)}
    shifts: dict[str, np.ndarray] = {}
    pending = names
    while pending:  # one QDQ pass per wave
        outs = tensor_values(qdq_model, [layers[n][0].output[0] for n in pending], samples)
        wave = 0
        for name in pending:
            if upstream[name] & wave:
                continue  # a layer upstream was corrected in this wave: measure again first
            node, target = layers[name]
            diff = float_means[name] - channel_means(outs[node.output[0]], node.op_type)
            applied = _apply_shift(target, diff)
            if applied is not None:
                shifts[name] = applied
            wave |= bit[name]
        pending = [n for n in pending if not wave & bit[n]]
    return shifts
