"""What a quantized model costs to run: bit operations (deterministic) and measured ORT CPU latency.

File size alone misleads: on ONNX Runtime CPU a 16-bit-activation model can be smaller than fp32 yet
twice as slow. Every completed trial records both numbers beside its size.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
LATENCY_REPEATS = 7
LATENCY_BUDGET_S = 0.5  # stop repeating once a measurement has taken this long (at least 3 pairs)


def _shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                    for d in vi.type.tensor_type.shape.dim]
    return None


def macs_per_node(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per sample (dynamic dims count as 1) of every Conv / Gemm / MatMul node."""
    inferred = onnx.shape_inference.infer_shapes(model)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.op_type not in MAC_OPS or len(node.input) < 2:
            continue
        y = _shape(inferred, node.output[0])
        w = weights.get(node.input[1]) or _shape(inferred, node.input[1])
        if not y or not w:
            continue
        if node.op_type == "Conv":
            macs = int(np.prod(y[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x = _shape(inferred, node.input[0])
            macs = int(np.prod(x[1:])) * int(np.prod(w[1:])) if x else 0
        else:  # Gemm / MatMul: every output element is a K-long dot product
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = w[-1] if (node.op_type == "Gemm" and trans_b) else w[-2] if len(w) >= 2 else w[0]
            macs = int(np.prod(y)) * int(k)
        out[node.name] = macs
    return out


def bops(macs: dict[str, int], config: dict[str, Any], float_nodes=(), a16_nodes=(), w4_nodes=()) -> float:
    """Bit operations: MACs x weight bits x activation bits per node; 32 x 32 for nodes kept float,
    16-bit activations / 4-bit weights for the mixed-precision nodes."""
    total = 0.0
    weight_only = config.get("mode") == "weight_only"  # activations stay float
    for name, m in macs.items():
        if name in float_nodes:
            total += m * 32 * 32
            continue
        wb = 4 if name in w4_nodes else config["weight_bits"]
        ab = 32 if weight_only else 16 if name in a16_nodes else config["activation_bits"]
        total += m * wb * ab
    return total


def _session(path: str | Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _timed_run(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    sess.run(None, feed)
    return time.perf_counter() - t0


class LatencyMeter:
    """A trial model's ORT CPU latency and its ratio to fp32, measured interleaved: fp32 run, trial run,
    fp32 run, ... The ratio is the median of per-pair ratios, so load that changes during a measurement
    (other processes, other workers) hits both models alike. The fp32 session is created once.
    ``threads``: ORT intra-op threads (0 = ORT's default, all cores)."""

    def __init__(self, fp32_path: str | Path, feed: dict[str, np.ndarray], threads: int = 1,
                 pairs: int = LATENCY_REPEATS, budget_s: float = LATENCY_BUDGET_S):
        self.feed, self.threads, self.pairs, self.budget_s = feed, threads, pairs, budget_s
        self._fp32 = _session(fp32_path, threads)

    def measure(self, path: str | Path) -> tuple[float, float]:
        """(median latency in ms, median latency ratio vs fp32) of the model at ``path``."""
        sess = _session(path, self.threads)
        sess.run(None, self.feed)
        self._fp32.run(None, self.feed)
        times: list[float] = []
        ratios: list[float] = []
        start = time.perf_counter()
        while len(times) < self.pairs and (time.perf_counter() - start < self.budget_s or len(times) < 3):
            base = _timed_run(self._fp32, self.feed)
            t = _timed_run(sess, self.feed)
            times.append(t)
            ratios.append(t / base if base > 0 else float("inf"))
        return 1000.0 * statistics.median(times), statistics.median(ratios)


#: how a trial's latency ratio is measured for the delivery rule: ORT's default intra-op threading (as a user
#: runs a session out of the box) or one thread
LATENCY_THREADING = {"default": 0, "single": 1}
#: detail keys of the latency ratio and of the latency (ms) per threading
RATIO_KEY = {"single": "latency_ratio", "default": "latency_ratio_default_threads"}
MS_KEY = {"single": "latency_ms", "default": "latency_ms_default_threads"}
#: the delivery rule's speed limit: a model is "not slower than fp32" at this latency ratio or below
NOT_SLOWER_THAN_FP32 = 1.0


class SpeedMeter:
    """Both latency ratios of a trial model vs fp32: single-threaded and with ORT's default threading, each
    interleaved with fp32 (:class:`LatencyMeter`). The delivery rule reads the one named by ``threading``."""

    def __init__(self, fp32_path: str | Path, feed: dict[str, np.ndarray], threading: str = "default"):
        self.threading = threading
        self._meters = {t: LatencyMeter(fp32_path, feed, threads=n) for t, n in LATENCY_THREADING.items()}

    def measure(self, path: str | Path, details: dict | None = None, *, both: bool = True) -> dict[str, float]:
        """The latency keys of the model at ``path`` not yet in ``details``: the delivery rule's threading, and
        with ``both`` the other one too (the report shows both; a trial pruned on the first one never pays
        for the second)."""
        details = details or {}
        out = {}
        for t in (self.threading, *(o for o in LATENCY_THREADING if o != self.threading and both)):
            if MS_KEY[t] not in details:
                out[MS_KEY[t]], out[RATIO_KEY[t]] = self._meters[t].measure(path)
        return out

    def ratio(self, details: dict) -> float | None:
        """The ratio the delivery rule uses, from a trial's details."""
        return details.get(RATIO_KEY[self.threading])

    @property
    def ms_key(self) -> str:
        return MS_KEY[self.threading]
