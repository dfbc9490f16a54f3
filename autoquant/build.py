"""One trial's config + cached statistics -> a QDQ model, built by ONNX Runtime's quantizer.

Per-trial ranges go to ``quantize_static`` through its calibration cache (so no calibration inference
runs), bit widths / symmetry / granularity through its arguments, float fallback through
``nodes_to_exclude``. Only what ORT lacks is done here: ties-away-from-zero rounding of weights.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from ._io import atomic_write
from . import scope
from .observers import make_observer
from .modes import build_dynamic, build_weight_only
from .qtypes import ONNX_INT_TYPES, quant_type, weight_quant_type
from .stats import Statistics
from .variants import save_model

ROUNDING_MODES = ("nearest_even", "nearest_away")


@dataclass
class BuildInfo:
    path: Path
    n_qdq_nodes: int
    float_nodes: list[str] = field(default_factory=list)
    refinements: dict[str, Any] = field(default_factory=dict)  # what rounding / bias correction changed


class RangeCache:
    """Activation ranges per (method, params, bits, symmetric), derived once from the statistics."""

    def __init__(self, stats: Statistics):
        self.stats = stats
        self._cache: dict[tuple, dict[str, tuple[float, float]]] = {}

    def ranges(self, config: dict[str, Any], tensors: set[str] | None = None) -> dict[str, tuple[float, float]]:
        """Ranges of ``tensors`` (every tensor with statistics when None): a narrow quantization scope asks
        only for the tensors around the nodes it quantizes (entropy / percentile cost ~70 ms a tensor)."""
        observer = make_observer(config["calibration"], config.get("percentile"))
        key = observer.cache_key() + (config["activation_bits"], config["activation_symmetric"])
        known = self._cache.setdefault(key, {})
        wanted = self.stats.tensors if tensors is None else [t for t in tensors if t in self.stats.tensors]
        bits, sym = config["activation_bits"], config["activation_symmetric"]
        for name in wanted:
            if name not in known:
                known[name] = observer.range(self.stats.tensors[name], bits, sym)
        return {name: known[name] for name in wanted}


def weight_channel_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Output-channel axis of each weight initializer, as ONNX Runtime's per-channel QDQ uses it."""
    inits = {t.name for t in model.graph.initializer}
    axes: dict[str, int] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Conv":
            axes[node.input[1]] = 0
        elif node.op_type in ("ConvTranspose", "MatMul"):
            axes[node.input[1]] = 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes[node.input[1]] = 0 if trans_b else 1
    return axes


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, exactly: ``x - trunc(x)`` is exact in floating point, while
    ``floor(|x| + 0.5)`` rounds 0.49999997 up in float32."""
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= 0.5)


def requantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None, qmin: int, qmax: int,
               mode: str) -> np.ndarray:
    """Integer weights for ``w`` on the given grid with the given rounding (ORT's formula otherwise)."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * w.ndim
        shape[axis if axis is not None else 1] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    x = w.astype(np.float32) / scale.astype(np.float32)
    r = np.round(x) if mode == "nearest_even" else round_half_away(x)
    return np.clip(r + zp.astype(np.float32), qmin, qmax)


def apply_weight_rounding(qdq: onnx.ModelProto, float_inits: dict[str, np.ndarray], mode: str) -> int:
    """Rewrite quantized weight initializers with ``mode`` rounding. Returns how many integers changed.

    ORT quantizes with numpy's round (ties to even) and has no option for other rounding, so the
    integer weights it wrote are recomputed here from the float weights, with its own scales.
    """
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {mode!r}; choose one of {ROUNDING_MODES}")
    inits = {t.name: t for t in qdq.graph.initializer}
    changed = 0
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        qname = node.input[0]
        base = qname[: -len("_quantized")] if qname.endswith("_quantized") else None
        if base not in float_inits or len(node.input) < 3 or node.input[2] not in inits:
            continue
        qtensor = inits[qname]
        if qtensor.data_type not in ONNX_INT_TYPES or ONNX_INT_TYPES[qtensor.data_type][0] > 16:
            continue  # int32 biases stay as ORT computed them
        bits, signed = ONNX_INT_TYPES[qtensor.data_type]
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        old = numpy_helper.to_array(qtensor)
        new = requantize(float_inits[base], scale, zp, axis, qmin, qmax, mode).astype(old.dtype)
        changed += int(np.count_nonzero(new.astype(np.int32) != old.astype(np.int32)))
        qtensor.CopyFrom(numpy_helper.from_array(new, qname))
    return changed


OPSET_FOR_LOW_OR_WIDE_BITS = 21  # int4 / int16 QuantizeLinear & DequantizeLinear


@dataclass(frozen=True)
class MixedPrecision:
    """Per-node exceptions to the config's bit widths (float fallback goes through nodes_to_exclude)."""

    a16_nodes: tuple[str, ...] = ()  # inputs and outputs of these nodes get 16-bit activations
    w4_nodes: tuple[str, ...] = ()  # these nodes' weights get 4 bits

    def __bool__(self) -> bool:
        return bool(self.a16_nodes or self.w4_nodes)


def mixed_overrides(model: onnx.ModelProto, config: dict[str, Any], mixed: MixedPrecision,
                    axes: dict[str, int], base: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """TensorQuantOverrides for ``mixed`` on top of ``base``. In QDQ every tensor has its own Q/DQ
    pair, so a tensor's type can differ from its neighbours' (ORT then runs that op unfused)."""
    inits = {t.name for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = {k: [dict(v[0])] for k, v in base.items()}
    per_channel = config["weight_granularity"] == "per_channel"
    a16 = quant_type(16, bool(config["activation_symmetric"]))
    for name in mixed.a16_nodes:
        node = nodes.get(name)
        for t in [] if node is None else [*node.input, *node.output]:
            if t and t not in inits:
                out.setdefault(t, [{}])[0]["quant_type"] = a16
    for name in mixed.w4_nodes:
        node = nodes.get(name)
        if node is None or len(node.input) < 2 or node.input[1] not in inits:
            continue
        entry = out.setdefault(node.input[1], [{}])[0]
        entry["quant_type"] = weight_quant_type(4, bool(config["weight_symmetric"]))
        if per_channel and node.input[1] in axes:
            entry["axis"] = axes[node.input[1]]  # a per-tensor override would turn per-channel off
    return out


def source_for(prepared_path: Path, config: dict[str, Any], mixed: MixedPrecision | None = None) -> Path:
    """The prepared model, or its opset-21 copy when the config uses int4 / int16.

    ORT would upgrade the opset inside every such quantize_static call; converting once and keeping
    the copy next to the prepared model saves that per trial.
    """
    if config["weight_bits"] == 8 and config["activation_bits"] == 8 and not mixed:
        return prepared_path
    target = prepared_path.with_name(f"{prepared_path.stem}-opset{OPSET_FOR_LOW_OR_WIDE_BITS}.onnx")
    if not target.exists():
        model = onnx.load(str(prepared_path))
        opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
        if opset >= OPSET_FOR_LOW_OR_WIDE_BITS:
            return prepared_path
        converted = onnx.version_converter.convert_version(model, OPSET_FOR_LOW_OR_WIDE_BITS)
        atomic_write(target, lambda tmp: save_model(converted, tmp, data_name=f"{target.name}.data"))
    return target


def _build_static(prepared_path: Path, ranges: dict, config: dict[str, Any], fallback_nodes, nodes_to_quantize,
                  mixed: MixedPrecision | None, writer_options: dict[str, Any] | None) -> onnx.ModelProto:
    """ORT quantize_static from the given activation ranges (via its calibration cache: no inference)."""
    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {n: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32)) for n, (lo, hi) in ranges.items()},
    )
    wsym, asym = bool(config["weight_symmetric"]), bool(config["activation_symmetric"])
    extra = {
        "ActivationSymmetric": asym,
        "WeightSymmetric": wsym,
        "ForceQuantizeNoInputCheck": False,
        **(writer_options or {}),  # how a target runtime wants the QDQ model written (space file `target:`)
    }
    per_channel = config["weight_granularity"] == "per_channel"
    if (per_channel and not wsym) or mixed:
        graph = onnx.load(str(prepared_path), load_external_data=False)
        axes = weight_channel_axes(graph)
        overrides: dict[str, list[dict]] = {}
        if per_channel and not wsym:
            # ORT forces per-channel weights symmetric unless a per-channel override says otherwise.
            overrides = {w: [{"symmetric": False, "axis": a}] for w, a in axes.items()}
        if mixed:
            overrides = mixed_overrides(graph, config, mixed, axes, overrides)
        extra["TensorQuantOverrides"] = overrides
    quiet = logging.getLogger()
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="autoquant-build-") as tmp:
        cache = Path(tmp, "ranges.json")
        save_tensors_data(tensors, cache)
        raw = Path(tmp, "qdq.onnx")
        quiet.setLevel(logging.ERROR)  # ORT logs a pre-processing hint on every call
        try:
            quantize_static(
                str(source_for(prepared_path, config, mixed)), str(raw), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=quant_type(config["activation_bits"], asym),
                weight_type=weight_quant_type(config["weight_bits"], wsym),
                nodes_to_exclude=list(fallback_nodes), nodes_to_quantize=nodes_to_quantize,
                op_types_to_quantize=scope.op_types(config.get("quantize_ops", "all")),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra, calibration_cache_path=str(cache),
            )
        finally:
            quiet.setLevel(level)
        return onnx.load(str(raw))


