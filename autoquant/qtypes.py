"""Bit width + symmetry -> ONNX Runtime quantization types and integer grids."""

from __future__ import annotations

from onnx import TensorProto
from onnxruntime.quantization import QuantType

_SIGNED = {4: QuantType.QInt4, 8: QuantType.QInt8, 16: QuantType.QInt16}
_UNSIGNED = {4: QuantType.QUInt4, 8: QuantType.QUInt8, 16: QuantType.QUInt16}

#: ONNX element type -> (bits, signed)
ONNX_INT_TYPES = {
    TensorProto.INT4: (4, True), TensorProto.UINT4: (4, False),
    TensorProto.INT8: (8, True), TensorProto.UINT8: (8, False),
    TensorProto.INT16: (16, True), TensorProto.UINT16: (16, False),
    TensorProto.INT32: (32, True),
}


def quant_type(bits: int, symmetric: bool) -> QuantType:
    """Symmetric -> signed type (zero point 0); affine -> unsigned type (free zero point)."""
    table = _SIGNED if symmetric else _UNSIGNED
    if bits not in table:
        raise ValueError(f"unsupported bit width {bits}; supported: {sorted(table)}")
    return table[bits]


def weight_quant_type(bits: int, symmetric: bool) -> QuantType:
    """Weights are always a signed type; ``symmetric`` only decides whether the zero point is free.

    (ORT refuses unsigned weights beside signed activations, and signed weights run everywhere.)
    """
    return quant_type(bits, True)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid [qmin, qmax] scales are derived on, as ONNX Runtime does: symmetric int8 / int16 drop
    -2^(b-1) (a grid symmetric around zero); symmetric int4 keeps the full [-8, 7]."""
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return (-m, m) if bits in (8, 16) else (-m - 1, m)
    return 0, 2**bits - 1
