"""Per-node sensitivity: quantize one compute node at a time, measure output SQNR vs fp32.

Measured once per study on a few cached calibration samples (no user eval) and cached on disk, keyed
by the statistics key (itself a hash of model and data), the prepared model and the number of samples;
each precision is measured only when asked for. Lowest SQNR = most sensitive = first to fall back.

How (:class:`SingleNodeModels`): per precision, ORT's ``quantize_static`` runs ONCE, on all candidate
nodes. Each node's Q/DQ are read off that fully quantized model (the tensors ORT quantized as the node's
inputs and outputs, its weight and bias), and "only node n quantized" is the float model plus those few
Q/DQ nodes: what ``quantize_static(nodes_to_quantize=[n])`` builds. Where ORT's choice depends on the
neighbours (an AveragePool is quantized only after a quantized input, and takes that input's scale),
the node gets nothing alone, or its own build. Only the part of the graph downstream of the Q/DQ runs,
from fp32 values of the upstream tensors computed once, in a model assembled from pre-serialized pieces
and opened from memory. :func:`measure_sensitivity_per_node` is the one-build-per-node reference, used
when the full build fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ._io import atomic_write_json
from .build import RangeCache, build_qdq_model, source_for
from .stats import Statistics

BASELINE = {
    "quantize_ops": "all",  # every node a scope can quantize is measured; a trial ranks those in its scope
    "calibration": "minmax", "percentile": None, "weight_granularity": "per_tensor", "weight_symmetric": True,
    "activation_symmetric": False, "weight_bits": 8, "activation_bits": 8, "weight_rounding": "nearest_even",
    "fallback_k": 0,
}

#: calibration feeds each node is measured on (the first ones of the statistics' samples)
MAX_SAMPLES = 2
#: bytes of fp32 tensor values kept (over all samples) to run, per node, only the part of the graph
#: downstream of it: every tensor when they fit, else a few checkpoints (the rest is recomputed)
MAX_CACHED_BYTES = 512 << 20
CACHE_VERSION = 2
#: cut models refer to float initializers above this size instead of holding a copy (one OrtValue each,
#: shared by every session)
SHARED_INITIALIZER_BYTES = 16 << 10
_SHAREABLE = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: ops ORT's QDQ quantizer quantizes only when their input already is, by a neighbour (with
#: ForceQuantizeNoInputCheck off, as autoquant.build sets it): alone, nothing of them is quantized
NEIGHBOUR_DEPENDENT_OPS = frozenset({
    "AveragePool", "MaxPool", "Resize", "Where", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
    "Slice", "Pad", "Split", "Gather", "GatherElements", "TopK",
})


def session(path: str | Path | bytes, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session on a model file (or serialized model bytes)."""
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def sqnr_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio in dB over all outputs (inf when identical)."""
    sig = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in reference)
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - t.astype(np.float64)))) for r, t in zip(reference, test))
    return _db(sig, noise)


def _db(sig: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(sig / noise))


def run_outputs(sess: ort.InferenceSession, samples: list[dict]) -> list[np.ndarray]:
    outs: list[np.ndarray] = []
    for feed in samples:
        outs.extend(np.asarray(o) for o in sess.run(None, feed))
    return outs


#: precisions each node is measured at, alone: the config that quantizes it
PRECISIONS = {
    "w8a8": BASELINE,
    "w4a8": {**BASELINE, "weight_bits": 4, "weight_granularity": "per_channel"},
    "w8a16": {**BASELINE, "activation_bits": 16},
}


def measure_sensitivity(prepared: Path, stats: Statistics, nodes: list[str], cache_dir: Path,
                        max_samples: int = MAX_SAMPLES, precisions: Iterable[str] | None = None,
                        time_budget: float | None = None) -> dict[str, dict[str, float]]:
    """Per node, per precision: SQNR (dB) of the model outputs vs fp32 when only that node is quantized.

    ``precisions``: the keys of PRECISIONS to measure (all by default). Ask only for what the search
    needs: w8a8 orders fallback_k and a16_k, w4a8 orders w4_fraction. The cache on disk keeps every
    (precision, node) measured so far, so a later call measures only what is missing. ``time_budget``
    (seconds, this call): nodes left when it runs out get no entry for that precision (:func:`rank_nodes`
    puts them in the middle); a later call measures them. Runs no user code.
    """
    precisions = list(PRECISIONS) if precisions is None else list(dict.fromkeys(precisions))
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {list(PRECISIONS)}")
    deadline = None if time_budget is None else time.monotonic() + time_budget
    cache = cache_dir / f"sensitivity-v{CACHE_VERSION}-{stats.key}-{_file_key(prepared)}-s{max_samples}.json"
    known = _read_cache(cache, nodes)
    samples = stats.samples[:max_samples]
    for precision in precisions:
        todo = [n for n in nodes if n not in known.get(precision, {})]
        if not todo or (deadline is not None and time.monotonic() >= deadline):
            continue
        measured = _measure_precision(prepared, stats, todo, PRECISIONS[precision], samples, deadline)
        known = _merge_into_cache(cache, nodes, {precision: measured})
    return {n: {p: known[p][n] for p in precisions if n in known.get(p, {})} for n in nodes}


def _measure_precision(prepared: Path, stats: Statistics, nodes: list[str], config: dict, samples: list[dict],
                       deadline: float | None) -> dict[str, float]:
    ranges = RangeCache(stats).ranges(config)
    try:
        singles = SingleNodeModels(prepared, ranges, config, nodes, samples)
    except Exception:  # ORT cannot quantize the whole set at once, or the model is too large for memory
        reference = run_outputs(session(prepared, fast_session_options()), samples)
        return measure_sensitivity_per_node(prepared, ranges, config, nodes, samples, reference, deadline)

    def one(node: str) -> float | None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        try:
            return singles.sqnr(node)
        except Exception:  # a node ORT cannot run quantized alone cannot hurt: rank it last
            return float("inf")

    workers = max(1, min(4, os.cpu_count() or 1, len(nodes)))
    with ThreadPoolExecutor(workers) as pool:  # ORT runs sessions without holding the GIL
        values = list(pool.map(one, nodes))
    return {n: v for n, v in zip(nodes, values) if v is not None}


def measure_sensitivity_per_node(prepared: Path, ranges: dict, config: dict, nodes: list[str], samples: list[dict],
                                 reference: list[np.ndarray], deadline: float | None = None) -> dict[str, float]:
    """The reference method: one ``quantize_static(nodes_to_quantize=[node])`` build and session per node
    (slow: a whole ORT quantizer pass per node). Sessions without graph optimisation, as the derived
    models: from level basic on, ORT's WeightBiasQuantization would also quantize the float weights of
    a neighbour whose input and output the node's Q/DQ happen to enclose (its noise is not the node's)."""
    result: dict[str, float] = {}
    options = fast_session_options()
    with tempfile.TemporaryDirectory(prefix="autoquant-sens-") as tmp:
        path = Path(tmp, "single.onnx")
        for node in nodes:
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                build_qdq_model(prepared, ranges, config, path, nodes_to_quantize=[node])
                result[node] = sqnr_db(reference, run_outputs(session(path, options), samples))
            except Exception:  # a node ORT cannot quantize alone cannot hurt: rank it last
                result[node] = float("inf")
    return result


def fast_session_options() -> ort.SessionOptions:
    """Options for many short-lived sessions run a few times each: no graph optimisation (it costs more
    to set up than it saves, and it would change what is quantized: see measure_sensitivity_per_node),
    one thread per session (sessions run side by side; the intra-op pool's spinning slows everything
    down on a busy machine)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return opts


