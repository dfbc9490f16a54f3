"""Graph clean-ups that make an exported ONNX model quantizable, each reported, plus what stays float.

Every step takes an ``onnx.ModelProto`` and returns ``(new_model, steps)``; the input is never modified.

    fold_constant_ifs          If with a constant condition -> the nodes of the taken branch
    constants_to_initializers  Constant nodes -> initializers (ORT quantizes weights only if they are initializers)
    unhandled_subgraph_nodes   nodes inside the If / Loop / Scan that remain (ORT's QDQ quantizer skips them)
    check_external_data        external-data locations must stay inside the model's folder
    quantizable_summary        a PreparationReport: how many nodes ORT can quantize, which stay float and why

This module depends on nothing else in autoquant except its errors (autoquant.model imports it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Iterator

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from .errors import ModelError

#: Op types ``quantize_static`` quantizes by default (it uses the union of these two registries); every
#: other op stays float.
QUANTIZABLE_OPS = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "Gather": (0,)}
NOTHING_QUANTIZABLE = "nothing in this model can be quantized"
_MAX_IF_FOLDS = 10_000


@dataclass
class PreparationReport:
    """What preparation did, and what ONNX Runtime's QDQ quantizer can do with the result."""

    steps: list[str] = field(default_factory=list)
    n_quantizable: int = 0  # main-graph nodes whose op type is in QUANTIZABLE_OPS
    float_nodes: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float
    warning: str | None = None  # NOTHING_QUANTIZABLE when n_quantizable == 0

    def to_dict(self) -> dict:
        """JSON-ready (Optuna user attrs, result.json)."""
        return asdict(self)

    def float_op_counts(self) -> dict[str, int]:
        """How many nodes stay float per reason, e.g. {"unsupported op Shape": 3}."""
        counts: dict[str, int] = {}
        for reason in self.float_nodes.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts


# ------------------------------------------------------------------------------------------------ helpers
def _copy(model: ModelProto) -> ModelProto:
    out = ModelProto()
    out.CopyFrom(model)
    return out


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _defined_names(graph: GraphProto) -> set[str]:
    """Names defined in ``graph`` itself (inputs, initializers, node outputs)."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    names |= {o for n in graph.node for o in n.output if o}
    return names


def _all_names(graph: GraphProto, skip: int | None = None) -> set[str]:
    """Every tensor name used or defined in ``graph`` and its subgraphs, except inside node ``skip``'s subgraphs."""
    names = _defined_names(graph) | {o.name for o in graph.output} | {v.name for v in graph.value_info}
    for i, node in enumerate(graph.node):
        names.update(node.input)
        if i != skip:
            for sub in _subgraphs(node):
                names |= _all_names(sub)
    return names


def _all_nodes(graph: GraphProto, skip: int | None = None) -> Iterator[NodeProto]:
    """Every node of ``graph`` and its subgraphs, except inside node ``skip``'s subgraphs."""
    for i, node in enumerate(graph.node):
        yield node
        if i != skip:
            for sub in _subgraphs(node):
                yield from _all_nodes(sub)


def _fresh(name: str, used: set[str], prefix: str) -> str:
    """``name`` if unused, else ``prefix/name`` (with a numeric suffix if needed); marks it used."""
    new = name if name not in used else f"{prefix}/{name}"
    base, k = new, 1
    while new in used:
        new, k = f"{base}_{k}", k + 1
    used.add(new)
    return new


def _constant_tensor(node: NodeProto) -> TensorProto | None:
    """The tensor a Constant node holds (numeric attributes only; sparse / string values give None)."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            tensor = TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(attr.floats, np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(attr.ints, np.int64))
    return None


def _is_constant_node(node: NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _constant_value(graph: GraphProto, name: str) -> np.ndarray | None:
    """Value of ``name`` if it is fixed: an initializer that is not also a graph input, or a Constant's output."""
    if name in {i.name for i in graph.input}:
        return None  # an initializer listed as input is only a default: the caller may feed another value
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in graph.node:
        if _is_constant_node(node) and name in node.output:
            tensor = _constant_tensor(node)
            return None if tensor is None else numpy_helper.to_array(tensor)
    return None


# ------------------------------------------------------------------------------------- Constant -> initializer
def constants_to_initializers(model: ModelProto) -> tuple[ModelProto, list[str]]:
    """Turn the main graph's Constant nodes into initializers named after their output.

    ORT quantizes a weight (per-tensor or per-channel, int8 initializer + DequantizeLinear) only when it is an
    initializer. Constants whose output is a graph output, or that hold sparse / string values, are kept.
    """
    model = _copy(model)
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    weights = {n.input[i] for n in graph.node for i in WEIGHT_INPUTS.get(n.op_type, ()) if i < len(n.input)}
    kept_nodes: list[NodeProto] = []
    moved, moved_weights = 0, 0
    for node in graph.node:
        tensor = _constant_tensor(node) if _is_constant_node(node) else None
        if tensor is None or node.output[0] in graph_outputs:
            kept_nodes.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
        moved_weights += tensor.name in weights
    if not moved:
        return model, []
    del graph.node[:]
    graph.node.extend(kept_nodes)
    return model, [f"{moved} Constant node(s) turned into initializers ({moved_weights} weight(s) / bias(es) "
                   "of Conv/ConvTranspose/Gemm/MatMul/Gather among them)"]


