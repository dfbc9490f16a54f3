"""The float model a deployment file refers to, and the check that the file reproduces the delivered model.

Encodings (AIMET), a TensorRT calibration cache and an ncnn table all describe a FLOAT model that the target
runtime quantizes itself. For the runtime to compute what autoquant scored, that float model must be the graph
the delivered QDQ model was built from, with every refinement in it: BatchNorm folded, CLE, bias correction,
and the integers AdaRound or ties-away rounding chose. :func:`float_graph` gets it from the delivered model
itself: each weight DequantizeLinear becomes a float initializer holding exactly the dequantized values
``(q - zero_point) * scale`` (so a quantizer given the same scale lands on the same integers, whatever
rounding produced them), and each activation QuantizeLinear -> DequantizeLinear pair is removed. Tensor
names are the delivered model's, except where ONNX Runtime renamed a quantized graph output's producer
(``logits_QuantizeLinear_Input`` is ``logits`` again).

:func:`roundtrip_max_abs_diff` rebuilds a QDQ model from that float model and an AIMET file with ONNX
Runtime's quantizer (:func:`autoquant.export.import_encodings`) and compares its outputs with the delivered
model's on calibration feeds. ONNX Runtime's quantizer has no "dequantize a QDQ model" step, hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ConfigError

#: suffix ORT gives the producer output of a quantized graph output
OUTPUT_SUFFIX = "_QuantizeLinear_Input"
#: ops of ONNX Runtime's dynamic quantization: activation scales computed at run time, in no file format
DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM",
                         "DynamicQuantizeMatMul"})
#: the file autoquant delivers next to quantized.onnx
DELIVERED_FLOAT_MODEL = "quantized.float.onnx"


@dataclass
class FloatGraph:
    model: onnx.ModelProto
    renamed: dict[str, str]  # delivered model's tensor name -> the float model's (only those that differ)
    quantized_activations: set[str]  # float-model names of the activations the delivered model quantizes


def refuse_dynamic(model: onnx.ModelProto, what: str) -> None:
    """ConfigError when ``model`` uses dynamic quantization (its activation scales exist only at run time)."""
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in DYNAMIC_OPS})
    if ops:
        raise ConfigError(f"{what}: the model uses dynamic quantization ({', '.join(ops)}): its activation scales "
                          f"are computed at run time and no encodings, calibration cache or table can hold them; "
                          f"deploy the QDQ model itself with ONNX Runtime, or search static / weight-only modes "
                          f"(e.g. mode: static in the space)")


def _array(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


def _dequantized(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int, name: str) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, as DequantizeLinear computes it (per tensor or per axis)."""
    if scale.size > 1:
        if scale.ndim != 1:
            raise ConfigError(f"weight {name}: block-wise quantization has no per-tensor / per-channel encoding")
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = None if zp is None else zp.reshape(shape)
    diff = q.astype(np.int64) - (0 if zp is None else zp.astype(np.int64))
    return (diff.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


#: ops ORT runs on quantized values unchanged (their input's scale and zero point carry over)
_MOVERS = frozenset({"Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice"})


def _quantized_constant_path(dq: onnx.NodeProto, producer: dict, inits: dict) -> bool:
    """``dq`` reads a data-movement op applied to a quantized constant, with one scale for the tensor."""
    mover = producer.get(dq.input[0])
    scale = _array(inits, dq.input[1]) if len(dq.input) > 1 else None
    return (mover is not None and mover.op_type in _MOVERS and bool(mover.input) and mover.input[0] in inits
            and scale is not None and scale.size == 1)


def float_graph(qdq: onnx.ModelProto) -> FloatGraph:
    """The float model the delivered QDQ model ``qdq`` quantizes (see the module docstring). Refuses
    (ConfigError) a dynamic-quantization model and Q/DQ layouts it cannot undo exactly."""
    refuse_dynamic(qdq, "no float model for encodings")
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    producer = {t: n for n in g.node for t in n.output}
    consumers: dict[str, list[tuple[int, onnx.NodeProto]]] = {}
    for j, m in enumerate(g.node):
        for t in m.input:
            consumers.setdefault(t, []).append((j, m))
    replace: dict[str, str] = {}  # tensor read by consumers -> the tensor they read instead
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    names_taken = {t for n in g.node for t in (*n.input, *n.output)} | set(inits) | {i.name for i in g.input}
    acts: set[str] = set()
    renamed: dict[str, str] = {}
    for i, n in enumerate(g.node):
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight, bias or other constant
            src = n.input[0]
            base = src.removesuffix("_quantized")
            name = base if base not in names_taken or base == n.output[0] else n.output[0]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            zp = _array(inits, n.input[2]) if len(n.input) > 2 and n.input[2] else None
            value = _dequantized(_array(inits, src), _array(inits, n.input[1]), zp, axis, base)
            new_inits.append(numpy_helper.from_array(value, name))
            names_taken.add(name)
            replace[n.output[0]] = name
            drop.add(i)
        elif n.op_type == "DequantizeLinear" and _quantized_constant_path(n, producer, inits):
            # a data-movement op on a quantized constant (ORT's Gather of an int8 embedding table): the op reads
            # the dequantized constant instead, and the DequantizeLinear's readers read the op's output
            mover = producer[n.input[0]]
            src = mover.input[0]
            name = src.removesuffix("_quantized")
            name = name if name not in names_taken else f"{src}_dequantized"
            zp = _array(inits, n.input[2]) if len(n.input) > 2 and n.input[2] else None
            new_inits.append(numpy_helper.from_array(
                _dequantized(_array(inits, src), _array(inits, n.input[1]), zp, 0, name), name))
            names_taken.add(name)
            mover.input[0] = name
            replace[n.output[0]] = n.input[0]
            drop.add(i)
        elif n.op_type == "QuantizeLinear":
            x = n.input[0]
            dqs = consumers.get(n.output[0], [])
            if x in inits or not dqs or any(m.op_type != "DequantizeLinear" for _, m in dqs):
                raise ConfigError(f"QuantizeLinear {n.name or n.output[0]} does not feed DequantizeLinear nodes only "
                                  f"(not a QDQ model as ONNX Runtime writes it)")
            drop.add(i)
            drop.update(j for j, _ in dqs)
            kept = x
            for _, m in dqs:
                if m.output[0] in outputs:  # ORT's renamed graph output: the producer gets its name back
                    kept = m.output[0]
            for _, m in dqs:
                replace[m.output[0]] = kept
            if kept != x:
                replace[x] = kept
                renamed[x] = kept
                if x in producer:
                    out = producer[x].output
                    out[list(out).index(x)] = kept
            acts.add(kept)
    leftover = [n.name or n.output[0] for i, n in enumerate(g.node) if i not in drop and n.op_type == "DequantizeLinear"]
    if leftover:
        raise ConfigError(f"DequantizeLinear node(s) {leftover[:3]} read neither a constant nor a QuantizeLinear")
    nodes = [n for i, n in enumerate(g.node) if i not in drop]
    for n in nodes:
        for k, t in enumerate(n.input):
            while t in replace and replace[t] != t:
                t = replace[t]
            n.input[k] = t
    del g.node[:]
    g.node.extend(nodes)
    used = {t for n in g.node for t in n.input} | outputs
    kept_inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    live = used | {t for n in g.node for t in n.output} | {i.name for i in g.input}
    vis = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vis)
    return FloatGraph(model, renamed, acts)


