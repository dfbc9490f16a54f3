"""Property tests (hypothesis) of the quantization math, checked against ONNX Runtime itself.

Conventions checked here (all ONNX / ORT):

* QuantizeLinear: ``q = saturate(round_half_to_even(x / scale) + zero_point)``, ``x / scale`` in float32.
* DequantizeLinear: ``x = (q - zero_point) * scale``.
* Scales and zero points as ``onnxruntime.quantization.quant_utils.compute_scale_zp`` makes them: the
  range is widened to contain 0 (symmetric: to ``[-absmax, absmax]``), ``scale = (rmax - rmin) / (qmax - qmin)``
  (computed in float64, stored as float32; 1.0 when below the smallest normal float32),
  ``zero_point = round(qmin - rmin / scale)`` (symmetric: ``round((qmin + qmax) / 2)``).
  ``autoquant.observers.base.fake_quant`` uses the same formula on the grid ``autoquant.qtypes.qrange``.
* AIMET encodings offsets: ``x = scale * (q_u + offset)`` on the unsigned grid ``q_u`` (see encodings.py).

Every test is derandomized (CI is deterministic) and has a bounded number of examples; the whole file runs
in well under 30 s.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

from autoquant.build import requantize, round_half_away
from autoquant.encodings import _entry
from autoquant.observers.base import fake_quant
from autoquant.qtypes import ONNX_INT_TYPES, qrange, quant_type


def props(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


# ONNX element type -> (numpy dtype, qmin, qmax) of the full type range (what QuantizeLinear saturates to).
TYPES = {
    TensorProto.INT8: (np.int8, -128, 127),
    TensorProto.UINT8: (np.uint8, 0, 255),
    TensorProto.INT16: (np.int16, -32768, 32767),
    TensorProto.UINT16: (np.uint16, 0, 65535),
    TensorProto.INT4: (ml_dtypes.int4, -8, 7),
    TensorProto.UINT4: (ml_dtypes.uint4, 0, 15),
}
EIGHT_BIT = (TensorProto.INT8, TensorProto.UINT8)
F32_EPS = float(np.finfo(np.float32).eps)


def _session(nodes, inputs, outputs, initializers, opset: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the nodes as written
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _opset(elem: int) -> int:
    return 13 if elem in EIGHT_BIT else 21  # int4 / int16 QuantizeLinear need opset 21


def _qparams(scale: np.ndarray, zp: np.ndarray, elem: int):
    dtype = TYPES[elem][0]
    return [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
            numpy_helper.from_array(np.asarray(zp).astype(dtype), "z")]


def ort_quantize(x: np.ndarray, scale, zp, axis: int | None, elem: int, opset: int) -> np.ndarray:
    """ORT's QuantizeLinear of float32 ``x`` (cast to int32 after, as ORT cannot hand int4 to numpy)."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("Cast", ["q"], ["y"], to=TensorProto.INT32)]
    sess = _session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                    [helper.make_tensor_value_info("y", TensorProto.INT32, list(x.shape))],
                    _qparams(scale, zp, elem), opset)
    return sess.run(None, {"x": x})[0].astype(np.int64)


