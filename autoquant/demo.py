"""A tiny bundled task (model + data + metric) for `autoquant demo`, the tests and the benchmarks.

The model is a small CNN with fixed random weights; the images are Gaussian noise with rare large
spikes (like hot pixels). Min/max calibration stretches the input range over the spikes and naive
int8 quantization visibly loses accuracy; better calibration, 16-bit activations or float fallback
recover it. Labels are the fp32 model's own top-1 on samples with a clear margin, so the metric is
top-1 agreement with fp32 (fp32 scores 1.0).

``kind="outlier"``: the same CNN exported with BatchNormalization after each conv, where one channel
of the first BatchNorm is scaled by a few hundred and compensated in the next conv (fp32 unchanged,
as after careless training or export). Per-tensor int8 then crushes every other channel of that
activation; cross-layer equalization (or 16-bit activations / fallback) recovers it. Images have no
spikes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IMAGE = (1, 8, 8)
N_CLASSES = 4


def build_demo_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    inits = [
        init("conv1.w", rng.normal(0, 0.5, (8, 1, 3, 3))),
        init("conv1.b", rng.normal(0, 0.1, (8,))),
        init("conv2.w", rng.normal(0, 0.25, (8, 8, 3, 3))),
        init("conv2.b", rng.normal(0, 0.1, (8,))),
        init("fc1.w", rng.normal(0, 0.06, (64, 8 * IMAGE[1] * IMAGE[2]))),
        init("fc1.b", rng.normal(0, 0.1, (64,))),
        init("fc2.w", rng.normal(0, 0.2, (N_CLASSES, 64))),
        init("fc2.b", rng.normal(0, 0.1, (N_CLASSES,))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "autoquant_demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_outlier_model(seed: int = 0, outlier_scale: float = 300.0, channel: int = 3,
                        opset: int = 17) -> onnx.ModelProto:
    """The demo CNN with BatchNorm after each conv and one channel of BN1 scaled by ``outlier_scale``
    (compensated in conv2, so the fp32 function is unchanged)."""
    model = build_demo_model(seed, opset)
    rng = np.random.default_rng(seed + 100)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    w2 = numpy_helper.to_array(inits["conv2.w"]).copy()
    w2[:, channel] /= outlier_scale
    inits["conv2.w"].CopyFrom(numpy_helper.from_array(w2.astype(np.float32), "conv2.w"))
    new_nodes = []
    for node in g.node:
        new_nodes.append(node)
        if node.name in ("conv1", "conv2"):
            c = 8
            gamma = rng.uniform(0.5, 1.5, c)
            beta = rng.normal(0, 0.1, c)
            if node.name == "conv1":
                gamma[channel] *= outlier_scale
                beta[channel] *= outlier_scale
            stem = node.name.replace("conv", "bn")
            for name, arr in (("scale", gamma), ("bias", beta), ("mean", rng.normal(0, 0.1, c)),
                              ("var", rng.uniform(0.5, 1.5, c))):
                g.initializer.append(numpy_helper.from_array(arr.astype(np.float32), f"{stem}.{name}"))
            raw = node.output[0] + "_prebn"
            bn = helper.make_node("BatchNormalization", [raw] + [f"{stem}.{k}" for k in ("scale", "bias", "mean", "var")],
                                  [node.output[0]], name=stem, epsilon=1e-5)
            node.output[0] = raw
            new_nodes.append(bn)
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.checker.check_model(model)
    return model


def make_images(n: int, seed: int, spike_rate: float = 0.002, spike_scale: float = 150.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, *IMAGE)).astype(np.float32)
    spikes = rng.random(x.shape) < spike_rate
    x[spikes] = (rng.choice([-1.0, 1.0], spikes.sum()) * rng.uniform(0.5, 1.0, spikes.sum()) * spike_scale)
    return x.astype(np.float32)


def run(model_path: str | Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


class DemoTask:
    """Model file, calibration feeds and an eval callback, all made locally from a seed."""

    def __init__(self, folder: str | Path, seed: int = 0, n_calib: int = 256, n_eval: int = 1000,
                 calib_batch: int = 32, kind: str = "spiky"):
        if kind not in ("spiky", "outlier"):
            raise ValueError(f"kind must be 'spiky' or 'outlier', got {kind!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model_path = self.folder / f"demo_{kind}_fp32.onnx"
        model = build_demo_model(seed) if kind == "spiky" else build_outlier_model(seed)
        onnx.save(model, str(self.model_path))
        spikes = {} if kind == "spiky" else {"spike_rate": 0.0}
        self.calib = make_images(n_calib, seed + 1, **spikes)
        self.calib_batch = calib_batch
        x = make_images(n_eval * 5 // 3, seed + 2, **spikes)
        logits = run(self.model_path, x)
        top2 = np.sort(logits, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        keep = np.argsort(-margin)[:n_eval]  # drop the most ambiguous fp32 decisions
        self.eval_x, self.labels = x[np.sort(keep)], logits[np.sort(keep)].argmax(1)
        self.eval_calls = 0

    def calibration_data(self):
        """A fresh iterator of feeds each call (pass the method itself to optimize())."""
        for i in range(0, len(self.calib), self.calib_batch):
            yield {"x": self.calib[i : i + self.calib_batch]}

    def evaluate(self, model_path: str) -> float:
        """Top-1 agreement with the fp32 model on the eval images."""
        self.eval_calls += 1
        return float((run(model_path, self.eval_x).argmax(1) == self.labels).mean())