#: ops whose float weights ONNX Runtime's WeightBiasQuantization pass quantizes (int8 per tensor) at session
#: creation when their input 0 comes from a DequantizeLinear, i.e. a "float" fallback between quantized nodes
WBQ_OPS = ("Conv", "ConvTranspose", "Gemm")


def keep_fallback_float(model: onnx.ModelProto, fallback_nodes) -> int:
    """Feed each fallback Conv / ConvTranspose / Gemm the float tensor instead of its Q->DQ copy.

    ORT's QDQ writer puts Q->DQ on a tensor its quantized producer writes, also in front of an excluded
    consumer; ORT's default session optimisations then see DQ -> Conv(float weight) and quantize that
    weight to int8 per tensor, so the node the search kept float would run quantized. Reading the float
    tensor makes the fallback real (no input quantization either). Returns the number of nodes rewired.
    """
    fallback = set(fallback_nodes)
    producer = {o: n for n in model.graph.node for o in n.output}
    changed = 0
    for node in model.graph.node:
        if node.name not in fallback or node.op_type not in WBQ_OPS:
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        clip = _saturation(model, q)
        if clip is None:
            continue
        lo, hi = clip
        # ORT's writer removes a Relu / Clip whose output it quantizes (the Q's range saturates the same
        # way), so the float tensor may lack that activation: a Clip to the Q's range restores it.
        name = f"{node.name}_fallback_input"
        model.graph.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), f"{name}_min"),
                                        numpy_helper.from_array(np.array(hi, np.float32), f"{name}_max")])
        model.graph.node.append(onnx.helper.make_node("Clip", [q.input[0], f"{name}_min", f"{name}_max"], [name],
                                                      name=f"{name}_clip"))
        node.input[0] = name
        changed += 1
    if changed:  # drop Q / DQ nodes nobody reads any more
        while True:
            used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
            dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    and not any(o in used for o in n.output)]
            if not dead:
                break
            for n in dead:
                model.graph.node.remove(n)
        used = {i for n in model.graph.node for i in n.input}
        for t in [t for t in model.graph.initializer if t.name not in used]:  # their scales / zero points
            model.graph.initializer.remove(t)
        _topological_sort(model.graph)
    return changed