def ort_qdq(x: np.ndarray, scale, zp, elem: int) -> np.ndarray:
    """ORT's QuantizeLinear -> DequantizeLinear round trip of float32 ``x`` (per tensor)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    sess = _session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                    _qparams(scale, zp, elem), 21)
    return sess.run(None, {"x": x})[0]


def ort_scale_zp(rmin: float, rmax: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    zp, scale = compute_scale_zp(np.array(rmin, np.float32), np.array(rmax, np.float32),
                                 np.array(qmin, np.int64), np.array(qmax, np.int64), symmetric=symmetric)
    return float(scale), int(zp)


def half_step_tol(scale: float, x: np.ndarray) -> float:
    """``scale / 2`` plus a few float32 roundings of the values involved (x / scale, (q - zp) * scale)."""
    mag = float(np.max(np.abs(x))) if x.size else 0.0
    return scale / 2 + 8 * F32_EPS * (mag + scale)


finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


# ---------------------------------------------------------------- 1. fake_quant (observers' QDQ model)

@props(300)
@given(values=hnp.arrays(np.float32, st.integers(1, 200), elements=finite32),
       bits=st.sampled_from([4, 8, 16]), symmetric=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_fake_quant_round_trip_error_is_at_most_half_a_step(values, bits, symmetric, dtype):
    x = values.astype(dtype)
    lo, hi = x.min(), x.max()
    deq = fake_quant(x, np.array([lo]), np.array([hi]), bits, symmetric)
    assert deq.shape == (1, x.size)
    qmin, qmax = qrange(bits, symmetric)
    scale, _ = ort_scale_zp(float(lo), float(hi), qmin, qmax, symmetric)
    err = np.abs(x.astype(np.float64) - deq[0].astype(np.float64))
    tol = half_step_tol(scale, values)
    worst = int(np.argmax(err))
    assert err[worst] <= tol, f"x={x[worst]!r} deq={deq[0, worst]!r} scale={scale} err={err[worst]} > {tol}"


@props(300)
@given(bounds=hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(2)), elements=finite32),
       bits=st.sampled_from([4, 8, 16]), symmetric=st.booleans(),
       others=hnp.arrays(np.float64, st.integers(0, 20), elements=finite32))
def test_fake_quant_represents_zero_exactly(bounds, bits, symmetric, others):
    """Zero is on every grid fake_quant builds (for all K candidate ranges at once, whatever their sign)."""
    rmin, rmax = bounds.min(axis=1), bounds.max(axis=1)
    values = np.concatenate([[0.0], others])
    deq = fake_quant(values, rmin, rmax, bits, symmetric)
    assert deq.shape == (len(rmin), len(values))
    assert np.all(deq[:, 0] == 0.0), deq[:, 0]


@props(300)
@given(values=hnp.arrays(np.float32, st.integers(1, 200), elements=finite32),
       bits=st.sampled_from([8, 16]), symmetric=st.booleans())
def test_fake_quant_matches_ort_qdq(values, bits, symmetric):
    """fake_quant reproduces ORT's QuantizeLinear -> DequantizeLinear with ORT's own scale / zero point.

    (Activation bit widths 8 and 16; the two may differ by one step only where x / scale is within float
    rounding of a .5 tie, because fake_quant does not store the scale as float32 first.)
    """
    elem = quant_type(bits, symmetric).tensor_type
    lo, hi = float(values.min()), float(values.max())
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(elem, symmetric=symmetric))
    scale, zp = ort_scale_zp(lo, hi, qmin, qmax, symmetric)
    ref = ort_qdq(values, np.float32(scale), zp, elem).astype(np.float64)
    ours = fake_quant(values, np.array([values.min()]), np.array([values.max()]), bits, symmetric)[0]
    diff = ours.astype(np.float64) - ref
    steps = np.round(diff / scale)
    tol = 8 * F32_EPS * (float(np.max(np.abs(values))) + scale)
    assert np.all(np.abs(diff - steps * scale) <= tol)
    assert np.all(np.abs(steps) <= 1)
    ratio = values.astype(np.float64) / scale
    near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) <= 1e-4 * (1 + np.abs(ratio))
    assert np.all(near_tie[steps != 0]), values[(steps != 0) & ~near_tie]


@pytest.mark.parametrize("bits,symmetric", [
    (8, False), (16, False), (4, False), (8, True), (16, True), (4, True),
])
def test_qrange_is_orts_grid(bits, symmetric):
    """The grid fake_quant derives scales on is the one ORT's quantizer uses for that type / symmetry."""
    elem = quant_type(bits, symmetric).tensor_type
    ort_grid = tuple(int(v) for v in get_qmin_qmax_for_qType(elem, symmetric=symmetric))
    assert qrange(bits, symmetric) == ort_grid


# ---------------------------------------------------------------- 2. requantize vs ORT QuantizeLinear

@st.composite
def requant_cases(draw):
    elem = draw(st.sampled_from(sorted(TYPES)))
    ndim = draw(st.sampled_from([2, 4]))
    shape = tuple(draw(st.integers(1, 6 if ndim == 2 else 4)) for _ in range(ndim))
    per_channel = draw(st.booleans())
    # per channel: an explicit axis (possibly negative) or none (ONNX default axis 1)
    axis = draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1))) if per_channel else None
    opset = draw(st.sampled_from([13, 21])) if elem in EIGHT_BIT else 21
    pow2 = draw(st.booleans())  # power-of-two scales make exact .5 ties (and their neighbours) reachable
    seed = draw(st.integers(0, 2**32 - 1))

    rng = np.random.default_rng(seed)
    _, qmin, qmax = TYPES[elem]
    channels = shape[1 if axis is None else axis] if per_channel else 1
    if pow2:
        scale = np.ldexp(1.0, rng.integers(-12, 4, channels)).astype(np.float32)
    else:
        scale = np.exp(rng.uniform(math.log(1e-4), math.log(10.0), channels)).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, channels) if rng.random() < 0.7 else np.zeros(channels, np.int64)
    bshape = [1] * ndim
    if per_channel:
        bshape[1 if axis is None else axis] = channels
    s_b = scale.reshape(bshape).astype(np.float64)
    z_b = zp.reshape(bshape)

    # grid index relative to the zero point, a little past both ends (saturation)
    u = rng.integers(qmin - 3, qmax + 4, shape) - z_b
    kind = rng.integers(0, 5, shape)
    tie = ((u + 0.5) * s_b).astype(np.float32)
    w = np.where(kind == 0, ((u + rng.uniform(-0.5, 0.5, shape)) * s_b).astype(np.float32), tie)
    w = np.where(kind == 2, np.nextafter(tie, np.float32(0)), w)  # just inside a tie
    w = np.where(kind == 3, np.nextafter(tie, np.copysign(np.float32(np.inf), tie)), w)  # just outside
    w = np.where(kind == 4, (rng.uniform(-4, 4, shape) * (qmax - qmin) * s_b).astype(np.float32), w)
    w = w.astype(np.float32)
    scale_arg = scale if per_channel else np.array(scale[0], np.float32)  # per tensor: a 0-d scale, as stored
    zp_arg = zp if per_channel else np.array(zp[0])
    return elem, w, scale_arg, zp_arg, axis, opset, (qmin, qmax), bshape


