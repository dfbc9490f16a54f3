"""Loading, validating, hashing and preparing the float model.

Preparation: the graph clean-ups of autoquant.prepare (constant If folding, Constant -> initializer),
opset upgrade to >= 13 (per-channel QDQ needs it; Constant -> initializer again after it, for the Constants
the converter adds), ONNX Runtime's own ``quant_pre_process`` (symbolic shape inference; its graph
optimisation is left to the searched variants, see autoquant.variants), node naming, and a record of every
step plus a PreparationReport so the user can see what was changed and what stays float.

External data: a model file's external data is loaded from the model's folder only (locations outside it
are refused). The prepared model is one .onnx file, unless it is larger than LARGE_MODEL_BYTES: then its
tensors go to ``<name>.onnx.data`` next to it (protobuf cannot hold 2 GB in one file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ._io import atomic_write, sha256_bytes, sha256_file
from .errors import ModelError
from .prepare import (PreparationReport, check_external_data, constants_to_initializers, external_tensors,
                      prepare_graph, quantizable_summary)

MIN_OPSET = 13
LARGE_MODEL_BYTES = int(1.5 * 2**30)  # above this the prepared model's tensors are written as external data

#: ops whose quantization changes arithmetic (fallback / sensitivity candidates). Pure data movement
#: (Reshape, Transpose, MaxPool, ...) and removable activations (Relu, Clip) follow their producer.
COMPUTE_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
        "GlobalAveragePool", "Softmax", "Sigmoid", "LeakyRelu", "Resize", "LayerNormalization",
        "InstanceNormalization", "BatchNormalization", "Where",
    }
)

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
_log = logging.getLogger(__name__)


@dataclass
class PreparedModel:
    """The float model the search works on, plus what preparation did to it."""

    path: Path
    sha256: str
    input_specs: dict[str, tuple[int, tuple]]  # name -> (elem_type, shape with None for dynamic dims)
    steps: list[str] = field(default_factory=list)
    report: PreparationReport | None = None  # set by prepare_model (None when read back from a cache)

    def load(self) -> onnx.ModelProto:
        return onnx.load(str(self.path))  # external data, if any, is read from the model's folder


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load and check a model; every failure becomes a ModelError that says what to fix."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the ModelProto passed as `model`"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        where = str(path)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist: pass the path of a float .onnx model")
        if not path.is_file():
            raise ModelError(f"model path {path} is not a file: pass the path of a float .onnx model")
        proto = _load_file(path)
    else:
        raise ModelError(f"`model` must be a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")
    if unloaded := next(external_tensors(proto), None):
        raise ModelError(f"{where} refers to external data not loaded (tensor {unloaded[0]!r} in {unloaded[1]!r}): "
                         "pass the model's path instead, or load it with onnx.load(path) which reads the data")
    if not proto.graph.node:
        raise ModelError(f"{where} has an empty graph (no nodes): it is not a model that can be quantized")
    names = [n.name for n in proto.graph.node if n.name]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ModelError(f"{where} has {len(dup)} node name(s) used more than once ({[d[:60] for d in dup[:3]]}); "
                         "ONNX Runtime refuses such a model: give each node a unique name (or none) in the export")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"{where} fails onnx.checker ({exc}); fix the export before quantizing") from None
    return proto


def _load_file(path: Path) -> onnx.ModelProto:
    """Read ``path``; its external data only from files inside the model's folder (checked before reading)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, ...
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "check that the file is a complete .onnx export"
        ) from None
    check_external_data(proto, path.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise ModelError(f"the external data of {path} cannot be read ({type(exc).__name__}: {exc}); "
                         "check that the data files next to the model are complete") from None
    return proto


def model_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def input_specs(proto: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """Graph inputs that are fed at run time (initializers excluded), with dtype and shape."""
    inits = {i.name for i in proto.graph.initializer}
    specs = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs[vi.name] = (tt.elem_type, dims)
    return specs


def _byte_size(proto: onnx.ModelProto) -> int:
    try:
        return proto.ByteSize()
    except Exception:  # protobuf refuses messages over 2 GB
        return 2**31


def _save(proto: onnx.ModelProto, path: Path) -> Path | None:
    """One .onnx file, or ``path`` + ``<name>.data`` next to it when the model exceeds LARGE_MODEL_BYTES.

    Returns the external data file, if one was written. Writing external data moves the tensors out of
    ``proto`` (onnx.save does): do not reuse it afterwards.
    """
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # a stale one; onnx.save would also append to it
    if _byte_size(proto) <= LARGE_MODEL_BYTES:
        atomic_write(path, lambda tmp: onnx.save(proto, tmp))
        return None
    atomic_write(path, lambda tmp: onnx.save(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                                            location=data.name, size_threshold=1024))
    return data


def _model_sha256(path: Path, data: Path | None) -> str:
    """Hash of the model file, and of its external data file when there is one."""
    if data is None:
        return sha256_file(path)
    return sha256_bytes(sha256_file(path).encode(), sha256_file(data).encode())


def _upgrade_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Convert to MIN_OPSET when older, then turn Constant nodes into initializers once more: the converter
    writes the attributes that became inputs (Squeeze / Unsqueeze / Reduce axes, Split sizes, Clip bounds,
    ...) as new Constant nodes, and ORT only treats initializers as constant inputs (weights included)."""
    opset = model_opset(proto)
    if opset >= MIN_OPSET:
        return proto, []
    try:
        upgraded = onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:
        raise ModelError(f"model opset {opset} < {MIN_OPSET} and the upgrade failed ({exc}); "
                         f"re-export the model with opset >= {MIN_OPSET}") from None
    upgraded, moved = constants_to_initializers(upgraded)
    return upgraded, [f"opset upgraded {opset} -> {MIN_OPSET}"] + [f"after the opset upgrade: {s}" for s in moved]


def _infer_shapes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """ORT's quant_pre_process (symbolic shape inference), or ONNX shape inference if it fails."""
    with tempfile.TemporaryDirectory(prefix="autoquant-prep-") as tmp:
        src, dst = Path(tmp, "in.onnx"), Path(tmp, "out.onnx")
        large = _byte_size(proto) > LARGE_MODEL_BYTES
        _save(proto, src)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            # ORT's graph optimisation is skipped: it would fold BatchNorm, which is a searched knob here
            # (autoquant.variants / techniques.bn_fold).
            with _working_dir(tmp):  # ORT's symbolic shape inference dumps files into the cwd when it fails
                quant_pre_process(str(src), str(dst), skip_optimization=True, skip_symbolic_shape=False,
                                  save_as_external_data=large, all_tensors_to_one_file=True,
                                  external_data_location=f"{dst.name}.data")
            onnx.checker.check_model(str(dst))
            return onnx.load(str(dst)), ["onnxruntime quant_pre_process (symbolic shape inference)"]
        except Exception as exc:  # fall back to plain ONNX shape inference: still quantizable
            _log.warning("quant_pre_process failed (%s); using ONNX shape inference only", exc)
            onnx.shape_inference.infer_shapes_path(str(src), str(dst))
            return onnx.load(str(dst)), [f"onnx shape inference (quant_pre_process failed: {type(exc).__name__})"]


def prepare_model(proto: onnx.ModelProto, out_path: Path) -> PreparedModel:
    """Write the prepared float model to ``out_path`` and return what was done (``report``: what stays float)."""
    proto, steps = prepare_graph(proto)
    proto, more = _upgrade_opset(proto)
    steps += more
    prepared, more = _infer_shapes(proto)
    steps += more
    if named := ensure_node_names(prepared):
        steps.append(f"named {named} unnamed nodes")
    report = quantizable_summary(prepared, steps)
    specs = input_specs(prepared)
    data = _save(prepared, out_path)
    return PreparedModel(out_path, _model_sha256(out_path, data), specs, steps, report)


@contextlib.contextmanager
def _working_dir(path: str | Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def compute_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of nodes whose quantization changes arithmetic: the candidates for float fallback."""
    return [n.name for n in proto.graph.node if n.op_type in COMPUTE_OPS and n.name]


def float_activation_tensors(proto: onnx.ModelProto) -> list[str]:
    """Every float tensor produced at run time (graph inputs and node outputs) in graph order."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name for i in proto.graph.initializer}
    names: list[str] = []
    seen: set[str] = set()
    candidates = [vi.name for vi in proto.graph.input] + [o for n in proto.graph.node for o in n.output]
    for name in candidates:
        if name and name not in inits and name not in seen and types.get(name) in FLOAT_TYPES:
            seen.add(name)
            names.append(name)
    return names


def file_size_with_data(path: Path) -> int:
    """Bytes of a model file plus the external data files it refers to (each counted once)."""
    files = {loc for _, loc in external_tensors(onnx.load(str(path), load_external_data=False))}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def ensure_node_names(proto: onnx.ModelProto) -> int:
    """Give unnamed nodes a stable name (fallback and reports refer to nodes by name)."""
    used = {n.name for n in proto.graph.node if n.name}
    fixed = 0
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
            fixed += 1
    return fixed


NP_OF_ONNX = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.BOOL: np.bool_,
}