def _saturation(model: onnx.ModelProto, q: onnx.NodeProto) -> tuple[float, float] | None:
    """The float range a per-tensor QuantizeLinear saturates to, or None if it is not per tensor."""
    inits = {t.name: t for t in model.graph.initializer}
    if len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
        return None
    scale, zp = numpy_helper.to_array(inits[q.input[1]]), numpy_helper.to_array(inits[q.input[2]])
    if scale.size != 1 or zp.dtype.kind not in "iu" or zp.dtype.itemsize > 2:
        return None
    info = np.iinfo(zp.dtype)
    s, z = float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
    return (info.min - z) * s, (info.max - z) * s


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before it is read (the inserted Clips were appended)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or an outer-scope input: keep the remaining order
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def build_qdq_model(
    prepared_path: Path,
    ranges: dict[str, tuple[float, float]],
    config: dict[str, Any],
    out_path: Path,
    fallback_nodes: list[str] = (),
    float_inits: dict[str, np.ndarray] | None = None,
    nodes_to_quantize: list[str] | None = None,
    refine: Callable[[onnx.ModelProto], dict[str, Any]] | None = None,
    mixed: MixedPrecision | None = None,
    writer_options: dict[str, Any] | None = None,
) -> BuildInfo:
    """Quantize ``prepared_path`` per ``config`` with activation ``ranges``; write ``out_path`` atomically.

    ``refine`` (a :class:`autoquant.refine.Refiner`'s ``apply`` bound to the config) rewrites weights
    after ORT (rounding mode, AdaRound, bias correction). Without it only ties-away rounding is
    available, from ``float_inits`` (or the prepared model's initializers).
    """
    mode = config.get("mode", "static")
    if mode == "dynamic":
        model = build_dynamic(prepared_path, config, out_path, list(fallback_nodes))
    elif mode == "weight_only":
        source = source_for(prepared_path, config, mixed)
        graph = onnx.load(str(source))
        model = build_weight_only(graph, config, list(fallback_nodes), weight_channel_axes(graph),
                                  mixed.w4_nodes if mixed else ())
    else:
        model = _build_static(prepared_path, ranges, config, fallback_nodes, nodes_to_quantize, mixed, writer_options)
        keep_fallback_float(model, fallback_nodes)
    if refine is not None:
        details = refine(model)
    elif config.get("weight_rounding") == "adaround" or config.get("bias_correction"):
        raise ValueError("AdaRound and bias correction need calibration samples: pass refine=Refiner(...).apply")
    elif config["weight_rounding"] == "nearest_away":
        if float_inits is None:
            float_inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(prepared_path)).graph.initializer}
        details = {"reround_changed": apply_weight_rounding(model, float_inits, config["weight_rounding"])}
    else:
        details = {}
    atomic_write(out_path, lambda p: onnx.save(model, p))
    n_qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return BuildInfo(out_path, n_qdq, list(fallback_nodes), details)