@props(250)
@given(case=requant_cases())
def test_requantize_nearest_even_equals_ort_quantize_linear(case):
    elem, w, scale, zp, axis, opset, (qmin, qmax), _ = case
    ours = requantize(w, scale, zp.astype(np.int32), axis, qmin, qmax, "nearest_even")
    ref = ort_quantize(w, scale, zp, axis, elem, opset)
    assert ours.shape == ref.shape
    bad = np.flatnonzero(ours.astype(np.int64).ravel() != ref.ravel())
    assert bad.size == 0, (f"{bad.size} mismatches, e.g. w={w.ravel()[bad[0]]!r}: ours {ours.ravel()[bad[0]]} "
                           f"ORT {ref.ravel()[bad[0]]}")


@props(250)
@given(case=requant_cases())
def test_requantize_nearest_away_differs_only_at_ties(case):
    """Half away from zero: same as ties-to-even except at exact .5 ties, there one step further from zero."""
    elem, w, scale, zp, axis, opset, (qmin, qmax), bshape = case
    even = requantize(w, scale, zp.astype(np.int32), axis, qmin, qmax, "nearest_even").astype(np.int64)
    away = requantize(w, scale, zp.astype(np.int32), axis, qmin, qmax, "nearest_away").astype(np.int64)
    x = w / np.asarray(scale, np.float32).reshape(bshape if np.ndim(scale) else ())  # float32, as ORT divides
    assert x.dtype == np.float32
    t = np.trunc(x)
    tie = np.abs(x - t) == 0.5  # exact: the fractional part of a float is representable
    z = np.asarray(zp, np.int64).reshape(bshape if np.ndim(zp) else ())
    diff = away - even
    assert np.all(diff[~tie] == 0), (f"differs off a tie: x={x[~tie & (diff != 0)][:5]!r} "
                                     f"even={even[~tie & (diff != 0)][:5]} away={away[~tie & (diff != 0)][:5]}")
    assert np.all(np.abs(diff) <= 1)
    assert np.all(np.sign(diff[diff != 0]) == np.sign(x[diff != 0]))
    expected = np.clip(np.broadcast_to(t + np.sign(x), x.shape).astype(np.int64) + z, qmin, qmax)
    assert np.array_equal(away[tie], np.broadcast_to(expected, x.shape)[tie])


@props(300)
@given(x=hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-2.0**24, 2.0**24, width=32)))
def test_round_half_away_is_exact(x):
    """round_half_away(x) is the integer nearest to x, ties away from zero (exactly, in float32)."""
    near_half = np.float32(0.5) - np.float32(2.0**-25)  # 0.49999997: the usual floor(|x| + 0.5) trap
    x = np.concatenate([x, [near_half, -near_half, np.float32(2.0**23 + 1)]]).astype(np.float32)
    t = np.trunc(x)
    expected = np.where(np.abs(x - t) >= 0.5, t + np.sign(x), t)
    got = round_half_away(x)
    bad = got != expected
    assert not bad.any(), f"x={x[bad]!r} -> {got[bad]!r}, expected {expected[bad]!r}"


# ---------------------------------------------------------------- 3. ORT's compute_scale_zp round trip

