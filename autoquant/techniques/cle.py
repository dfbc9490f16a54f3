"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization").

For two layers joined by a positively homogeneous activation f (f(s x) = s f(x) for s > 0), scaling
output channel i of the first layer by 1/s_i and input channel i of the second by s_i leaves the
model's function unchanged. With r1_i = max|W1[i, ...]| and r2_i = max|W2[:, i, ...]|, choosing
s_i = sqrt(r1_i * r2_i) / r2_i makes both ranges sqrt(r1_i * r2_i): per-channel ranges become equal,
which is what per-tensor weight quantization needs. Chains sharing a layer (Conv -> DWConv -> Conv)
are equalized pair by pair, repeatedly, until the scales stop changing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .bn_fold import _attr, _Weights, tensor_uses


@dataclass
class _Layer:
    node: onnx.NodeProto
    weight: str
    out_axis: int  # output-channel axis of the weight
    in_axis: int  # input-channel axis of the weight
    family: str  # "conv" (channels on axis 1 of the activation) or "fc" (channels on the last axis)
    groups: int = 1
    bias: str | None = None  # initializer added per output channel (Conv B, Gemm C, or a following Add)


@dataclass
class _Pair:
    first: _Layer
    second: _Layer

    @property
    def names(self) -> tuple[str, str]:
        return _node_name(self.first.node), _node_name(self.second.node)


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _as_layer(node: onnx.NodeProto, w: _Weights) -> _Layer | None:
    """A Conv / Gemm / MatMul with a float initializer weight, else None."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or not w.is_float(node.input[1]):
        return None
    ndim = w.get(node.input[1]).ndim
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv" and ndim >= 3:
        return _Layer(node, node.input[1], 0, 1, "conv", int(_attr(node, "group", 1)), bias)
    if node.op_type == "Gemm" and ndim == 2:
        trans_b = bool(_attr(node, "transB", 0))
        return _Layer(node, node.input[1], 0 if trans_b else 1, 1 if trans_b else 0, "fc", 1, bias)
    if node.op_type == "MatMul" and ndim == 2:
        return _Layer(node, node.input[1], 1, 0, "fc")
    return None


def _out_channels(layer: _Layer, w: _Weights) -> int:
    return w.get(layer.weight).shape[layer.out_axis]


def _in_channels(layer: _Layer, w: _Weights) -> int:
    return w.get(layer.weight).shape[layer.in_axis] * layer.groups


def _out_ranges(layer: _Layer, w: _Weights) -> np.ndarray:
    a = np.moveaxis(np.abs(w.get(layer.weight)), layer.out_axis, 0)
    return a.reshape(a.shape[0], -1).max(axis=1)


def _in_ranges(layer: _Layer, w: _Weights) -> np.ndarray:
    a = np.abs(w.get(layer.weight))
    if layer.family == "conv":  # (out, in/groups, k...): input channel g*cg + l is column l of group g's rows
        g, cg = layer.groups, a.shape[1]
        return a.reshape(g, a.shape[0] // g, cg, -1).max(axis=(1, 3)).reshape(g * cg)
    a = np.moveaxis(a, layer.in_axis, 0)
    return a.reshape(a.shape[0], -1).max(axis=1)


def _scale_out(layer: _Layer, s: np.ndarray, w: _Weights) -> None:
    """Divide output channel i of ``layer`` (weight and bias) by s_i."""
    weight = w.get(layer.weight)
    shape = [1] * weight.ndim
    shape[layer.out_axis] = s.size
    w.set(layer.weight, weight / s.reshape(shape))
    if layer.bias is not None:
        b = w.get(layer.bias)
        w.set(layer.bias, b / s)  # 1-D conv bias, or an fc bias broadcast over the last axis


def _scale_in(layer: _Layer, s: np.ndarray, w: _Weights) -> None:
    """Multiply input channel i of ``layer``'s weight by s_i."""
    weight = w.get(layer.weight)
    if layer.family == "conv":
        g, cg = layer.groups, weight.shape[1]
        scaled = weight.reshape(g, weight.shape[0] // g, cg, -1) * s.reshape(g, 1, cg, 1)
        w.set(layer.weight, scaled.reshape(weight.shape))
        return
    shape = [1] * weight.ndim
    shape[layer.in_axis] = s.size
    w.set(layer.weight, weight * s.reshape(shape))


def _fc_bias_ok(name: str, channels: int, w: _Weights) -> bool:
    if not w.is_float(name):
        return False
    b = w.get(name)
    return b.ndim == 0 or b.shape[-1] in (1, channels)


def _homogeneous(node: onnx.NodeProto, w: _Weights) -> bool:
    """Relu, LeakyRelu, or PRelu with all slopes >= 0 given by an initializer."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Relu", "LeakyRelu"):
        return True
    if node.op_type == "PRelu" and len(node.input) == 2 and w.is_float(node.input[1]):
        return bool(np.all(w.get(node.input[1]) >= 0))
    return False


def find_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """The (first, second) node names ``equalize`` would equalize in ``model``."""
    return [p.names for p in _find_pairs(model, _Weights(model))]


def _find_pairs(model: onnx.ModelProto, w: _Weights) -> list[_Pair]:
    graph = model.graph
    uses = tensor_uses(graph)
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def sole_consumer(tensor: str) -> onnx.NodeProto | None:
        if tensor in graph_outputs or uses.get(tensor, 0) != 1 or len(consumers.get(tensor, [])) != 1:
            return None
        return consumers[tensor][0]

    def private(name: str | None) -> bool:
        return name is None or uses.get(name, 0) == 1

    pairs: list[_Pair] = []
    for node in graph.node:
        first = _as_layer(node, w)
        if first is None or not private(first.weight):
            continue
        channels = _out_channels(first, w)
        if first.bias is not None and not (private(first.bias) and (
                _fc_bias_ok(first.bias, channels, w) if first.family == "fc"
                else w.is_float(first.bias) and w.get(first.bias).shape == (channels,))):
            continue
        tensor = node.output[0]
        nxt = sole_consumer(tensor)
        if nxt is not None and node.op_type == "MatMul" and nxt.op_type == "Add":  # MatMul + bias Add
            other = nxt.input[1] if nxt.input[0] == tensor else nxt.input[0]
            if other != tensor and private(other) and _fc_bias_ok(other, channels, w):
                first.bias = other
                tensor = nxt.output[0]
                nxt = sole_consumer(tensor)
        if nxt is not None and nxt.op_type in ("Relu", "LeakyRelu", "PRelu"):
            if not _homogeneous(nxt, w) or nxt.input[0] != tensor:
                continue
            tensor = nxt.output[0]
            nxt = sole_consumer(tensor)
        second = _as_layer(nxt, w) if nxt is not None else None
        if second is None or second.family != first.family or nxt.input[0] != tensor or not private(second.weight):
            continue
        if second.weight == first.weight or (nxt.op_type == "Gemm" and _attr(nxt, "transA", 0)):
            continue
        if second.family == "conv" and w.get(second.weight).shape[0] % second.groups:
            continue
        if _in_channels(second, w) != channels:
            continue
        pairs.append(_Pair(first, second))
    return pairs


def equalize(model: onnx.ModelProto, iterations: int = 20,
             tol: float = 1e-8) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """Cross-layer equalize every eligible layer pair; return (new model, [(first, second) node names]).

    Pairs are Conv / Gemm / MatMul (2-D initializer weight; a MatMul may carry a following bias Add)
    -> optional Relu / LeakyRelu / PRelu (slopes >= 0) -> Conv / Gemm / MatMul of the same family
    (Conv with Conv, Gemm/MatMul with Gemm/MatMul), any Conv groups (depthwise included), where every
    intermediate tensor has exactly one reader and is not a graph output and the weights are float
    initializers used only there. All pairs are swept up to ``iterations`` times, stopping once every
    scale is within ``tol`` of 1. Arithmetic is float64; weights keep their dtype. The input is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w = _Weights(out)
    pairs = _find_pairs(out, w)
    for _ in range(max(iterations, 0)):
        worst = 0.0
        for pair in pairs:
            r1, r2 = _out_ranges(pair.first, w), _in_ranges(pair.second, w)
            s = np.ones_like(r1)
            ok = (r1 > 0) & (r2 > 0)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            _scale_out(pair.first, s, w)
            _scale_in(pair.second, s, w)
            worst = max(worst, float(np.max(np.abs(s - 1.0), initial=0.0)))
        if worst <= tol:
            break
    if pairs:
        w.write_back()
    return out, [p.names for p in pairs]
