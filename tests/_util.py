"""Small helpers shared by tests."""

import numpy as np


def qdq_nodes(model, op_type=None):
    return [n for n in model.graph.node if n.op_type in ((op_type,) if op_type else ("QuantizeLinear", "DequantizeLinear"))]


def init_array(model, name):
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def rng():
    return np.random.default_rng(0)