@props(250)
@given(a=finite32, b=finite32, elem=st.sampled_from(sorted(TYPES)), symmetric=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_compute_scale_zp_round_trip_error_is_at_most_half_a_step(a, b, elem, symmetric, seed):
    rmin, rmax = min(a, b), max(a, b)
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(elem, symmetric=symmetric))
    scale, zp = ort_scale_zp(rmin, rmax, qmin, qmax, symmetric)
    assert qmin <= zp <= qmax
    rng = np.random.default_rng(seed)
    x = np.concatenate([[rmin, rmax, 0.0], rng.uniform(rmin, rmax, 200)]).astype(np.float32)
    x = np.clip(x, np.float32(rmin), np.float32(rmax))
    x[2] = 0.0  # inside ORT's range, which is widened to contain zero
    y = ort_qdq(x, np.float32(scale), zp, elem)
    assert y[2] == 0.0  # zero exactly representable
    err = np.abs(x.astype(np.float64) - y.astype(np.float64))
    tol = half_step_tol(scale, x)
    worst = int(np.argmax(err))
    assert err[worst] <= tol, f"x={x[worst]!r} y={y[worst]!r} scale={scale} zp={zp} err={err[worst]} > {tol}"


# ---------------------------------------------------------------- 4. int4 packing

@props(150)
@given(elem=st.sampled_from([TensorProto.INT4, TensorProto.UINT4]),
       shape=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
       per_axis=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_int4_packing_round_trips_through_onnx_and_ort(elem, shape, per_axis, seed):
    dtype, qmin, qmax = TYPES[elem]
    rng = np.random.default_rng(seed)
    q = rng.integers(qmin, qmax + 1, shape)
    arr = q.astype(dtype)
    tensor = numpy_helper.from_array(arr, "q")
    assert tensor.data_type == elem
    # two values per byte, first value in the low nibble, odd lengths padded with a zero nibble
    n = q.size
    nib = (q.ravel() & 0xF).astype(np.uint8)
    nib = np.concatenate([nib, np.zeros(n % 2, np.uint8)])
    assert tensor.raw_data == (nib[0::2] | (nib[1::2] << 4)).tobytes()
    back = numpy_helper.to_array(tensor)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back.astype(np.int64), q)

    axis = int(rng.integers(-len(shape), len(shape))) if per_axis else None
    channels = shape[axis] if per_axis else 1
    scale = np.exp(rng.uniform(math.log(1e-3), math.log(10.0), channels)).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, channels)
    bshape = [1] * len(shape)
    if per_axis:
        bshape[axis] = channels
    s_arg, z_arg = (scale, zp) if per_axis else (scale[0], zp[0])
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
             helper.make_node("Cast", ["q"], ["qi"], to=TensorProto.INT32)]
    sess = _session(nodes, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape)),
                                helper.make_tensor_value_info("qi", TensorProto.INT32, list(shape))],
                    [tensor] + _qparams(s_arg, z_arg, elem), 21)
    y, qi = sess.run(None, {})
    assert np.array_equal(qi.astype(np.int64), q)
    expected = (q - zp.reshape(bshape)).astype(np.float32) * scale.reshape(bshape)
    assert np.array_equal(y, expected)


# ---------------------------------------------------------------- 5. encodings offsets

@props(300)
@given(elem=st.sampled_from(sorted(ONNX_INT_TYPES)), channels=st.integers(1, 6), shared_zp=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_encodings_offset_reproduces_dequantization(elem, channels, shared_zp, seed):
    """scale * (q_u + offset) == scale * (q - zp) for every q of the type, q_u = q - qmin_of_type."""
    bits, signed = ONNX_INT_TYPES[elem]
    tmin, tmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(math.log(1e-6), math.log(10.0), channels)).astype(np.float32)
    symmetric = signed and rng.random() < 0.4
    nzp = 1 if shared_zp else channels
    zp = np.zeros(nzp, np.int64) if symmetric else rng.integers(tmin, tmax + 1, nzp, dtype=np.int64)
    entry = _entry("t", scale, zp, elem)

    assert entry["bw"] == bits
    assert entry["enc_type"] == ("PER_CHANNEL" if channels > 1 else "PER_TENSOR")
    assert entry["is_sym"] == bool(signed and np.all(zp == 0))
    assert len(entry["scale"]) == len(entry["offset"]) == channels
    assert entry["scale"] == [float(s) for s in scale]
    zps = np.broadcast_to(zp, (channels,))
    for c in range(channels):
        if bits <= 8:
            q = np.arange(tmin, tmax + 1, dtype=np.int64)
        else:
            q = np.concatenate([[tmin, tmax, int(zps[c])], rng.integers(tmin, tmax + 1, 200, dtype=np.int64)])
        q_u = q - tmin  # unsigned-grid value: q for unsigned types, q + 2^(bw-1) for signed ones
        assert q_u.min() >= 0 and q_u.max() <= 2**bits - 1
        offset, s = entry["offset"][c], entry["scale"][c]
        assert isinstance(offset, int)
        assert np.array_equal(q_u + offset, q - zps[c])  # exact, in integers
        assert np.array_equal(s * (q_u + offset).astype(np.float64), float(scale[c]) * (q - zps[c]).astype(np.float64))
