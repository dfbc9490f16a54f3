#!/usr/bin/env python
"""Benchmark: search efficiency of ``autoquant.optimize`` vs ONNX Runtime's ``quantize_static`` (defaults) and
NNCF's ``quantize_with_accuracy_control`` (ONNX backend), on three models, in one run on one machine.

Models (each with its own eval set, calibration feeds and metric; the same for every method):

1. ``outlier``: ``autoquant.demo.DemoTask(kind="outlier")``: the demo CNN with BatchNorm where one BN channel is
   scaled x300 (compensated in the next conv). Metric: top-1 agreement with fp32.
2. ``digits``: a small CNN (conv 1->8, conv 8->16 stride 2, Gemm 256->10) TRAINED here with numpy + scipy's
   L-BFGS on scikit-learn's bundled ``load_digits`` 8x8 images (1,000 train images) and exported with
   ``onnx.helper``. Metric: accuracy against the real labels of 797 held-out images.
3. ``ppocr_rec``: the PP-OCRv4 text recognizer shipped in the ``rapidocr-onnxruntime`` wheel, on text lines rendered
   with Pillow (the data, preprocessing and CTC decoding that ``experiments/bench_real_models.py`` uses too:
   ``experiments/_ocr.py``).
   Metric: character accuracy (1 - normalized edit distance) against the rendered strings.

Methods, all with the same limit (absolute drop <= 0.01 of the metric):

- ``ort_default``: ``onnxruntime.quantization.quantize_static(model, out, reader)`` with its defaults.
- ``nncf_ac``: ``nncf.quantize_with_accuracy_control`` with its defaults (ONNX backend; max_drop 0.01, ABSOLUTE),
  an ``nncf.Dataset`` over the same calibration feeds and a validation function over the eval set (one data item
  per eval sample / text line, returning per-item scores so NNCF can rank on subsets). Calls of the validation
  function on the whole eval set are counted as full eval calls; calls on fewer items separately.
- ``autoquant_first``: ``optimize(..., stop_when_feasible=True)`` (the "one feasible model quickly" mode).
- ``autoquant_first_known_fp32``: ``optimize(..., stop_when_feasible=True, baseline_accuracy=<fp32 score>)``: given
  the fp32 score this benchmark measures once per model (as a user who already knows it would give it), so it makes
  no fp32 eval call; that measurement is not counted in its row. NNCF's API has no such option.
- ``autoquant_n20``: ``optimize(..., n_trials=20)``.

Every eval call of every method goes through the same counting wrapper. For ``ort_default`` the count is 2 (the
fp32 baseline and the quantized model: what a user must run to know the drop); autoquant's and NNCF's counts
include their own fp32 baseline call (except ``autoquant_first_known_fp32``, which is given the fp32 score).
Each delivered file is re-scored once (uncounted) and timed with ORT CPU, 1 thread, interleaved with fp32, median
of repeats.

    python experiments/bench_search.py

Needs (experiment-only): pip install nncf scikit-learn rapidocr-onnxruntime pillow

Writes experiments/results/bench_search.md (``--out`` elsewhere). This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import logging
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
import optuna
from onnx import TensorProto, helper, numpy_helper

from autoquant import optimize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (config_str, code_state, fmt, latency_ratio, loadavg, machine_info, session,  # noqa: E402
                     set_up, space_without_sensitivity, time_sensitivity_pass, work_dir)
from _ocr import OcrData  # noqa: E402

ALLOWED_DROP = 0.01


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
class BudgetExceeded(Exception):
    """Raised from the NNCF validation function once its time cap has passed."""


@dataclass
class Task:
    key: str
    title: str
    metric: str
    model_path: Path
    calib: list[dict[str, np.ndarray]]  # feeds
    n_items: int  # eval items (samples / text lines)
    score_items: Callable[[ort.InferenceSession, list[int]], np.ndarray]  # per-item metric on those items
    eval_threads: int
    latency_feed: dict[str, np.ndarray]
    latency_desc: str
    data_desc: str
    space: Any = "default"
    space_desc: str = "default"
    notes: list[str] = field(default_factory=list)
    setup_seconds: float = 0.0
    fp32_score: float | None = None

    def calibration(self):
        """A fresh iterator over the feeds (pass the method itself to optimize())."""
        return iter(self.calib)

    def score(self, model) -> float:
        """The metric over the whole eval set (a path or a ModelProto)."""
        return float(self.score_items(session(model, self.eval_threads), list(range(self.n_items))).mean())


class CallLog:
    """Counts eval calls: full (every eval item) vs subset (fewer items), with their seconds."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.full = 0
        self.subset = 0
        self.subset_items = 0
        self.full_seconds = 0.0
        self.subset_seconds = 0.0

    def record(self, n: int, seconds: float) -> None:
        if n >= self.n_items:
            self.full += 1
            self.full_seconds += seconds
        else:
            self.subset += 1
            self.subset_items += n
            self.subset_seconds += seconds


def counted_eval(task: Task, log: CallLog) -> Callable[[str], float]:
    def evaluate(model_path: str) -> float:
        t0 = time.perf_counter()
        value = task.score(model_path)
        log.record(task.n_items, time.perf_counter() - t0)
        return value

    return evaluate


