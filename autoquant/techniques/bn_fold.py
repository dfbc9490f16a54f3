"""Fold inference-mode BatchNormalization into the Conv / Gemm that produces its input.

BatchNormalization is the per-channel affine map ``y = a * x + c`` with ``a = scale / sqrt(var + eps)`` and
``c = B - mean * a``, so a producer whose output channel ``m`` is ``w_m . x + b_m`` becomes
``(a_m w_m) . x + (a_m b_m + c_m)``. The fold runs in float64 and is cast back to the weight dtype.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _count_reads(graph: onnx.GraphProto, uses: dict[str, int]) -> None:
    """Add every node-input slot of ``graph`` and its subgraphs (conservatively: by name) to ``uses``."""
    for node in graph.node:
        for name in node.input:
            if name:
                uses[name] = uses.get(name, 0) + 1
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _count_reads(sub, uses)


def tensor_uses(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs (subgraphs included) and graph outputs read each tensor name."""
    uses: dict[str, int] = {}
    _count_reads(graph, uses)
    for out in graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    return uses


class _Weights:
    """Float64 views of initializers, written back (in their dtype) once at the end."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.protos = {t.name: t for t in self.graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.names = set(self.protos) | {o for n in self.graph.node for o in n.output} | {
            v.name for v in list(self.graph.input) + list(self.graph.output)}

    def is_float(self, name: str) -> bool:
        return name in self.protos and numpy_helper.to_array(self.protos[name]).dtype in _FLOAT_DTYPES

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            arr = numpy_helper.to_array(self.protos[name])
            self.dtypes[name] = arr.dtype
            self.arrays[name] = arr.astype(np.float64)
        return self.arrays[name]

    def set(self, name: str, value: np.ndarray, dtype: np.dtype | None = None) -> None:
        if dtype is not None:
            self.dtypes[name] = np.dtype(dtype)
        self.arrays[name] = value

    def fresh_name(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def write_back(self) -> None:
        for name, arr in self.arrays.items():
            proto = numpy_helper.from_array(arr.astype(self.dtypes[name]), name)
            if name in self.protos:
                self.protos[name].CopyFrom(proto)
            else:
                self.graph.initializer.append(proto)
                self.protos[name] = self.graph.initializer[-1]
                if self.model.ir_version < 4:  # initializers must also be graph inputs there
                    self.graph.input.append(helper.make_tensor_value_info(
                        name, proto.data_type, list(arr.shape)))


def _private(node: onnx.NodeProto, slot: int, w: _Weights, uses: dict[str, int], suffix: str) -> str:
    """Name of the initializer at ``node.input[slot]``, copied first if anything else reads it."""
    name = node.input[slot]
    if uses.get(name, 0) > 1:
        copy = w.fresh_name(f"{name}_{suffix}")
        w.set(copy, w.get(name).copy(), w.dtypes[name])
        uses[name] -= 1
        uses[copy] = 1
        node.input[slot] = copy
        name = copy
    return name


def _bn_affine(bn: onnx.NodeProto, w: _Weights, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    params = list(bn.input[1:5])
    if len(params) != 4 or not all(w.is_float(p) for p in params):
        return None
    scale, bias, mean, var = (w.get(p) for p in params)
    if any(p.shape != (channels,) for p in (scale, bias, mean, var)):
        return None
    a = scale / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
    return a, bias - mean * a


def _fold_conv(conv: onnx.NodeProto, a: np.ndarray, c: np.ndarray, w: _Weights, uses: dict[str, int]) -> None:
    wname = _private(conv, 1, w, uses, "bnfold")
    weight = w.get(wname)
    w.set(wname, weight * a.reshape((-1,) + (1,) * (weight.ndim - 1)))
    if len(conv.input) > 2 and conv.input[2]:
        bname = _private(conv, 2, w, uses, "bnfold")
        w.set(bname, w.get(bname) * a + c)
    else:
        _add_bias(conv, wname, c, w, uses)


def _add_bias(node: onnx.NodeProto, wname: str, c: np.ndarray, w: "_Weights", uses: dict[str, int]) -> None:
    """Give a Conv / Gemm without a bias the new bias ``c`` (as its third input)."""
    bname = w.fresh_name(f"{node.name or wname}_bias")
    w.set(bname, c, w.dtypes[wname])
    if len(node.input) > 2:
        node.input[2] = bname
    else:
        node.input.append(bname)
    uses[bname] = 1


def _fold_gemm(gemm: onnx.NodeProto, a: np.ndarray, c: np.ndarray, w: _Weights, uses: dict[str, int]) -> None:
    wname = _private(gemm, 1, w, uses, "bnfold")
    weight = w.get(wname)
    w.set(wname, weight * (a[:, None] if _attr(gemm, "transB", 0) else a[None, :]))
    beta = float(_attr(gemm, "beta", 1.0))
    if len(gemm.input) > 2 and gemm.input[2]:
        bname = _private(gemm, 2, w, uses, "bnfold")
        w.set(bname, beta * w.get(bname) * a + c)  # broadcasts over the output columns, as Gemm does
    else:
        _add_bias(gemm, wname, c, w, uses)
    if beta != 1.0:
        _set_float_attr(gemm, "beta", 1.0)


def _foldable(bn: onnx.NodeProto, producer: onnx.NodeProto | None, w: _Weights, uses: dict[str, int],
              graph_outputs: set[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The BN's (a, c) when it can be folded into ``producer``, else None."""
    if len([o for o in bn.output if o]) != 1 or _attr(bn, "training_mode", 0):
        return None
    if producer is None or producer.op_type not in ("Conv", "Gemm") or len(producer.input) < 2:
        return None
    out = bn.input[0]
    if uses.get(out, 0) != 1 or out in graph_outputs or producer.output[0] != out:
        return None
    wname = producer.input[1]
    if not w.is_float(wname):
        return None
    bias = producer.input[2] if len(producer.input) > 2 else ""
    if bias and not w.is_float(bias):
        return None
    weight = w.get(wname)
    if producer.op_type == "Conv":
        if weight.ndim < 3:
            return None
        channels = weight.shape[0]
        if bias and w.get(bias).shape != (channels,):
            return None
    else:
        if weight.ndim != 2:
            return None
        channels = weight.shape[0] if _attr(producer, "transB", 0) else weight.shape[1]
        if bias and (w.get(bias).ndim > 2 or (w.get(bias).ndim and w.get(bias).shape[-1] not in (1, channels))):
            return None
    return _bn_affine(bn, w, channels)


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Fold every foldable BatchNormalization into its Conv / Gemm producer; return (new model, folded names).

    A BN is folded when it is in inference mode (one output), its input is the only use of a Conv's
    (any groups) or Gemm's (BN over axis 1 of the 2-D output) output that is not a graph output, and
    the producer's weight / bias and the BN's parameters are float initializers. The producer then
    writes the BN's output name, so downstream tensor names do not change. Weights or biases shared
    with other nodes are copied before they are changed. The input model is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    w = _Weights(out)
    uses = tensor_uses(graph)
    before = {name for name in w.protos if uses.get(name, 0)}
    graph_outputs = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output if o}
    folded: list[str] = []
    dropped_tensors: set[str] = set()
    keep: list[onnx.NodeProto] = []
    for node in list(graph.node):
        affine = None
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            producer = producers.get(node.input[0])
            affine = _foldable(node, producer, w, uses, graph_outputs)
        if affine is None:
            keep.append(node)
            continue
        (_fold_conv if producer.op_type == "Conv" else _fold_gemm)(producer, *affine, w, uses)
        for name in node.input:
            uses[name] -= 1
        dropped_tensors.add(producer.output[0])
        producer.output[0] = node.output[0]
        producers[node.output[0]] = producer
        folded.append(node.name or node.output[0])
    if not folded:
        return out, folded
    w.write_back()
    del graph.node[:]
    graph.node.extend(keep)
    unused = {name for name in before if not uses.get(name, 0)}
    _remove(graph, unused, dropped_tensors)
    return out, folded


def _remove(graph: onnx.GraphProto, initializers: set[str], tensors: set[str]) -> None:
    """Drop unused initializers (and their graph-input entries) and value_info of vanished tensors."""
    kept = [t for t in graph.initializer if t.name not in initializers]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [v for v in graph.input if v.name not in initializers]
    del graph.input[:]
    graph.input.extend(inputs)
    infos = [v for v in graph.value_info if v.name not in tensors | initializers]
    del graph.value_info[:]
    graph.value_info.extend(infos)