# --------------------------------------------------------------------------------------------------------
# single-node models derived from one fully quantized model


@dataclass
class _Group:
    """The Q/DQ ORT put on one float tensor of the base graph, renamed to be inserted there."""

    tensor: str  # the float tensor (activation or initializer) in the base graph
    weight: bool  # a quantized initializer -> DQ, vs an activation -> Q -> DQ
    output: str  # the DQ output the consumers read instead of ``tensor``
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # (Q,) DQ
    params: tuple[str, ...] = ()  # the scale / zero point initializers' names in the fully quantized model
    initializers: list[onnx.TensorProto] = field(default_factory=list)  # scale, zero point, quantized weight


class SingleNodeModels:
    """"Only node n quantized" models, derived from one ``quantize_static`` of all ``nodes``, and their
    output SQNR vs fp32 on ``samples``.

    The model for node n is assembled as bytes: a serialized ModelProto followed by more serialized
    ModelProtos parses as their merge (repeated fields appended), so it is a head (opsets, ...) plus
    pre-serialized chunks per node and initializer. With ``cut`` it holds only the nodes whose values
    change -- the consumers of n's Q/DQ, transitively -- and what computes their other inputs from fp32
    values cached once (all tensors, or checkpoints when they exceed MAX_CACHED_BYTES; see
    :func:`_checkpoint_values`). Models with control flow (subgraphs) run whole.
    """

    def __init__(self, prepared: Path, ranges: dict, config: dict, nodes: list[str], samples: list[dict],
                 cut: bool = True):
        base_path = source_for(prepared, config)  # the opset-21 copy for int4 / int16, as the build uses
        base = onnx.load(str(base_path))
        if base.ByteSize() > 2**31 - 2**27:
            raise ValueError("model too large to serialize into memory")
        with tempfile.TemporaryDirectory(prefix="autoquant-sens-") as tmp:
            build_qdq_model(prepared, ranges, config, Path(tmp, "full.onnx"), nodes_to_quantize=list(nodes))
            full = onnx.load(str(Path(tmp, "full.onnx")))
            groups, node_groups = _read_groups(base, full, nodes)
            # Where ORT's choice for a node depends on its neighbours: an op it quantizes only after a
            # quantized input gets nothing alone; a node with a tensor that took another tensor's scale
            # gets its own build.
            types = {n.name: n.op_type for n in base.graph.node}
            self._own: dict[str, list[_Group]] = {n: [] for n in nodes if types.get(n) in NEIGHBOUR_DEPENDENT_OPS}
            shared = _shared_param_tensors(groups)
            self.exact = [n for n in nodes if n not in self._own and any(t in shared for t in node_groups.get(n, ()))]
            for n in self.exact:
                try:
                    build_qdq_model(prepared, ranges, config, Path(tmp, "single.onnx"), nodes_to_quantize=[n])
                    g, ng = _read_groups(base, onnx.load(str(Path(tmp, "single.onnx"))), [n])
                    self._own[n] = [g[t] for t in ng.get(n, ())]
                except Exception:  # ORT cannot quantize it alone: nothing of it is quantized
                    self._own[n] = []
        self._groups, self._node_groups = groups, node_groups
        graph = base.graph
        self._nodes = list(graph.node)
        self._graph_outputs = [o.name for o in graph.output]
        self._graph_inputs = {i.name: i for i in graph.input}
        self._consumers: dict[str, list[int]] = {}
        self._producer: dict[str, int] = {}
        for i, node in enumerate(self._nodes):
            for t in node.input:
                if t:
                    self._consumers.setdefault(t, []).append(i)
            for t in node.output:
                self._producer[t] = i
        self._node_chunks = [_chunk(node=[n]) for n in self._nodes]
        self._init_chunks = {t.name: _chunk(initializer=[t]) for t in graph.initializer}
        self.samples = samples
        # fp32 values per sample of the tensors the cut graphs start from (None: whole graphs run)
        self.values: list[dict[str, np.ndarray]] | None = None
        self.cached: set[str] = set()
        subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in graph.node for a in n.attribute)  # outer-scope inputs: not cut
        if cut and not subgraphs and not graph.sparse_initializer:
            try:
                self.values, self.cached = _checkpoint_values(base, samples, MAX_CACHED_BYTES)
            except Exception:  # a node output that is not a tensor, ...: run whole graphs instead
                self.values = None
        # large float weights of cut models: one OrtValue each, handed to every session instead of a copy
        self._shared: dict[str, ort.OrtValue] = {}
        for t in graph.initializer if self.values is not None else ():
            if t.data_type in _SHAREABLE and t.ByteSize() > SHARED_INITIALIZER_BYTES:
                value = numpy_helper.to_array(t).copy(order="C")
                self._shared[t.name] = ort.OrtValue.ortvalue_from_numpy(value)
                self._init_chunks[t.name] = _chunk(initializer=[_external_stub(t)])
        head = onnx.ModelProto()
        head.CopyFrom(base)
        if self.values is None:
            self.reference = run_outputs(session(prepared, fast_session_options()), samples)
            del head.graph.node[:]
        else:
            self.reference = [v[o] for v in self.values for o in self._graph_outputs]
            for name in ("node", "initializer", "input", "output", "value_info"):
                head.graph.ClearField(name)
        self._head = head.SerializeToString()
        self._signal = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in self.reference)
        self._options = fast_session_options()

    def groups_of(self, node: str) -> list[_Group]:
        if node in self._own:
            return self._own[node]
        return [self._groups[t] for t in self._node_groups.get(node, ())]

    def sqnr(self, node: str) -> float:
        """Output SQNR (dB) vs fp32 with only ``node`` quantized: inf when ORT quantizes nothing of it."""
        if not self.groups_of(node):
            return float("inf")
        data, inputs, outputs, shared = self.model_bytes(node)
        options = self._options
        if shared:
            options = fast_session_options()
            options.add_external_initializers(shared, [self._shared[t] for t in shared])
        sess = session(data, options)
        noise = 0.0
        for s, sample in enumerate(self.samples):
            feed = sample if self.values is None else {name: self.values[s][name] for name in inputs}
            got = sess.run(outputs, feed)
            for name, value in zip(outputs, got):
                ref = self.reference[s * len(self._graph_outputs) + self._graph_outputs.index(name)]
                noise += float(np.sum(np.square(ref.astype(np.float64) - np.asarray(value).astype(np.float64))))
        return _db(self._signal, noise)

    def model_bytes(self, node: str) -> tuple[bytes, list[str], list[str], list[str]]:
        """The model with only ``node``'s Q/DQ: (serialized model, its inputs, its outputs, the shared
        initializers it refers to: their data is not in the bytes but passed to the session)."""
        groups = self.groups_of(node)
        renamed_inputs: dict[int, dict[str, str]] = {}  # node index -> {float tensor: DQ output}
        renamed_outputs: dict[int, dict[str, str]] = {}  # producer of a graph output -> {output: Q input}
        after: dict[int, list[onnx.NodeProto]] = {}  # Q/DQ placed after their producer's index
        for g in groups:
            qdq = [onnx.NodeProto() for _ in g.nodes]
            for new, old in zip(qdq, g.nodes):
                new.CopyFrom(old)
            producer = self._producer.get(g.tensor, -1)
            if not g.weight and g.tensor in self._graph_outputs and producer >= 0:  # as ORT: DQ takes the name
                renamed_outputs.setdefault(producer, {})[g.tensor] = qdq[0].input[0] = f"{g.tensor}__aq_float"
                qdq[-1].output[0] = g.tensor
            else:
                for i in self._consumers.get(g.tensor, ()):
                    renamed_inputs.setdefault(i, {})[g.tensor] = g.output
            after.setdefault(producer, []).extend(qdq)
        keep = list(range(len(self._nodes))) if self.values is None else self._cut(groups)
        kept = set(keep)
        first = [n for i, qdq in after.items() if i not in kept for n in qdq]  # weights, fed activations
        chunks = [self._head, *(_chunk(node=[n]) for n in first)]
        final = list(first)  # the nodes of the model, for what the cut graph reads and makes
        for i in keep:
            if i in renamed_inputs or i in renamed_outputs:
                n = onnx.NodeProto()
                n.CopyFrom(self._nodes[i])
                ins, outs = renamed_inputs.get(i, {}), renamed_outputs.get(i, {})
                for j, t in enumerate(n.input):
                    n.input[j] = ins.get(t, t)
                for j, t in enumerate(n.output):
                    n.output[j] = outs.get(t, t)
                chunks.append(_chunk(node=[n]))
            else:
                n = self._nodes[i]
                chunks.append(self._node_chunks[i])
            final.append(n)
            final.extend(after.get(i, ()))
            chunks.extend(_chunk(node=[n]) for n in after.get(i, ()))
        extra = {t.name: t for g in groups for t in g.initializers}
        if extra:
            chunks.append(_chunk(initializer=list(extra.values())))
        if self.values is None:
            return b"".join(chunks), list(self._graph_inputs), list(self._graph_outputs), []
        # the cut graph: initializers it reads, fp32 values for the rest it reads, graph outputs it makes
        used = {t for n in final for t in n.input if t}
        made = {t for n in final for t in n.output if t}
        initializers = sorted(t for t in used if t in self._init_chunks)
        chunks.extend(self._init_chunks[t] for t in initializers)
        inputs = sorted(t for t in used if t not in made and t not in self._init_chunks and t not in extra)
        assert all(t in self.cached for t in inputs), "cut graph reads a tensor that is not cached"
        outputs = [o for o in self._graph_outputs if o in made]
        values = self.values[0]
        chunks.append(_chunk(
            input=[self._graph_inputs.get(t) or helper.make_tensor_value_info(
                t, helper.np_dtype_to_tensor_dtype(values[t].dtype), None) for t in inputs],
            output=[helper.make_empty_tensor_value_info(o) for o in outputs]))
        return b"".join(chunks), inputs, outputs, [t for t in initializers if t in self._shared]

    def _cut(self, groups: list[_Group]) -> list[int]:
        """Indices of the nodes to run: the consumers of the Q/DQ, transitively, then whatever computes
        their other inputs from the cached fp32 tensors (recomputed from the last cached ones)."""
        kept: set[int] = set()
        stack = [g.tensor for g in groups]
        while stack:
            for i in self._consumers.get(stack.pop(), ()):
                if i not in kept:
                    kept.add(i)
                    stack.extend(self._nodes[i].output)
        for g in groups:  # a quantized graph output is renamed at its producer (as ORT does)
            if not g.weight and g.tensor in self._graph_outputs and g.tensor in self._producer:
                kept.add(self._producer[g.tensor])
        need = [t for i in kept for t in self._nodes[i].input] + [g.tensor for g in groups if not g.weight]
        made = {t for i in kept for t in self._nodes[i].output}
        while need:
            t = need.pop()
            if not t or t in made or t in self._init_chunks or t in self.cached:
                continue
            i = self._producer[t]
            kept.add(i)
            made.update(self._nodes[i].output)
            need.extend(self._nodes[i].input)
        return sorted(kept)

    def model(self, node: str) -> onnx.ModelProto:
        """The model ``node`` is measured on (shared initializers as external-data stubs)."""
        return onnx.load_from_string(self.model_bytes(node)[0])