# --------------------------------------------------------------------------------------- constant If folding
def _rename_refs(graph: GraphProto, mapping: dict[str, str]) -> None:
    """Rename outer-scope references in a nested subgraph (names it defines itself shadow ``mapping``)."""
    mapping = {k: v for k, v in mapping.items() if k not in _defined_names(graph)}
    if not mapping:
        return
    for node in graph.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        for sub in _subgraphs(node):
            _rename_refs(sub, mapping)
    for out in graph.output:
        out.name = mapping.get(out.name, out.name)


def _inline_branch(graph: GraphProto, index: int, branch: GraphProto) -> None:
    """Replace the If node at ``index`` by ``branch``'s nodes, wired to the If's inputs and outputs.

    Branch-local names that collide with names of the main graph get the If's name as prefix; the branch's
    outputs are renamed to the If's outputs (or copied with Identity when a branch output is not produced by
    a branch node, or appears twice). Outer-scope names the branch reads are left as they are.
    """
    if_node = graph.node[index]
    prefix = if_node.name or "If"
    used = _all_names(graph, skip=index)
    used_node_names = {n.name for n in _all_nodes(graph, skip=index)}
    produced = [o for n in branch.node for o in n.output if o]
    mapping: dict[str, str] = {}
    for inner, outer in zip((o.name for o in branch.output), if_node.output):
        if outer and inner in produced and inner not in mapping:
            mapping[inner] = outer
    for name in [t.name for t in branch.initializer] + produced:
        if name not in mapping:
            mapping[name] = _fresh(name, used, prefix)
    new_nodes: list[NodeProto] = []
    for node in branch.node:
        new = NodeProto()
        new.CopyFrom(node)
        new.input[:] = [mapping.get(i, i) for i in node.input]
        new.output[:] = [mapping.get(o, o) for o in node.output]
        for sub in _subgraphs(new):
            _rename_refs(sub, mapping)
        if new.name:
            new.name = _fresh(new.name, used_node_names, prefix)
        new_nodes.append(new)
    for inner, outer in zip((o.name for o in branch.output), if_node.output):
        if outer and mapping.get(inner) != outer:
            new_nodes.append(helper.make_node("Identity", [mapping.get(inner, inner)], [outer],
                                              name=_fresh(f"{prefix}/Identity_{outer}", used_node_names, prefix)))
    for tensor in branch.initializer:
        moved = graph.initializer.add()
        moved.CopyFrom(tensor)
        moved.name = mapping[tensor.name]
    known_info = {v.name for v in graph.value_info} | {o.name for o in graph.output}
    for vi in branch.value_info:
        name = mapping.get(vi.name, vi.name)
        if vi.name in mapping and name not in known_info:
            graph.value_info.add().CopyFrom(vi)
            graph.value_info[-1].name = name
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:index] + new_nodes + nodes[index + 1:])


def _drop_if_unused(graph: GraphProto, name: str) -> None:
    """Remove the initializer or Constant node defining ``name`` when nothing reads it any more."""
    readers = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | {i.name for i in graph.input}
    for node in graph.node:
        for sub in _subgraphs(node):
            readers |= _all_names(sub)
    if name in readers:
        return
    inits = [t for t in graph.initializer if t.name != name]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    nodes = [n for n in graph.node if not (_is_constant_node(n) and name in n.output)]
    if len(nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)


def _foldable_if(graph: GraphProto) -> tuple[int, bool] | None:
    """(index, condition) of the first top-level If whose condition is a single constant value."""
    for index, node in enumerate(graph.node):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        cond = _constant_value(graph, node.input[0])
        branches = {a.name: a.g for a in node.attribute if a.type == AttributeProto.GRAPH}
        if cond is None or cond.size != 1 or set(branches) != {"then_branch", "else_branch"}:
            continue
        taken = branches["then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"]
        if taken.sparse_initializer or len(taken.output) != len(node.output):
            continue
        return index, bool(cond.reshape(-1)[0])
    return None