# ---------------------------------------------------------------------------------------------------
# 1. outlier CNN (autoquant.demo)
# ---------------------------------------------------------------------------------------------------
def make_outlier_task(work: Path, seed: int, n_eval: int) -> Task:
    from autoquant.demo import DemoTask

    t0 = time.perf_counter()
    demo = DemoTask(work / "outlier", seed=seed, n_eval=n_eval, kind="outlier")
    x, labels = demo.eval_x, demo.labels

    def score_items(sess, idx):
        idx = np.asarray(idx)
        pred = np.concatenate([sess.run(None, {"x": x[idx[i:i + 1000]]})[0].argmax(1) for i in range(0, len(idx), 1000)])
        return (pred == labels[idx]).astype(np.float64)

    calib = [{"x": demo.calib[i:i + demo.calib_batch]} for i in range(0, len(demo.calib), demo.calib_batch)]
    return Task(
        key="outlier", title="demo CNN with an outlier BatchNorm channel (autoquant.demo, kind='outlier')",
        metric="top-1 agreement with fp32 (fp32 = 1.0 by construction)", model_path=demo.model_path, calib=calib,
        n_items=len(x), score_items=score_items, eval_threads=1, latency_feed={"x": x[:512]},
        latency_desc="batch 512 x 1x8x8",
        data_desc=f"{len(x)} eval images (fp32's confident decisions), {len(demo.calib)} calibration images in "
                  f"{len(calib)} feeds of {demo.calib_batch}",
        setup_seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# 2. digits CNN trained here (numpy + scipy L-BFGS on sklearn's load_digits)
# ---------------------------------------------------------------------------------------------------
DIGIT_C1, DIGIT_C2, DIGIT_CLASSES = 8, 16, 10
DIGIT_SHAPES = [("w1", (DIGIT_C1, 1, 3, 3)), ("b1", (DIGIT_C1,)), ("w2", (DIGIT_C2, DIGIT_C1, 3, 3)),
                ("b2", (DIGIT_C2,)), ("w3", (DIGIT_CLASSES, DIGIT_C2 * 16)), ("b3", (DIGIT_CLASSES,))]


def _unpack(theta: np.ndarray) -> dict[str, np.ndarray]:
    p, i = {}, 0
    for name, shape in DIGIT_SHAPES:
        k = int(np.prod(shape))
        p[name] = theta[i:i + k].reshape(shape).astype(np.float32)
        i += k
    return p


def _im2col(x: np.ndarray, stride: int):
    """3x3 patches with padding 1: (N*Ho*Wo, C*9), in the (C, kh, kw) order of an ONNX Conv weight."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    cols = np.empty((n, c, 3, 3, ho, wo), x.dtype)
    for i in range(3):
        for j in range(3):
            cols[:, :, i, j] = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * 9), (n, ho, wo)


def _col2im(dcols: np.ndarray, xshape, stride: int) -> np.ndarray:
    n, c, h, w = xshape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dc = dcols.reshape(n, ho, wo, c, 3, 3).transpose(0, 3, 4, 5, 1, 2)
    dxp = np.zeros((n, c, h + 2, w + 2), dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += dc[:, :, i, j]
    return dxp[:, :, 1:-1, 1:-1]


def _digits_forward(p, x, cache=False):
    c1, (n, h1, w1) = _im2col(x, 1)
    z1 = c1 @ p["w1"].reshape(DIGIT_C1, -1).T + p["b1"]
    a1 = np.maximum(z1, 0).reshape(n, h1, w1, DIGIT_C1).transpose(0, 3, 1, 2)
    c2, (_, h2, w2) = _im2col(a1, 2)
    z2 = c2 @ p["w2"].reshape(DIGIT_C2, -1).T + p["b2"]
    f = np.maximum(z2, 0).reshape(n, h2, w2, DIGIT_C2).transpose(0, 3, 1, 2).reshape(n, -1)  # ONNX Flatten order
    logits = f @ p["w3"].T + p["b3"]
    return (logits, (c1, z1, a1, c2, z2, f, n, h2, w2)) if cache else logits


def _digits_loss_grad(theta, x, y, lam):
    p = _unpack(theta)
    logits, (c1, z1, a1, c2, z2, f, n, h2, w2) = _digits_forward(p, x, cache=True)
    m = logits.max(1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - logits[np.arange(n), y]))
    g = e / s
    g[np.arange(n), y] -= 1
    g /= n
    grads = {"w3": g.T @ f, "b3": g.sum(0)}
    dz2 = (g @ p["w3"]).reshape(n, DIGIT_C2, h2, w2).transpose(0, 2, 3, 1).reshape(-1, DIGIT_C2) * (z2 > 0)
    grads["w2"], grads["b2"] = (dz2.T @ c2).reshape(p["w2"].shape), dz2.sum(0)
    da1 = _col2im(dz2 @ p["w2"].reshape(DIGIT_C2, -1), a1.shape, 2)
    dz1 = da1.transpose(0, 2, 3, 1).reshape(-1, DIGIT_C1) * (z1 > 0)
    grads["w1"], grads["b1"] = (dz1.T @ c1).reshape(p["w1"].shape), dz1.sum(0)
    grad = np.concatenate([grads[k].ravel() for k, _ in DIGIT_SHAPES]).astype(np.float64)
    wmask = np.concatenate([np.full(int(np.prod(s)), k.startswith("w"), float) for k, s in DIGIT_SHAPES])
    return loss + 0.5 * lam * float(np.sum(wmask * theta ** 2)), grad + lam * wmask * theta


def train_digits(x, y, seed: int, maxiter: int, lam: float = 1e-4) -> tuple[dict[str, np.ndarray], dict]:
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    theta0 = np.concatenate([rng.normal(0, math.sqrt(2.0 / np.prod(s[1:])), int(np.prod(s))) if k.startswith("w")
                             else np.zeros(int(np.prod(s))) for k, s in DIGIT_SHAPES])
    res = minimize(_digits_loss_grad, theta0, args=(x, y, lam), jac=True, method="L-BFGS-B",
                   options={"maxiter": maxiter})
    return _unpack(res.x), {"loss": float(res.fun), "iterations": int(res.nit)}


def export_digits(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v.astype(np.float32), f"digits.{k}") for k, v in p.items()]
    nodes = [
        helper.make_node("Conv", ["x", "digits.w1", "digits.b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "digits.w2", "digits.b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "digits.w3", "digits.b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "digits_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", DIGIT_CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_search")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_digits_task(work: Path, seed: int, maxiter: int, n_train: int = 1000, n_calib: int = 256) -> Task:
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    d = load_digits()
    x_all = (d.images / 16.0).astype(np.float32)[:, None]
    y_all = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x_all))
    train, held = perm[:n_train], perm[n_train:]
    params, info = train_digits(x_all[train], y_all[train], seed, maxiter)
    path = work / "digits_cnn_fp32.onnx"
    model = export_digits(params)
    onnx.save(model, str(path))
    x_eval, y_eval = x_all[held], y_all[held]
    # the exported file computes what was trained
    onnx_logits = session(path).run(None, {"x": x_eval})[0]
    np_logits = _digits_forward(params, x_eval)
    train_acc = float((_digits_forward(params, x_all[train]).argmax(1) == y_all[train]).mean())
    calib_x = x_all[train[:n_calib]]  # unlabeled training images
    calib = [{"x": calib_x[i:i + 32]} for i in range(0, n_calib, 32)]

    def score_items(sess, idx):
        idx = np.asarray(idx)
        return (sess.run(None, {"x": x_eval[idx]})[0].argmax(1) == y_eval[idx]).astype(np.float64)

    return Task(
        key="digits", title="digits CNN trained here (sklearn load_digits 8x8, numpy + scipy L-BFGS)",
        metric="accuracy vs the real labels of the held-out images", model_path=path, calib=calib,
        n_items=len(held), score_items=score_items, eval_threads=1, latency_feed={"x": x_eval[:512]},
        latency_desc="batch 512 x 1x8x8",
        data_desc=f"{n_train} training images (L-BFGS, {info['iterations']} iterations, final loss {info['loss']:.4f}, "
                  f"train accuracy {train_acc:.4f}); {len(held)} held-out images for eval; the first {n_calib} training "
                  f"images (unlabeled) as calibration, {len(calib)} feeds of 32",
        setup_seconds=time.perf_counter() - t0,
        notes=[f"exported ONNX vs numpy logits: max |diff| {float(np.abs(onnx_logits - np_logits).max()):.2e}"])


# ---------------------------------------------------------------------------------------------------
# 3. PP-OCRv4 recognizer (data, preprocessing and decoding: experiments/_ocr.py)
# ---------------------------------------------------------------------------------------------------
def make_ocr_task(work: Path, seed: int, n_eval: int, n_calib: int, full_space: bool) -> Task:
    t0 = time.perf_counter()
    data = OcrData(seed, n_eval, n_calib)
    model = onnx.load(str(data.model_path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    task = Task(
        key="ppocr_rec", title=f"PP-OCRv4 text recognizer (rapidocr-onnxruntime {data.version}, as shipped)",
        metric="character accuracy (1 - normalized edit distance) vs the rendered text", model_path=data.model_path,
        calib=[{"x": x} for x in data.calib], n_items=n_eval, score_items=data.score_items, eval_threads=2,
        latency_feed=data.latency_feed(), latency_desc="6 x 3x48x320 (rapidocr's rec_batch_num 6)",
        data_desc=f"{n_eval} rendered lines for eval (half hard: low contrast, blur, noise), {n_calib} for calibration "
                  f"at a fixed padded width of 320 in feeds of 8; eval sessions use 2 threads",
        space="default" if full_space else space_without_sensitivity(),
        space_desc="default" if full_space else "default with fallback_k = a16_k = 0 and w4_fraction = 0 "
                                               "(no per-node sensitivity pass)",
        setup_seconds=time.perf_counter() - t0,
        notes=[f"as shipped: opset {model.opset_import[0].version}, {ops['Constant']} Constant nodes, "
               f"{sum(v for k, v in ops.items() if k != 'Constant')} other nodes "
               f"({ops['Conv']} Conv, {ops['MatMul']} MatMul)"])
    task.ocr = data
    return task


def sensitivity_cost(out_dir: Path, stats_key: str) -> dict[str, Any] | None:
    """What the default space's sensitivity pass costs on this model, timed (_common.time_sensitivity_pass)."""
    t = time_sensitivity_pass(out_dir, stats_key)
    if t is None:
        return None
    return {"compute nodes": t["n_nodes"], "precisions": ", ".join(t["precisions"]),
            "calibration feeds": t["n_feeds"], "measured pass": f"{t['seconds']:.1f} s"}


# ---------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------
def run_ort_default(task: Task, work: Path, method: str = "ort_default", **quantize_kwargs) -> dict[str, Any]:
    """ORT's quantize_static on the task's calibration feeds: its defaults, or ``quantize_kwargs`` on top."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = task.calibration()

        def get_next(self):
            return next(self.it, None)

    log = CallLog(task.n_items)
    evaluate = counted_eval(task, log)
    out = work / f"{task.key}_{method}.onnx"
    t0 = time.perf_counter()
    baseline = evaluate(str(task.model_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)  # ORT's "please consider pre-processing" warnings
        quantize_static(str(task.model_path), str(out), Reader(), **quantize_kwargs)
    accuracy = evaluate(str(out))
    wall = time.perf_counter() - t0
    return {"method": method, "model": out, "accuracy": accuracy, "baseline": baseline, "log": log, "wall": wall,
            "detail": "quantize_static defaults: QDQ, MinMax, per-tensor, activations QInt8, weights QInt8"}


def run_nncf(task: Task, work: Path, cap_s: float, opset13: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"method": "nncf_ac_opset13" if opset13 else "nncf_ac"}
    try:
        import nncf
        from nncf.quantization.algorithms.accuracy_control import algorithm as ac_algorithm
        from nncf.quantization.algorithms.accuracy_control import ranker as ac_ranker
    except Exception as exc:
        row["error"] = f"nncf not importable: {type(exc).__name__}: {exc}"
        return row
    nncf.set_log_level(logging.WARNING)
    log = CallLog(task.n_items)
    info: dict[str, Any] = {"groups_to_rank": [], "report": None}
    # record what NNCF does (no file is edited): groups it ranks, the restorer's report
    orig_find = ac_ranker.Ranker.find_groups_of_quantizers_to_rank
    orig_report = ac_algorithm.QuantizationAccuracyRestorer._print_report

    def find(self, graph):
        groups = orig_find(self, graph)
        info["groups_to_rank"].append(len(groups))
        return groups

    def report(rep, max_num_iterations):
        info["report"] = {"removed_groups": len(rep.removed_groups), "iterations": rep.num_iterations,
                          "quantized_ops": rep.num_quantized_operations, "reached": rep.reached_required_drop,
                          "removed_all": rep.removed_all,
                          "reverted_ops": sum(len(g.operations) for g in rep.removed_groups)}
        return orig_report(rep, max_num_iterations)

    ac_ranker.Ranker.find_groups_of_quantizers_to_rank = find
    ac_algorithm.QuantizationAccuracyRestorer._print_report = staticmethod(report)
    deadline = time.perf_counter() + cap_s

    def validation_fn(model, items):
        idx = [int(i) for i in items]
        if time.perf_counter() > deadline:
            raise BudgetExceeded(f"NNCF time cap of {cap_s:.0f} s reached")
        t = time.perf_counter()
        scores = task.score_items(session(model, task.eval_threads), idx)
        log.record(len(idx), time.perf_counter() - t)
        return float(scores.mean()), scores.tolist()

    out = work / f"{task.key}_{row['method']}.onnx"
    t0 = time.perf_counter()
    try:
        model = onnx.load(str(task.model_path))
        if opset13:
            from onnx import version_converter

            model = version_converter.convert_version(model, 13)
            row["detail"] = "model converted to opset 13 with onnx.version_converter before NNCF (time included)"
        calib = nncf.Dataset(task.calib)
        val = nncf.Dataset(list(range(task.n_items)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = nncf.quantize_with_accuracy_control(model, calib, val, validation_fn, max_drop=ALLOWED_DROP,
                                                    drop_type=nncf.DropType.ABSOLUTE)
        onnx.save(q, str(out))
        row["model"] = out
    except BudgetExceeded as exc:
        row["error"] = f"did not finish: {exc} (no model delivered)"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
    finally:
        ac_ranker.Ranker.find_groups_of_quantizers_to_rank = orig_find
        ac_algorithm.QuantizationAccuracyRestorer._print_report = orig_report
    row.update(wall=time.perf_counter() - t0, log=log, info=info, cap=cap_s)
    if "model" in row:
        row["accuracy"] = task.score(str(out))  # re-check, uncounted
    return row


def run_autoquant(task: Task, work: Path, label: str, n_trials: int, stop_when_feasible: bool, seed: int,
                  timeout: float | None, progress: bool, baseline_accuracy: float | None = None) -> dict[str, Any]:
    """One optimize() run. ``baseline_accuracy``: the fp32 score handed to optimize() (it then makes no fp32 eval
    call of its own)."""
    log = CallLog(task.n_items)
    evaluate = counted_eval(task, log)
    out_dir = work / f"out_{task.key}_{label}"
    shutil.rmtree(out_dir, ignore_errors=True)
    row: dict[str, Any] = {"method": label, "log": log}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = optimize(str(task.model_path), task.calibration, evaluate, allowed_accuracy_drop=ALLOWED_DROP,
                           drop_type="absolute", higher_is_better=True, search_space=task.space, n_trials=n_trials,
                           timeout=timeout, seed=seed, output_dir=out_dir, show_progress=progress,
                           stop_when_feasible=stop_when_feasible, baseline_accuracy=baseline_accuracy)
        row["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught
                                  if issubclass(w.category, UserWarning)})
    except Exception as exc:
        row["wall"] = time.perf_counter() - t0
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
        print(row["traceback"], flush=True)
        return row
    row["wall"] = time.perf_counter() - t0
    row.update(result=res, model=Path(res.model_path), accuracy_reported=res.accuracy, baseline=res.baseline_accuracy,
               eval_calls_reported=res.eval_calls)
    row["accuracy"] = task.score(res.model_path)  # re-check, uncounted
    df = res.report(all_trials=True)
    row["states"] = dict(collections.Counter(df["state"]))
    trials = res.study.get_trials(deepcopy=False)
    row["trials"] = [{
        "n": t.number, "state": t.state.name, "acc": t.user_attrs.get("accuracy"), "feasible": t.user_attrs.get("feasible"),
        "enqueued": t.user_attrs.get("enqueued"), "prune": t.user_attrs.get("prune_reason"),
        "fail": t.user_attrs.get("fail_reason"), "config": t.user_attrs.get("config") or t.params,
        "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None,
        "build": (t.user_attrs.get("details") or {}).get("build_seconds"),
        "sha": ((t.user_attrs.get("details") or {}).get("sha256") or "")[:10],
    } for t in trials]
    row["first_feasible"] = next((t["n"] for t in row["trials"] if t["feasible"]), None)
    row["timed_out"] = timeout is not None and len([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]) < n_trials \
        and not (stop_when_feasible and row["first_feasible"] is not None)
    return row


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
#: the config keys shown in this report (no "mode": as in the runs published so far)
CONFIG_KEYS = ("calibration", "percentile", "weight_granularity", "weight_symmetric", "activation_symmetric",
               "weight_bits", "activation_bits", "weight_rounding", "cle", "bn_fold", "bias_correction", "fallback_k",
               "a16_k", "w4_fraction")
DISTS = ("nncf", "scipy", "scikit-learn", "rapidocr-onnxruntime", "pillow")  # versions in the report


PEERS = ("ort_default", "nncf_ac", "nncf_ac_opset13")
AQ = ("autoquant_first", "autoquant_first_known_fp32", "autoquant_n20")
STOP_WHEN_FEASIBLE = ("autoquant_first", "autoquant_first_known_fp32")
KNOWN_FP32 = ("autoquant_first_known_fp32",)  # given the benchmark's fp32 score: optimize(baseline_accuracy=...)
METHOD_TITLE = {"ort_default": "ORT quantize_static (defaults)", "nncf_ac": "NNCF quantize_with_accuracy_control",
                "nncf_ac_opset13": "NNCF quantize_with_accuracy_control, model converted to opset 13",
                "autoquant_first": "autoquant stop_when_feasible",
                "autoquant_first_known_fp32": "autoquant stop_when_feasible, fp32 score given",
                "autoquant_n20": "autoquant n_trials=20"}


def within(row: dict, fp32: float) -> bool | None:
    if row.get("accuracy") is None:
        return None
    return fp32 - row["accuracy"] <= ALLOWED_DROP + 1e-12


def targets(rows: dict[str, dict], fp32: float) -> list[dict[str, Any]]:
    """Per autoquant row: within the limit; <= 1/2 the full eval calls of the best peer meeting the limit (fewest
    full calls; ties: higher accuracy); delivered accuracy >= that peer's."""
    peers = [rows[p] for p in PEERS if p in rows and within(rows[p], fp32)]
    best = min(peers, key=lambda r: (r["log"].full, -r["accuracy"])) if peers else None
    out = []
    for a in AQ:
        r = rows.get(a)
        if r is None:
            continue
        t = {"method": a, "within": within(r, fp32), "peer": best["method"] if best else None}
        if r.get("accuracy") is None:
            t.update(calls=None, acc=None)
        elif best is None:
            t.update(calls="n/a (no peer met the limit)", acc="n/a (no peer met the limit)")
        else:
            t["calls"] = r["log"].full * 2 <= best["log"].full
            t["acc"] = r["accuracy"] >= best["accuracy"] - 1e-12
            t["calls_detail"] = f"{r['log'].full} vs {best['log'].full}"
            t["acc_detail"] = f"{r['accuracy']:.4f} vs {best['accuracy']:.4f}"
        out.append(t)
    return out


def write_report(tasks: list[Task], results: dict[str, dict[str, dict]], failed: list[tuple[str, str]], args, info,
                 total_s: float, path: Path) -> None:
    L: list[str] = []
    cmd = "python experiments/bench_search.py" + (" " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "")
    L += ["# Search efficiency: autoquant vs ORT quantize_static vs NNCF accuracy control", "",
          "Reproduce (from the repository root, with the venv's Python):", "", "```",
          "pip install nncf scikit-learn rapidocr-onnxruntime pillow", cmd, "```", "",
          f"- date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; total wall time of this run: {total_s / 60:.1f} min",
          f"- machine: {info['cpu']}, {info['cores']} cores; load average at the end: {info['load']} "
          f"(at the start: {args.load_start})",
          f"- autoquant code: commit {args.commit_start} when the run started (imported then)"
          + ("" if info["commit"] == args.commit_start else f"; the repository was at {info['commit']} when it ended"),
          f"- versions: {info['versions']}",
          f"- limit: absolute drop <= {ALLOWED_DROP} of each model's metric, identical for every method; seed {args.seed}",
          "- full eval calls: calls of the eval function on the whole eval set, counted by one wrapper for every method "
          "(autoquant's eval callback; NNCF's validation function when it receives every item). They include each "
          "method's own fp32 baseline call (all but the row below); `ort_default` = fp32 + quantized model (what a "
          "user must run to know the drop). NNCF's calls on fewer items (mode detection on 1 item, ranking subsets) "
          "are listed separately.",
          f"- `{METHOD_TITLE['autoquant_first_known_fp32']}` (`autoquant_first_known_fp32`) is `optimize(..., "
          "stop_when_feasible=True, baseline_accuracy=<fp32 score>)`: this row is GIVEN the fp32 score, as a user who "
          "already knows it would give it. The score is the one this benchmark measures once per model (the fp32 "
          "value every method is compared against); that measurement is not counted in this row's full eval calls, "
          "and autoquant makes no fp32 eval call of its own. NNCF's API (`quantize_with_accuracy_control`) has no "
          "such option: it always validates the fp32 model itself, and that call is counted in its row. In the "
          "targets table this row's calls therefore exclude the fp32 baseline while the peers' include it.",
          "- accuracy: each delivered file re-scored once by the benchmark (not counted). Latency: ORT CPU, 1 thread, "
          f"delivered model and fp32 interleaved run by run, median of {args.latency_runs} (PP-OCR: "
          f"{args.ocr_latency_runs}) runs after 3 warm-ups, measured in this run. Size: file bytes / fp32 file bytes.",
          ""]
    L += ["## Results", "",
          "| model | method | accuracy (fp32) | drop | within 0.01 | size ratio | latency ratio | full eval calls "
          "| subset eval calls (items) | wall s | notes |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for m in (*PEERS, *AQ):
            r = results.get(task.key, {}).get(m)
            if r is None:
                continue
            log = r.get("log")
            note = r.get("error") or r.get("note") or ""
            lat = r.get("latency")
            sub = f"{log.subset} ({log.subset_items})" if log and log.subset else ("0" if log else "–")
            acc = f"{r['accuracy']:.4f} ({task.fp32_score:.4f})" if r.get("accuracy") is not None else f"– ({task.fp32_score:.4f})"
            drop = task.fp32_score - r["accuracy"] if r.get("accuracy") is not None else None
            L.append(f"| {task.key} | {METHOD_TITLE[m]} | {acc} | {fmt(drop)} | {fmt(within(r, task.fp32_score))} "
                     f"| {fmt(r.get('size_ratio'), 3)} | {fmt(lat[0] if lat else None, 2)} | {log.full if log else '–'} "
                     f"| {sub} | {r.get('wall', 0):.0f} | {note} |")
    L += ["", "## Targets", "",
          "Targets of the issue, per autoquant row: (1) within the limit; (2) at most half the full eval calls of the "
          "best peer that also meets the limit (best = fewest full eval calls; ties: higher accuracy); (3) delivered "
          "accuracy >= that peer's. With no peer within the limit, (2) and (3) have nothing to compare with (n/a).", "",
          "| model | autoquant run | (1) within limit | best peer within limit | (2) <= 1/2 its full calls | (3) accuracy >= its |",
          "|---|---|---|---|---|---|"]
    summary = collections.Counter()
    for task in tasks:
        rows = results.get(task.key, {})
        for t in targets(rows, task.fp32_score):
            calls = t["calls"] if isinstance(t["calls"], str) or t["calls"] is None else \
                f"{'met' if t['calls'] else 'NOT met'} ({t['calls_detail']})"
            acc = t["acc"] if isinstance(t["acc"], str) or t["acc"] is None else \
                f"{'met' if t['acc'] else 'NOT met'} ({t['acc_detail']})"
            L.append(f"| {task.key} | {METHOD_TITLE[t['method']]} | {'met' if t['within'] else 'NOT met'} "
                     f"| {METHOD_TITLE.get(t['peer'], '–') if t['peer'] else 'none'} | {calls} | {acc} |")
            summary[(t["method"], "within")] += bool(t["within"])
    L.append("")
    # per model details
    for task in tasks:
        rows = results.get(task.key, {})
        L += [f"## {task.key}: {task.title}", "",
              f"- metric: {task.metric}; fp32 {task.fp32_score:.4f} on {task.n_items} eval items",
              f"- data: {task.data_desc}", f"- latency input: {task.latency_desc}",
              f"- autoquant search space: {task.space_desc}", f"- task setup: {task.setup_seconds:.1f} s"]
        L += [f"- {n}" for n in task.notes]
        for m in (*PEERS, *AQ):
            r = rows.get(m)
            if r is None:
                continue
            lat = r.get("latency")
            L += ["", f"### {METHOD_TITLE[m]}", ""]
            if lat:
                L.append(f"- latency: fp32 {lat[1]:.2f} ms, delivered {lat[2]:.2f} ms (ratio {lat[0]:.2f})")
            log = r.get("log")
            if log:
                L.append(f"- eval calls: {log.full} full ({log.full_seconds:.1f} s), {log.subset} on subsets "
                         f"({log.subset_items} items, {log.subset_seconds:.1f} s); wall {r.get('wall', 0):.1f} s")
            if r.get("detail"):
                L.append(f"- {r['detail']}")
            if r.get("error"):
                L.append(f"- **{r['error']}**")
            if r.get("traceback"):
                L += ["", "```", r["traceback"].strip()[-3000:], "```"]
            if m.startswith("nncf_ac") and r.get("info"):
                inf = r["info"]
                L.append(f"- time cap for this run: {r.get('cap', 0):.0f} s (checked at each validation call)")
                if inf["groups_to_rank"]:
                    L.append(f"- groups of quantizers ranked: {inf['groups_to_rank']} (one ranking-subset validation "
                             f"each; NNCF's default ranking subset is 300 items, so with <= 300 eval items every "
                             f"ranking call is a full eval)")
                if inf["report"]:
                    rep = inf["report"]
                    L.append(f"- accuracy restorer: {rep['quantized_ops']} quantized ops; reverted {rep['removed_groups']} "
                             f"groups ({rep['reverted_ops']} ops) to float in {rep['iterations'] + 1} iterations; "
                             f"reached the limit: {rep['reached']}; reverted everything: {rep['removed_all']}")
                elif "model" in r:
                    L.append("- the default quantization already met the limit: no layer reverted")
            if m in AQ and r.get("result") is not None:
                res = r["result"]
                L.append(f"- delivered trial {res.trial_number} ({'feasible' if res.feasible else 'NOT feasible'}): "
                         f"accuracy {res.accuracy:.4f} (re-check {r['accuracy']:.4f}), config: "
                         f"{config_str(res.config, CONFIG_KEYS)}")
                if m in KNOWN_FP32:
                    L.append(f"- fp32 score given as optimize(baseline_accuracy=...): {task.fp32_score:.4f} (measured "
                             f"once by this benchmark, not counted here); result.baseline_accuracy "
                             f"{res.baseline_accuracy:.4f}")
                L.append(f"- autoquant's own numbers: eval_calls {res.eval_calls} (our wrapper counted {log.full}), "
                         f"size_ratio {res.size_ratio:.3f}, latency_ratio {fmt(res.latency_ratio, 2)} (1 thread; "
                         f"{fmt(getattr(res, 'latency_ratio_default_threads', None), 2)} with ORT's default threads); "
                         f"float nodes {len(res.float_nodes)}")
                if getattr(res, "timings", None):
                    L.append("- stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items()))
                L.append(f"- trials: {r['states']}; first feasible trial: {fmt(r['first_feasible'])}"
                         + ("; stopped by the time cap before n_trials" if r.get("timed_out") else ""))
                L += ["", "| trial | state | accuracy | feasible | trial s | build s | model sha256[:10] | config; prune / fail reason |",
                      "|---|---|---|---|---|---|---|---|"]
                for t in r["trials"]:
                    why = config_str(t["config"], CONFIG_KEYS) + (f"; **{t['prune'] or t['fail']}**"
                                                                  if t["prune"] or t["fail"] else "")
                    tag = f" [enqueued: {t['enqueued']}]" if t["enqueued"] else ""
                    L.append(f"| {t['n']} | {t['state']} | {fmt(t['acc'])} | {fmt(t['feasible'])} | {fmt(t['seconds'], 1)} "
                             f"| {fmt(t['build'], 1)} | {t['sha'] or '–'} | {why}{tag} |")
                if r.get("warnings"):
                    L += [""] + [f"- warning: {w}" for w in r["warnings"]]
        if getattr(task, "sens_cost", None):
            L += ["", "### Cost of the default space's per-node sensitivity pass on this model", ""]
            L += [f"- {k}: {v}" for k, v in task.sens_cost.items()]
        L.append("")
    if failed:
        L += ["## Models that could not be set up", ""] + [f"- {k}: {e}" for k, e in failed] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.append:  # a supplementary run: kept below the main run's report, headings one level down
        if getattr(args, "base_text", None) is None:
            args.base_text = path.read_text() if path.exists() else ""
        L[0] = "# Supplementary run (appended to this file by --append): " + L[0].lstrip("# ")
        L = [("#" + x) if x.startswith("#") else x for x in L]
        path.write_text(args.base_text.rstrip("\n") + "\n\n" + "\n".join(L) + "\n")
    else:
        path.write_text("\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="subset of: outlier digits ppocr_rec")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of: ort_default nncf_ac "
                    "autoquant_first autoquant_first_known_fp32 autoquant_n20")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-trials", type=int, default=20)
    ap.add_argument("--outlier-eval", type=int, default=2000)
    ap.add_argument("--digits-maxiter", type=int, default=120, help="L-BFGS iterations of the digits CNN")
    ap.add_argument("--ocr-eval", type=int, default=96)
    ap.add_argument("--ocr-calib", type=int, default=32)
    ap.add_argument("--ocr-full-space", action="store_true", help="PP-OCR with the full default space (its per-node "
                    "sensitivity pass alone takes far longer than this run's budget)")
    ap.add_argument("--ocr-aq-timeout", type=float, default=300.0, help="timeout= of each autoquant run on PP-OCR (s)")
    ap.add_argument("--nncf-cap", type=float, default=300.0, help="time cap of each NNCF run (s)")
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--ocr-latency-runs", type=int, default=15)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_search.md")
    ap.add_argument("--append", action="store_true", help="append this run's report to --out (a supplementary run) "
                    "instead of replacing the file")
    ap.add_argument("--nncf-opset13", action="store_true", help="also run NNCF on the model converted to opset 13 with "
                    "onnx.version_converter (NNCF quantizes opset < 13 per tensor only)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    args.load_start = loadavg()
    args.commit_start = code_state()
    logging.getLogger("nncf").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    order = ["outlier", "digits", "ppocr_rec"]
    methods = args.methods or ["ort_default", "nncf_ac", *AQ]
    if args.nncf_opset13 and "nncf_ac_opset13" not in methods:
        methods.insert(methods.index("nncf_ac") + 1 if "nncf_ac" in methods else 0, "nncf_ac_opset13")
    work, tmp = work_dir(args.workdir, "bench-search-")
    makers = {
        "outlier": lambda: make_outlier_task(work, args.seed, args.outlier_eval),
        "digits": lambda: make_digits_task(work, args.seed, args.digits_maxiter),
        "ppocr_rec": lambda: make_ocr_task(work, args.seed, args.ocr_eval, args.ocr_calib, args.ocr_full_space),
    }
    t_all = time.perf_counter()
    tasks, results, failed = [], {}, []
    for key, task in set_up(makers, [k for k in order if args.only is None or k in args.only], failed):
        task.fp32_score = task.score(str(task.model_path))
        print(f"[{key}] fp32 {task.fp32_score:.4f} ({task.setup_seconds:.1f} s setup)", flush=True)
        tasks.append(task)
        rows: dict[str, dict] = {}
        results[key] = rows
        is_ocr = key == "ppocr_rec"
        for m in methods:
            print(f"[{key}] {m} ...", flush=True)
            if m == "ort_default":
                row = run_ort_default(task, work)
            elif m == "nncf_ac":
                row = run_nncf(task, work, args.nncf_cap)
            elif m == "nncf_ac_opset13":
                if max(o.version for o in onnx.load(str(task.model_path), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")) >= 13:
                    continue  # nothing to convert: same as nncf_ac
                row = run_nncf(task, work, args.nncf_cap, opset13=True)
            else:
                row = run_autoquant(task, work, m, args.n_trials, m in STOP_WHEN_FEASIBLE, args.seed,
                                    args.ocr_aq_timeout if is_ocr else None, args.progress,
                                    baseline_accuracy=task.fp32_score if m in KNOWN_FP32 else None)
            if row.get("model") is not None and Path(row["model"]).exists():
                row["size_ratio"] = Path(row["model"]).stat().st_size / task.model_path.stat().st_size
                row["latency"] = latency_ratio(row["model"], task.model_path, task.latency_feed,
                                               args.ocr_latency_runs if is_ocr else args.latency_runs)
            rows[m] = row
            if is_ocr and m in AQ and not args.ocr_full_space and row.get("result") is not None \
                    and getattr(task, "sens_cost", None) is None:
                try:
                    task.sens_cost = sensitivity_cost(work / f"out_{key}_{m}", row["result"].study.user_attrs["stats_key"])
                except Exception as exc:
                    task.sens_cost = {"error": f"{type(exc).__name__}: {exc}"}
            acc = row.get("accuracy")
            print(f"[{key}] {m}: accuracy {fmt(acc)} (fp32 {task.fp32_score:.4f}), full calls "
                  f"{row['log'].full if row.get('log') else '–'}, subset calls {row['log'].subset if row.get('log') else '–'}, "
                  f"wall {row.get('wall', 0):.0f} s {row.get('error') or ''}", flush=True)
        write_report(tasks, results, failed, args, machine_info(DISTS), time.perf_counter() - t_all, args.out)
    write_report(tasks, results, failed, args, machine_info(DISTS), time.perf_counter() - t_all, args.out)
    print(f"wrote {args.out} ({(time.perf_counter() - t_all) / 60:.1f} min)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
