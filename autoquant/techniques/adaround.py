"""AdaRound: learn whether each weight rounds up or down (Nagel et al. 2020, "Up or Down?").

Every supported layer (Conv 1-D/2-D with any ``group``, Gemm, MatMul with a 2-D weight) is written as
grouped linear maps ``Y[g] = X[g] @ W[g].T`` (:func:`layer_matrix`), so one optimizer serves all. Per
layer, on the float input activations of calibration data, it minimises

    ||X (W~ - W)^T||^2 / ||X (W_nearest - W)^T||^2  +  reg * sum(1 - |2h(V) - 1|^beta)

over V, with W~ = s * (clip(floor(w/s) + h(V) + zp, qmin, qmax) - zp) and h the rectified sigmoid.
The reconstruction term is the layer output MSE divided by nearest rounding's MSE: a constant factor
that leaves the minimiser unchanged but makes ``reg`` mean the same for every layer whatever the scale
of its activations and weights (the raw MSE spans many orders of magnitude between layers).

The batch is fixed (at most ``max_rows`` sampled output positions), so the objective is deterministic
and is evaluated through the Gram matrix X^T X when that is cheaper than X itself. The result is
never worse than nearest rounding on the layer MSE: both are measured on the same rows and nearest is
returned when AdaRound does not beat it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from ..qtypes import ONNX_INT_TYPES

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (the paper's values)
LAYER_OPS = ("Conv", "Gemm", "MatMul")


class LinearForm(NamedTuple):
    """A layer as grouped matrix products: output ``y[g] = x[g] @ w[g].T`` of shape (G, R, M/G)."""

    x: np.ndarray  # (G, R, K): one row per output position (sampled when max_rows is set)
    w: np.ndarray  # (G, M/G, K): one row per output channel
    unfold: Callable[[np.ndarray], np.ndarray]  # weight-shaped array -> (G, M/G, K)
    fold: Callable[[np.ndarray], np.ndarray]  # (G, M/G, K) -> weight-shaped array
    to_output: Callable[[np.ndarray], np.ndarray]  # (G, R, M/G) -> the node's output layout (all rows only)


def _attr(attrs: dict, name: str, default):
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _rows(total: int, max_rows: int | None, seed: int) -> np.ndarray:
    if max_rows is None or total <= max_rows:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False))


def _same_pads(size: int, k: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _conv_form(attrs: dict, w: np.ndarray, xs: list[np.ndarray], max_rows: int | None, seed: int,
               single: bool) -> LinearForm:
    """Conv on the feeds ``xs`` (any batch and spatial sizes each): rows are drawn over all feeds' output
    positions together, then each feed is unfolded (im2col) on its own rows."""
    one_d = w.ndim == 3
    if one_d:  # a 1-D conv is a 2-D conv over a height of 1
        w, xs = w[:, :, None, :], [x[:, :, None, :] for x in xs]
    if w.ndim != 4:
        raise NotImplementedError(f"Conv with a {w.ndim - 2}-D kernel is not supported (1-D and 2-D only)")
    lift = (lambda v, fill: [fill] + list(v)) if one_d else (lambda v, fill: list(v))
    m, cg, kh, kw = w.shape
    groups = int(_attr(attrs, "group", 1))
    sh, sw = lift(_attr(attrs, "strides", [1] * (w.ndim - 2 - one_d)), 1)
    dh, dw = lift(_attr(attrs, "dilations", [1] * (w.ndim - 2 - one_d)), 1)
    auto_pad = _attr(attrs, "auto_pad", "NOTSET")
    if m % groups:
        raise ValueError(f"Conv shapes do not match: weight {w.shape}, group {groups}")

    def geometry(x: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(padded input, output height, output width) of one feed."""
        n, c, h, wd = x.shape
        if c != cg * groups:
            raise ValueError(f"Conv shapes do not match: input channels {c}, weight {w.shape}, group {groups}")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            (pt, pb), (pl, pr) = (_same_pads(size, k, s, d, auto_pad == "SAME_UPPER")
                                  for size, k, s, d in ((h, kh, sh, dh), (wd, kw, sw, dw)))
        elif auto_pad == "VALID":
            pt = pb = pl = pr = 0
        else:
            pads = list(_attr(attrs, "pads", [0] * (2 * (w.ndim - 2 - one_d))))
            pt, pl, pb, pr = ([0] + pads[:1] + [0] + pads[1:]) if one_d else pads
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))), oh, ow

    geo = [geometry(x) for x in xs]
    counts = [x.shape[0] * oh * ow for x, (_, oh, ow) in zip(xs, geo)]
    starts = np.cumsum([0] + counts)
    idx = _rows(int(starts[-1]), max_rows, seed)
    blocks = []
    for (xp, oh, ow), lo, hi in zip(geo, starts[:-1], starts[1:]):
        local = idx[(idx >= lo) & (idx < hi)] - lo
        bn, rem = np.divmod(local, oh * ow)
        r0, c0 = np.divmod(rem, ow)
        r0, c0 = r0 * sh, c0 * sw
        # im2col on the chosen rows only: (kh, kw, R, C) -> (G, R, C/G * kh * kw), columns in weight order
        patches = np.stack([np.stack([xp[bn, :, r0 + i * dh, c0 + j * dw] for j in range(kw)]) for i in range(kh)])
        blocks.append(patches.reshape(kh, kw, local.size, groups, cg).transpose(3, 2, 4, 0, 1)
                      .reshape(groups, local.size, -1))
    cols = np.concatenate(blocks, axis=1)
    shape = w.shape if not one_d else (m, cg, kw)

    def unfold(a: np.ndarray) -> np.ndarray:
        return a.reshape(groups, m // groups, -1)

    def fold(a: np.ndarray) -> np.ndarray:
        return a.reshape(shape)

    def to_output(y: np.ndarray) -> np.ndarray | list[np.ndarray]:
        outs = []
        for x, (_, oh, ow), lo, hi in zip(xs, geo, starts[:-1], starts[1:]):
            out = y[:, lo:hi].transpose(1, 0, 2).reshape(x.shape[0], oh, ow, m).transpose(0, 3, 1, 2)
            outs.append(out[:, :, 0, :] if one_d else out)
        return outs[0] if single else outs

    return LinearForm(cols, unfold(w), unfold, fold, to_output)


def stack_inputs(op_type: str, attrs: dict, xs: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One layer's float inputs on several feeds, joined where their shapes allow it.

    Feeds may differ in batch, sequence length or image size (text lines of different widths, ...).
    MatMul: every feed as rows (-1, K), concatenated. Gemm: concatenated along its row axis (axis 1
    when ``transA``). Conv: concatenated on the batch axis when the other dims agree, else the list
    itself (:func:`layer_matrix` unfolds each feed on its own).
    """
    xs = [np.asarray(x, np.float32) for x in xs]
    if op_type == "MatMul":
        return np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
    if op_type == "Gemm":
        return np.concatenate(xs, axis=1 if _attr(attrs, "transA", 0) else 0)
    if all(x.shape[1:] == xs[0].shape[1:] for x in xs):
        return np.concatenate(xs)
    return xs


def layer_matrix(op_type: str, attrs: dict, w: np.ndarray, x: np.ndarray | list[np.ndarray],
                 max_rows: int | None = None, seed: int = 0) -> LinearForm:
    """``op_type`` with weight ``w`` on input ``x`` as grouped matrix products (see :class:`LinearForm`).

    ``x`` is one array or a list of per-feed arrays whose shapes may differ (see :func:`stack_inputs`;
    ``to_output`` then gives the Conv outputs per feed, the rows of MatMul / Gemm).
    ``attrs`` are the node's ONNX attributes as a dict (``onnx.helper.get_attribute_value``).
    ``max_rows`` keeps that many output positions, drawn without replacement with ``seed``.
    """
    w = np.asarray(w, np.float32)
    if isinstance(x, (list, tuple)):
        x = stack_inputs(op_type, attrs, list(x))
    if op_type == "Conv":
        single = not isinstance(x, list)
        return _conv_form(attrs, w, [np.asarray(x, np.float32)] if single else x, max_rows, seed, single)
    x = np.asarray(x, np.float32)
    if w.ndim != 2:
        raise NotImplementedError(f"{op_type} with a {w.ndim}-D weight is not supported (2-D only)")
    if op_type == "Gemm":
        a = x.T if _attr(attrs, "transA", 0) else x
        a = a * np.float32(_attr(attrs, "alpha", 1.0))
        trans_b = bool(_attr(attrs, "transB", 0))
        rows = a[_rows(a.shape[0], max_rows, seed)]

        def unfold(b: np.ndarray) -> np.ndarray:
            return (b if trans_b else b.T)[None]

        def fold(b: np.ndarray) -> np.ndarray:
            return b[0] if trans_b else b[0].T

        return LinearForm(rows[None], unfold(w), unfold, fold, lambda y: y[0])
    if op_type == "MatMul":
        flat = x.reshape(-1, w.shape[0])
        rows = flat[_rows(flat.shape[0], max_rows, seed)]
        lead = x.shape[:-1]
        return LinearForm(rows[None], w.T[None], lambda b: b.T[None], lambda b: b[0].T,
                          lambda y: y[0].reshape(lead + (w.shape[1],)))
    raise NotImplementedError(f"AdaRound supports {LAYER_OPS}, not {op_type}")


def _broadcast(v: np.ndarray, w: np.ndarray, axis: int | None) -> np.ndarray:
    v = np.asarray(v)
    if v.size > 1:
        shape = [1] * w.ndim
        shape[axis if axis is not None else 1] = v.size  # DequantizeLinear's default axis is 1
        v = v.reshape(shape)
    return np.broadcast_to(v.reshape(v.shape if v.size > 1 else ()), w.shape)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # overflow-free


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return np.clip(_sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class _Objective:
    """Layer output MSE of weights ``w2`` vs the float ones, with its gradient, on fixed rows."""

    def __init__(self, x: np.ndarray, w: np.ndarray):
        g, r, k = x.shape
        self.w, self.norm = w, 1.0 / (r * g * w.shape[1])
        self.gram = k <= 2 * r  # X^T X costs G*M*K^2 per step against 2*G*R*K*M for X itself
        self.x = x
        if self.gram:
            self.h = np.matmul(x.transpose(0, 2, 1), x) * np.float32(self.norm)

    def value_and_grad(self, w2: np.ndarray) -> tuple[float, np.ndarray]:
        d = w2 - self.w
        if self.gram:
            dh = np.matmul(d, self.h)
            return float(np.sum(d * dh)), 2.0 * dh
        e = np.matmul(self.x, d.transpose(0, 2, 1))
        return float(np.sum(e * e)) * self.norm, np.float32(2.0 * self.norm) * np.matmul(e.transpose(0, 2, 1), self.x)

    def exact(self, w2: np.ndarray) -> float:
        """The MSE in float64 straight from the rows (the number both roundings are compared on)."""
        d = w2.astype(np.float64) - self.w.astype(np.float64)
        e = np.matmul(self.x.astype(np.float64), d.transpose(0, 2, 1))
        return float(np.sum(e * e)) * self.norm


def adaround(w: np.ndarray, x: np.ndarray | list[np.ndarray], scale: np.ndarray, zero_point: np.ndarray,
             axis: int | None, qmin: int, qmax: int, op_type: str, attrs: dict, *, iters: int = 500, reg: float = 0.01,
             beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, max_rows: int = 2048, lr: float = 1e-2,
             seed: int = 0) -> tuple[np.ndarray, dict]:
    """Integer weights (int32, shape of ``w``, in [qmin, qmax]) chosen by AdaRound on the grid
    (``scale``, ``zero_point``, ``axis`` as in DequantizeLinear) and an info dict: ``loss_nearest`` and
    ``loss_adaround`` (layer output MSE on the sampled rows, float64), ``iters``, ``used`` ("adaround", or
    "nearest" when AdaRound's MSE is not lower), ``changed`` (integers differing from nearest), ``rows``,
    ``seconds``. ``x`` is the layer's float input on calibration data (one array, or one per feed as in
    :func:`layer_matrix`), ``attrs`` the node's attributes."""
    start = time.perf_counter()
    w = np.asarray(w, np.float32)
    form = layer_matrix(op_type, attrs, w, x, max_rows, seed)
    s = form.unfold(_broadcast(np.asarray(scale, np.float32), w, axis)).astype(np.float32)
    z = form.unfold(_broadcast(np.asarray(zero_point).astype(np.float32), w, axis)).astype(np.float32)
    s_safe = np.where(s > 0, s, np.float32(1.0))
    ws = form.w / s_safe
    low = np.floor(ws)
    nearest = np.clip(np.round(ws) + z, qmin, qmax)
    obj = _Objective(form.x, form.w)
    loss_near = obj.exact(s * (nearest - z))
    if loss_near == 0.0:  # nothing to win
        iters = 0

    # V starts where h(V) is the fractional part, i.e. where W~ equals W (inside the grid)
    p = np.clip(((ws - low) - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    v = np.log(p / (1.0 - p)).astype(np.float32)
    # Hand-written Adam: the project avoids torch and scipy.optimize has no stochastic-gradient Adam.
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    rec_norm = np.float32(1.0 / loss_near) if loss_near > 0 else np.float32(1.0)
    n_warm = int(round(warmup * iters))
    for t in range(iters):
        sig = _sigmoid(v)
        raw = sig * np.float32(ZETA - GAMMA) + np.float32(GAMMA)
        h = np.clip(raw, 0.0, 1.0)
        q = low + h + z
        inside = (q >= qmin) & (q <= qmax)
        _, g_w = obj.value_and_grad(s * (np.clip(q, qmin, qmax) - z))
        g_h = g_w * s * inside * rec_norm
        if t >= n_warm and reg > 0:
            frac = (t - n_warm) / max(iters - n_warm - 1, 1)
            b = beta[0] + (beta[1] - beta[0]) * frac
            c = 2.0 * h - 1.0
            g_h = g_h - np.float32(reg * 2.0 * b) * np.sign(c) * np.abs(c) ** np.float32(b - 1.0)
        g = g_h * (sig * (1.0 - sig) * np.float32(ZETA - GAMMA)) * ((raw > 0) & (raw < 1))
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        step = lr * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        v = v - np.float32(step) * m1 / (np.sqrt(m2) + np.float32(eps))

    hard = np.clip(low + (rectified_sigmoid(v) >= 0.5) + z, qmin, qmax)
    loss_ada = obj.exact(s * (hard - z))
    used = "adaround" if loss_ada < loss_near else "nearest"
    best = hard if used == "adaround" else nearest
    result = np.rint(form.fold(best)).astype(np.int32)
    info = {"loss_nearest": loss_near, "loss_adaround": loss_ada, "iters": iters, "used": used,
            "changed": int(np.count_nonzero(best != nearest)), "rows": int(form.x.shape[1]),
            "seconds": time.perf_counter() - start}
    return result, info


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, list) and part and all(isinstance(p, np.ndarray) for p in part):
            h.update(f"list{len(part)}:{_digest(*part)}".encode())  # per-feed layer inputs
        elif isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


def _weight_dq(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}


class Interrupted(Exception):
    """apply_adaround stopped on request (a search timeout) before finishing the model."""


def apply_adaround(qdq_model: onnx.ModelProto, float_inits: dict[str, np.ndarray],
                   layer_inputs: dict[str, np.ndarray | list[np.ndarray]], cache: dict | None = None,
                   should_stop: Callable[[], bool] | None = None, **kw) -> dict[str, dict]:
    """Replace the integer weights ``<w>_quantized`` of every Conv / Gemm / MatMul in ``qdq_model`` (in
    place) by AdaRound's, keeping their ONNX type (int4 included). ``float_inits`` maps ``<w>`` to the float
    weight, ``layer_inputs`` a node NAME to its float input activations on calibration data (an array, or a
    list of per-feed arrays whose shapes may differ); nodes
    missing from either, with a shared weight or a blocked grid are left alone. ``kw`` goes to
    :func:`adaround`. ``cache`` (a plain dict the caller may keep, e.g. with ``np.savez``) maps a hex key
    of node, weight, input, grid, attributes and ``kw`` to the int32 result, so a repeated grid costs no
    optimization. Returns :func:`adaround`'s info per rewritten node, with ``"cached": False``, or just
    ``{"cached": True}`` when the integers came from ``cache``. ``should_stop`` is asked before each layer
    that needs an optimization; when it says so, :class:`Interrupted` is raised (``cache`` keeps the layers
    done)."""
    inits = {t.name: t for t in qdq_model.graph.initializer}
    producers = _weight_dq(qdq_model)
    uses: dict[str, int] = {}
    for n in qdq_model.graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    report: dict[str, dict] = {}
    for node in qdq_model.graph.node:
        if node.op_type not in LAYER_OPS or node.name not in layer_inputs or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or len(dq.input) < 2 or dq.input[0] not in inits or not dq.input[0].endswith("_quantized"):
            continue
        qname = dq.input[0]
        base = qname[: -len("_quantized")]
        attrs_dq = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        qtensor = inits[qname]
        has_zp = len(dq.input) > 2 and bool(dq.input[2])
        if (base not in float_inits or ONNX_INT_TYPES.get(qtensor.data_type, (32,))[0] > 16
                or uses.get(qname, 0) != 1 or uses.get(node.input[1], 0) != 1 or attrs_dq.get("block_size", 0)
                or dq.input[1] not in inits or (has_zp and dq.input[2] not in inits)):
            continue  # not a plain per-tensor / per-axis integer weight of this node alone
        bits, signed = ONNX_INT_TYPES[qtensor.data_type]
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        old = numpy_helper.to_array(qtensor)
        zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int32) if has_zp else np.zeros(scale.shape, np.int32)
        axis = attrs_dq.get("axis")
        w = np.asarray(float_inits[base], np.float32)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x = layer_inputs[node.name]
        x = stack_inputs(node.op_type, attrs, list(x)) if isinstance(x, (list, tuple)) else x
        key = None
        if cache is not None:
            key = _digest("adaround-v1", node.name, node.op_type, sorted(attrs.items()), w, x, scale, zp, qmin, qmax,
                          axis, sorted(kw.items()))
        if key is not None and key in cache:
            q, info = np.asarray(cache[key]), {"cached": True}
        else:
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped before AdaRound of {node.name} ({len(report)} layers done)")
            try:
                q, info = adaround(w, x, scale, zp, axis, qmin, qmax, node.op_type, attrs, **kw)
            except NotImplementedError:  # e.g. a 3-D Conv or a batched MatMul weight: left as ORT wrote it
                continue
            if key is not None:
                cache[key] = q
            info = dict(info, cached=False)
        qtensor.CopyFrom(numpy_helper.from_array(np.asarray(q).astype(old.dtype).reshape(old.shape), qname))
        report[node.name] = info
    return report


def collect_layer_inputs(float_model: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
                         nodes: list[str] | None = None) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Float input activations (first input, the samples joined by :func:`stack_inputs`, so they may
    differ in shape) of the Conv / Gemm / MatMul nodes of ``float_model`` (all, or those named in
    ``nodes``), keyed by node name."""
    from .bias_correction import tensor_values

    weights = {t.name for t in float_model.graph.initializer}
    wanted = [n for n in float_model.graph.node if n.op_type in LAYER_OPS and (nodes is None or n.name in nodes)
              and len(n.input) > 1 and n.input[1] in weights]  # activation x activation MatMuls have no weight
    values = tensor_values(float_model, sorted({n.input[0] for n in wanted}), samples)
    return {n.name: stack_inputs(n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
                                 values[n.input[0]]) for n in wanted}