def fold_constant_ifs(model: ModelProto) -> tuple[ModelProto, list[str]]:
    """Replace every main-graph If whose condition is a constant by the nodes of the branch it takes.

    Repeated until none is left, so If nodes nested in a taken branch are folded too when their condition is
    constant. An If whose condition is computed at run time stays (its subgraphs stay float).
    """
    model = _copy(model)
    graph = model.graph
    folded: list[str] = []
    for _ in range(_MAX_IF_FOLDS):
        found = _foldable_if(graph)
        if found is None:
            break
        index, cond = found
        node = graph.node[index]
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if cond else "else_branch"))
        folded.append(f"{node.name or f'If_{index}'} ({'then' if cond else 'else'})")
        cond_name = node.input[0]
        _inline_branch(graph, index, branch)
        _drop_if_unused(graph, cond_name)
    if not folded:
        return model, []
    return model, [f"{len(folded)} If node(s) with a constant condition replaced by the branch taken: "
                   + ", ".join(folded[:8]) + ("..." if len(folded) > 8 else "")]


# -------------------------------------------------------------------------------------------- what stays float
def unhandled_subgraph_nodes(model: ModelProto) -> dict[str, str]:
    """Nodes inside the subgraphs of main-graph If / Loop / Scan (ORT's QDQ quantizer does not enter them).

    Keys are ``outer_node/inner_node`` paths (unnamed inner nodes are named ``<op>_<index>``).
    """
    found: dict[str, str] = {}

    def walk(graph: GraphProto, path: str) -> None:
        for i, node in enumerate(graph.node):
            name = f"{path}/{node.name or f'{node.op_type}_{i}'}"
            found[name] = "inside an unhandled subgraph"
            for sub in _subgraphs(node):
                walk(sub, name)

    for node in model.graph.node:
        for sub in _subgraphs(node):
            walk(sub, node.name or node.op_type)
    return found


def subgraph_steps(model: ModelProto) -> list[str]:
    """A step line naming the control-flow nodes that remain, if any."""
    outer = [n.name or n.op_type for n in model.graph.node if any(True for _ in _subgraphs(n))]
    if not outer:
        return []
    inside = len(unhandled_subgraph_nodes(model))
    return [f"{len(outer)} control-flow node(s) kept ({', '.join(outer[:8])}{'...' if len(outer) > 8 else ''}): "
            f"their {inside} inner node(s) stay float (inside an unhandled subgraph)"]


def quantizable_summary(model: ModelProto, steps: list[str] | None = None) -> PreparationReport:
    """Count the main-graph nodes ORT's QDQ quantizer handles; list every node that stays float and why."""
    n_quantizable = 0
    float_nodes: dict[str, str] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type in QUANTIZABLE_OPS and node.domain in ("", "ai.onnx"):
            n_quantizable += 1
        else:
            float_nodes[node.name or f"{node.op_type}_{i}"] = f"unsupported op {node.op_type}"
    float_nodes.update(unhandled_subgraph_nodes(model))
    warning = None
    if n_quantizable == 0:
        warning = (f"{NOTHING_QUANTIZABLE}: none of its op types is handled by ONNX Runtime's QDQ quantizer "
                   f"(handled: {', '.join(sorted(QUANTIZABLE_OPS))})")
    return PreparationReport(list(steps or []), n_quantizable, float_nodes, warning)


def prepare_graph(model: ModelProto) -> tuple[ModelProto, list[str]]:
    """The graph clean-ups in order: fold constant Ifs (inlined branches may hold Constants), then
    Constants -> initializers, then report the control flow that remains."""
    model, steps = fold_constant_ifs(model)
    model, more = constants_to_initializers(model)
    return model, steps + more + subgraph_steps(model)


# ------------------------------------------------------------------------------------------------ external data
def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
        for sub in _subgraphs(node):
            yield from _graph_tensors(sub)


def external_tensors(model: ModelProto) -> Iterator[tuple[str, str]]:
    """(tensor name, location) of every tensor whose data is stored outside the model file."""
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            yield tensor.name, entries.get("location", "")


def check_external_data(model: ModelProto, model_dir: str | Path) -> None:
    """Refuse external data stored outside ``model_dir`` (absolute paths, ``..``, symlinks out) or missing.

    Call it on a model loaded with ``load_external_data=False``, before loading the data.
    """
    base = Path(model_dir).resolve()
    for name, location in external_tensors(model):
        if not location:
            raise ModelError(f"tensor {name!r} is stored as external data without a location; re-export the model")
        if Path(location).is_absolute() or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
            raise ModelError(f"tensor {name!r} has external data at the absolute path {location!r}; external data "
                             f"must be a file in the model's folder {base}: re-save the model with a relative location")
        target = (base / location).resolve()
        if target != base and base not in target.parents:
            raise ModelError(f"tensor {name!r} has external data at {location!r}, outside the model's folder {base}; "
                             "move the data file next to the model and re-save it with a relative location")
        if not target.is_file():
            raise ModelError(f"external data file {location!r} of tensor {name!r} not found in {base}; "
                             "copy it next to the model")