def _chunk(**graph_fields) -> bytes:
    return onnx.ModelProto(graph=onnx.GraphProto(**graph_fields)).SerializeToString()


def _external_stub(t: onnx.TensorProto) -> onnx.TensorProto:
    """``t`` without its data, marked external: the session gets the data through
    ``SessionOptions.add_external_initializers`` (the location is never read)."""
    stub = onnx.TensorProto()
    stub.name, stub.data_type = t.name, t.data_type
    stub.dims.extend(t.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    nbytes = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    for key, value in (("location", "autoquant-shared"), ("offset", "0"), ("length", str(nbytes))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def _checkpoint_values(model: onnx.ModelProto, samples: list[dict],
                       budget: int) -> tuple[list[dict[str, np.ndarray]], set[str]]:
    """fp32 values on each sample of the graph outputs and of the tensors to cache, and the names of all
    cached tensors (graph inputs included). Every tensor when they fit in ``budget`` bytes; else the
    live tensors at a few cheap points spread over the graph (:func:`_checkpoints`). Peak memory: every
    tensor of one sample, as the statistics pass holds."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in inits}
    outputs = [o.name for o in graph.output]
    produced = list(dict.fromkeys(t for n in graph.node for t in n.output if t))
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    aug.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in produced if t not in set(outputs))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as in the graph
    sess = session(aug.SerializeToString(), opts)
    names = [o.name for o in sess.get_outputs()]
    first = dict(zip(names, (np.asarray(v) for v in sess.run(names, samples[0]))))
    if any(v.dtype == object for v in first.values()):
        raise TypeError("a node output is not a tensor")
    size = {t: v.nbytes for t, v in first.items()}
    per_sample = budget // max(1, len(samples))
    chosen = set(produced) if sum(size.values()) <= per_sample else _checkpoints(graph, inputs, size, per_sample)
    keep = list(dict.fromkeys([*outputs, *(t for t in produced if t in chosen)]))
    values = [{**samples[0], **{t: first[t] for t in keep}}]
    del first
    for sample in samples[1:]:
        values.append({**sample, **dict(zip(keep, (np.asarray(v) for v in sess.run(keep, sample))))})
    return values, chosen | inputs | set(outputs)


def _checkpoints(graph: onnx.GraphProto, inputs: set[str], size: dict[str, int], budget: int) -> set[str]:
    """Tensors to cache within ``budget`` bytes: the graph is split into k equal runs of nodes, and in
    each the point where the tensors alive (made before, used after) take the fewest bytes gives its
    live tensors; k halves until they fit. A cut graph then recomputes at most one run of nodes."""
    nodes = list(graph.node)
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            last_use[t] = i
    live: set[str] = set()
    points: list[tuple[int, frozenset[str]]] = []
    for i, n in enumerate(nodes):
        live = {t for t in live if last_use[t] > i} | {t for t in n.output if t and last_use.get(t, -1) > i}
        live -= inputs
        points.append((sum(size.get(t, 0) for t in live), frozenset(live)))
    k = len(points)
    while k >= 1:
        bounds = np.linspace(0, len(points), k + 1).astype(int)
        chosen = set().union(*(min(points[a:b], key=lambda p: p[0])[1] for a, b in zip(bounds, bounds[1:]) if b > a))
        if sum(size.get(t, 0) for t in chosen) <= budget:
            return chosen
        k //= 2
    return set()


def _shared_param_tensors(groups: dict[str, _Group]) -> set[str]:
    """Tensors whose Q/DQ use a scale or zero point another tensor's Q/DQ uses too (ORT's shared params)."""
    users: dict[str, int] = {}
    for g in groups.values():
        for name in g.params:
            users[name] = users.get(name, 0) + 1
    return {t for t, g in groups.items() if any(users[name] > 1 for name in g.params)}


def _read_groups(base: onnx.ModelProto, full: onnx.ModelProto,
                 nodes: list[str]) -> tuple[dict[str, _Group], dict[str, list[str]]]:
    """Per float tensor of ``base``, the Q/DQ ``full`` has on it; per node, the tensors that are its own
    (its quantized inputs, weights and bias included, and outputs): what ORT quantizes for it alone."""
    full_inits = {t.name: t for t in full.graph.initializer}
    producer = {o: n for n in full.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in full.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    base_nodes = {n.name: n for n in base.graph.node}
    full_nodes = {n.name: n for n in full.graph.node if n.op_type not in _QDQ_OPS}
    groups: dict[str, _Group] = {}
    node_groups: dict[str, list[str]] = {}

    def add(tensor: str, dq: onnx.NodeProto) -> None:
        if tensor in groups:
            return
        q = producer.get(dq.input[0])
        if (q is not None and q.op_type != "QuantizeLinear") or (q is None and dq.input[0] not in full_inits):
            raise ValueError(f"unexpected Q/DQ pattern on {tensor!r}")
        k = len(groups)
        g = _Group(tensor, weight=q is None, output=f"{tensor}__aq_dq{k}", params=tuple(dq.input[1:]))
        renames: dict[str, str] = {}
        for n in ([] if q is None else [q]) + [dq]:
            new = onnx.NodeProto()
            new.CopyFrom(n)
            new.name = f"__aq_{k}_{n.op_type}"
            for j, t in enumerate(new.input):
                if t in full_inits:
                    if t not in renames:
                        renames[t] = f"__aq_{k}_{len(renames)}"
                        init = onnx.TensorProto()
                        init.CopyFrom(full_inits[t])
                        init.name = renames[t]
                        g.initializers.append(init)
                    new.input[j] = renames[t]
            if n is q:
                new.input[0], new.output[0] = tensor, f"{tensor}__aq_q{k}"
            else:
                if q is not None:
                    new.input[0] = f"{tensor}__aq_q{k}"
                new.output[0] = g.output
            g.nodes.append(new)
        groups[tensor] = g

    for name in nodes:
        fn, bn = full_nodes.get(name), base_nodes.get(name)
        if fn is None or bn is None or len(fn.input) != len(bn.input) or len(fn.output) != len(bn.output):
            continue  # not the same node in both graphs: nothing attributed to it
        own: list[str] = []
        for ft, bt in zip(fn.input, bn.input):
            dq = producer.get(ft) if ft else None
            if dq is not None and dq.op_type == "DequantizeLinear":
                add(bt, dq)
                own.append(bt)
        for ft, bt in zip(fn.output, bn.output):
            for q in consumers.get(ft, ()):
                for dq in consumers.get(q.output[0], ()) if q.op_type == "QuantizeLinear" else ():
                    if dq.op_type == "DequantizeLinear":
                        add(bt, dq)
                        own.append(bt)
        node_groups[name] = list(dict.fromkeys(own))
    return groups, node_groups


# --------------------------------------------------------------------------------------------------------
# cache and ranking


def _read_cache(path: Path, nodes: list[str]) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != CACHE_VERSION or data.get("nodes") != nodes:
        return {}
    return {p: {n: float(v) for n, v in d.items()} for p, d in data.get("sqnr_db", {}).items()}


def _merge_into_cache(path: Path, nodes: list[str], new: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add ``new`` to what the cache holds now (another worker may have written meanwhile); returns the union."""
    known = _read_cache(path, nodes)
    for p, d in new.items():
        known.setdefault(p, {}).update(d)
    atomic_write_json(path, {"version": CACHE_VERSION, "nodes": nodes, "sqnr_db": {
        p: {n: (v if np.isfinite(v) else str(v)) for n, v in d.items()} for p, d in known.items()}})
    return known


def _file_key(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def rank_nodes(sensitivity: dict[str, dict[str, float]], precision: str = "w8a8") -> list[str]:
    """Most sensitive first (lowest SQNR at ``precision``); ties keep graph order.

    A node with no value at ``precision`` (missing or None: the time budget ran out) ranks as the median
    measured node, in the middle: neither the float fallback (front) nor the 4-bit weights (back) take it
    first.
    """
    order = {n: i for i, n in enumerate(sensitivity)}
    finite = [v for d in sensitivity.values() if (v := d.get(precision)) is not None and np.isfinite(v)]
    middle = float(np.median(finite)) if finite else 0.0

    def key(n: str) -> tuple[float, int]:
        v = sensitivity[n].get(precision)
        return (middle if v is None else v, order[n])

    return sorted(sensitivity, key=key)