def rename_encodings(enc: dict, renamed: dict[str, str]) -> dict:
    """AIMET encodings read off the QDQ model, with the float model's tensor names."""
    out = dict(enc)
    for key in ("activation_encodings", "param_encodings"):
        entries = [dict(e, name=renamed.get(e["name"], e["name"])) for e in enc.get(key, [])]
        out[key] = sorted(entries, key=lambda e: e["name"])
    return out


def max_abs_diff(a_path: str | Path, b_path: str | Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """The largest absolute difference between the outputs of two models on ``feeds`` (ORT CPU, same options)."""
    from .sensitivity import run_outputs, session

    sa, sb = session(a_path), session(b_path)
    worst = 0.0
    for ya, yb in zip(run_outputs(sa, feeds), run_outputs(sb, feeds)):
        if ya.shape != yb.shape:
            return float("inf")
        if ya.size:
            worst = max(worst, float(np.max(np.abs(ya.astype(np.float64) - yb.astype(np.float64)))))
    return worst


def float_model_path(out_path: str | Path) -> Path:
    """Where an export to ``out_path`` puts its float model: ``<stem>.float.onnx`` beside it (the stem is the
    name up to its first dot: ``quantized.trt-calib.cache`` -> ``quantized.float.onnx``)."""
    out = Path(out_path)
    return out.with_name(out.name.split(".")[0] + ".float.onnx")


def deployment(qdq: onnx.ModelProto) -> tuple[FloatGraph, dict]:
    """The float model and the AIMET 1.0.0 encodings (named by that model's tensors, FLOAT entries for the float
    ones: :func:`autoquant.encodings.complete_encodings`) of the QDQ model."""
    from . import __version__
    from .encodings import complete_encodings, encodings_from_model

    fg = float_graph(qdq)
    return fg, complete_encodings(rename_encodings(encodings_from_model(qdq), fg.renamed), fg.model, __version__)


def save_float_model(fg: FloatGraph, path: Path) -> Path:
    """Write the float model atomically (external data beside it for a model protobuf cannot hold)."""
    from ._io import atomic_write
    from .variants import save_model

    return atomic_write(path, lambda tmp: save_model(fg.model, tmp, path.name + ".data"))


def roundtrip_max_abs_diff(float_path: Path, encodings_path: Path, delivered: Path,
                           feeds: list[dict[str, np.ndarray]]) -> float:
    """Rebuild a QDQ model from the float model and its encodings with ONNX Runtime's quantizer (as a user
    re-importing the file would) and return the largest absolute output difference with the delivered model
    on ``feeds`` (0.0: the file reproduces the delivered model bit for bit)."""
    import tempfile
    import warnings

    from .export import import_encodings

    with tempfile.TemporaryDirectory(prefix="autoquant-roundtrip-") as tmp:
        rebuilt = Path(tmp, "rebuilt.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # differences are what this measures
            import_encodings(float_path, encodings_path, rebuilt)
        return max_abs_diff(delivered, rebuilt, feeds)


def write_deployment(model_path: Path, out_dir: Path, encodings_name: str) -> tuple[Path, Path]:
    """The delivered model's float model (DELIVERED_FLOAT_MODEL) and its AIMET encodings, in ``out_dir``."""
    from ._io import atomic_write_json

    fg, enc = deployment(onnx.load(str(model_path)))
    float_path = save_float_model(fg, out_dir / DELIVERED_FLOAT_MODEL)
    return atomic_write_json(out_dir / encodings_name, enc), float_path


def is_dynamic(model_path: Path) -> bool:
    model = onnx.load(str(model_path), load_external_data=False)
    return any(n.op_type in DYNAMIC_OPS for n in model.graph.node)


def rebuild_from_tensorrt_cache(float_path: Path, cache: Path, out: Path) -> Path:
    """TensorRT's implicit int8 on the float model, emulated with ONNX Runtime's quantizer: the cache's activation
    scales (symmetric int8) and each Conv / Gemm / MatMul weight whose input has a scale re-quantized as TensorRT
    does it, symmetric int8 per output channel at max |w| / 127. A check of what the cache and the float model
    give together, not TensorRT itself (its kernels and fusions are its own)."""
    import json
    import struct
    import tempfile

    from .build import weight_channel_axes
    from .export import import_encodings

    model = onnx.load(str(float_path))
    scales = {}
    for line in Path(cache).read_text().splitlines()[1:]:
        name, hexed = line.split(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexed))[0]
    acts = [{"name": n, "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": True, "scale": [s],
             "offset": [-128]} for n, s in scales.items()]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    axes = weight_channel_axes(model)
    params = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[0] in scales and n.input[1] in axes:
            w, axis = inits[n.input[1]], axes[n.input[1]]
            peak = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
            s = np.where(peak > 0, peak / np.float32(127), 1).astype(np.float32)
            params.append({"name": n.input[1], "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": True,
                           "scale": [float(v) for v in s], "offset": [-128] * len(s)})
    with tempfile.TemporaryDirectory(prefix="autoquant-trt-") as tmp:
        enc = Path(tmp, "cache-as-encodings.json")
        enc.write_text(json.dumps({"version": "1.0.0", "activation_encodings": acts, "param_encodings": params}))
        return import_encodings(float_path, enc, out)
