"""Quantization scope: which op types get Q/DQ (the ``quantize_ops`` knob).

ONNX Runtime's ``quantize_static`` quantizes, by default, every op type of its registries: Add, Mul, Softmax,
Sigmoid, LayerNormalization, Where, ... On models whose GELU / LayerNorm / attention-mask arithmetic is made of
elementwise ops (most exported Transformers, SiLU CNNs) that both costs accuracy and adds Q/DQ pairs that cost
time, while ``op_types_to_quantize=["MatMul", "Conv", "Gemm"]`` keeps them float and is often 2-5x faster. The
scope is therefore searched like any other knob:

    compute               Conv, ConvTranspose, MatMul, Gemm, Gather on a weight (embedding tables), and the
                          Relu / Clip that ORT folds into the quantization of their input (left out, the
                          Conv output would be quantized over its negative half too, which costs a bit)
    compute_and_movement  compute, plus the ops ORT keeps in int8 between them (pooling, Concat, Resize,
                          Reshape / Transpose / Squeeze / Flatten / Slice / Pad / Split)
    all                   ONNX Runtime's registry (its default)

A space file may also list op types, written ``MatMul+Gather`` (or a YAML list inside the choices); they must
be op types ONNX Runtime's quantizer handles.
"""

from __future__ import annotations

from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

#: op types ONNX Runtime's QDQ quantizer can quantize (its default scope)
ORT_OPS = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "Relu", "Clip")
MOVEMENT = ("MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Resize", "Reshape", "Transpose", "Squeeze",
            "Unsqueeze", "Flatten", "Slice", "Pad", "Split")
SCOPES: dict[str, tuple[str, ...] | None] = {
    "compute": COMPUTE,
    "compute_and_movement": COMPUTE + MOVEMENT,
    "all": None,
}
#: named scopes from the widest to the narrowest: narrowing keeps more arithmetic float (the repair ladder)
NARROWING = ("all", "compute_and_movement", "compute")
SEPARATOR = "+"


def normalize(value) -> str:
    """A scope name, or an op-type list as its canonical ``A+B`` string. ValueError says what is allowed."""
    if isinstance(value, (list, tuple)):
        ops = [str(v) for v in value]
    elif isinstance(value, str) and value in SCOPES:
        return value
    elif isinstance(value, str):
        ops = [v.strip() for v in value.split(SEPARATOR)]
    else:
        raise ValueError(f"must be one of {list(SCOPES)} or a list of op types, got {value!r:.80}")
    bad = [op for op in ops if op not in ORT_OPS]
    if not ops or bad:
        raise ValueError(f"op type(s) {bad[:5]} are not quantized by ONNX Runtime; use {list(SCOPES)} or op types "
                         f"from {sorted(ORT_OPS)}")
    return SEPARATOR.join(sorted(set(ops)))


def op_types(value: str | None) -> list[str] | None:
    """``op_types_to_quantize`` for ONNX Runtime: None = its whole registry."""
    if value is None or value == "all":
        return None
    ops = SCOPES.get(value)
    return list(ops) if ops is not None else value.split(SEPARATOR)


def in_scope(op_type: str, value: str | None) -> bool:
    ops = op_types(value)
    return op_type in ORT_OPS if ops is None else op_type in ops
