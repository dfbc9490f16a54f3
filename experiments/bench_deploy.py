#!/usr/bin/env python
"""Deploy what was scored (issue 14): does every export reproduce the delivered model, or refuse?

Two models: the bundled demo CNN (``autoquant.demo.DemoTask``) and PP-OCR's text-direction classifier as
rapidocr-onnxruntime ships it (``ch_ppocr_mobile_v2.0_cls_infer.onnx``: 53 Conv, 35 BatchNormalization). Per
model, six ``optimize()`` runs: the default space (n_trials 6); one trial each with CLE forced, AdaRound forced
and weight-only mode; the tensorrt and ncnn target presets (n_trials 4). Per delivered model and export format (autoquant.formats):

- export (the format's file plus the float model beside it), or the refusal and its message;
- the rebuild, an ONNX Runtime QDQ model made from the exported float model and the file:
  - AIMET 1.0.0 / 2.0.0 / 0.6.1: ``autoquant.export.import_encodings``;
  - TensorRT cache: TensorRT's implicit int8 emulated with ORT: the cache's activation scales (symmetric int8) and
    weights re-quantized as TensorRT does (symmetric int8 per output channel, max |w| / 127 of the float weights);
  - ncnn table: not rebuilt (ncnn's int8 graph quantizes layer inputs and requantizes inside its layers, which an
    ONNX QDQ model does not express); listed as n/a;
- the max abs difference between the rebuild's and the delivered model's outputs on 8 calibration feeds.

Target: difference 0 (or a refusal with a clear message) in every cell. The cls model runs on random images in
PaddleOCR's input range: the question is reproduction, not accuracy (its eval is agreement with fp32's outputs).

    python experiments/bench_deploy.py

Writes experiments/results/bench_deploy.md (``--out``). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from autoquant import optimize  # noqa: E402
from autoquant.demo import DemoTask  # noqa: E402
from autoquant.deploy import float_model_path, max_abs_diff, rebuild_from_tensorrt_cache  # noqa: E402
from autoquant.errors import AutoQuantError  # noqa: E402
from autoquant.export import export, import_encodings  # noqa: E402
from autoquant.formats import FORMATS  # noqa: E402

#: label -> (knobs fixed in the default space, n_trials, target preset); a target's own space replaces the default
CASES = {"default space (n_trials 6)": ({}, 6, None), "CLE forced": ({"cle": True}, 1, None),
         "AdaRound forced": ({"weight_rounding": "adaround"}, 1, None), "weight-only": ({"mode": "weight_only"}, 1, None),
         "tensorrt preset (n_trials 4)": ({}, 4, "tensorrt"), "ncnn preset (n_trials 4)": ({}, 4, "ncnn")}
N_FEEDS = 8


class ClsTask:
    """PP-OCR's mobile text-direction classifier (3x48x192 inputs in [-1, 1]); score = mean cosine similarity of
    its softmax outputs to fp32's on 64 held-out images."""

    def __init__(self, seed: int = 0):
        import rapidocr_onnxruntime

        base = Path(rapidocr_onnxruntime.__file__).parent
        self.model_path = next(base.rglob("ch_ppocr_mobile_v2.0_cls_infer.onnx"))
        rng = np.random.default_rng(seed)
        self.feeds = [{"x": rng.uniform(-1, 1, (8, 3, 48, 192)).astype(np.float32)} for _ in range(N_FEEDS)]
        held = rng.uniform(-1, 1, (64, 3, 48, 192)).astype(np.float32)
        self.held = held
        self.reference = self._run(str(self.model_path))

    def _run(self, path: str) -> np.ndarray:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return sess.run(None, {name: self.held})[0]

    def calibration_data(self):
        return iter(self.feeds)

    def evaluate(self, path: str) -> float:
        out = self._run(path)
        num = (out * self.reference).sum(axis=1)
        den = np.linalg.norm(out, axis=1) * np.linalg.norm(self.reference, axis=1) + 1e-12
        return float(np.mean(num / den))


def cell(delivered: Path, fmt: str, work: Path, feeds) -> dict:
    target = work / f"export-{fmt}{FORMATS[fmt]}"
    try:
        path = export(delivered, target, fmt)
    except AutoQuantError as exc:
        return {"status": "refused", "detail": f"{type(exc).__name__}: {str(exc)[:160]}",
                "nothing_written": not target.exists() and not float_model_path(target).exists()}
    if fmt == "ncnn-table":
        return {"status": "exported", "detail": "rebuild n/a (ncnn's int8 layers are not ONNX QDQ)",
                "lines": len(path.read_text().splitlines())}
    rebuilt = work / f"rebuilt-{fmt}.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if fmt == "tensorrt-cache":
            rebuild_from_tensorrt_cache(float_model_path(path), path, rebuilt)
        else:
            import_encodings(float_model_path(path), path, rebuilt)
    diff = max_abs_diff(delivered, rebuilt, feeds)
    notes = [str(w.message)[:160] for w in caught if issubclass(w.category, UserWarning)]
    return {"status": "exported", "diff": diff, "detail": "; ".join(notes)}


def run(tasks: dict, work: Path) -> list[dict]:
    rows = []
    for tname, task in tasks.items():
        feeds = list(task.calibration_data())[:N_FEEDS]
        for label, (knobs, n_trials, target) in CASES.items():
            out = work / tname / label.split()[0].lower().replace('-', '_')
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                r = optimize(str(task.model_path), task.calibration_data, task.evaluate,
                             search_space={"knobs": knobs} if knobs else "default", n_trials=n_trials, output_dir=out,
                             show_progress=False, allowed_accuracy_drop=0.01, seed=0, target=target)
            row = {"model": tname, "case": label, "config": {k: r.config.get(k) for k in
                                                             ("mode", "quantize_ops", "weight_granularity", "cle",
                                                              "weight_rounding", "bias_correction", "fallback_k")},
                   "accuracy": r.accuracy, "pipeline_roundtrip": r.roundtrip_max_abs_diff,
                   "wall": time.perf_counter() - t0, "cells": {}}
            for fmt in FORMATS:
                row["cells"][fmt] = cell(Path(r.model_path), fmt, out / "deploy", feeds)
            print(f"[{tname}] {label}: " + ", ".join(
                f"{f}: {c.get('diff', c['status'])}" for f, c in row["cells"].items()), flush=True)
            rows.append(row)
    return rows


def _show(c: dict) -> str:
    if c["status"] == "refused":
        return "refused" + ("" if c.get("nothing_written") else " (BUT FILES LEFT)")
    return "n/a" if "diff" not in c else f"{c['diff']:.3g}"


def write_report(rows: list[dict], out: Path, cmd: str, t_start: float) -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    lines = ["# Deploy what was scored: every export reproduces the delivered model, or refuses", "", "```", cmd, "```",
             "", f"- date: {time.strftime('%Y-%m-%d %H:%M')}; wall {time.time() - t_start:.0f} s; autoquant {rev}; "
             f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, python {platform.python_version()}",
             f"- cells: max abs output difference between the rebuilt model and the delivered quantized.onnx on "
             f"{N_FEEDS} calibration feeds (0 = bit for bit), `refused` = a clear error and nothing written, "
             "`n/a` = exported, no rebuild (see the script's docstring)", "",
             "| model | case | delivered config | pipeline round trip | " + " | ".join(FORMATS) + " |",
             "|---|---|---|---|" + "---|" * len(FORMATS)]
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if v not in (None, False, 0))
        lines.append(f"| {r['model']} | {r['case']} | {cfg} | {r['pipeline_roundtrip']} | "
                     + " | ".join(_show(r["cells"][f]) for f in FORMATS) + " |")
    lines += ["", "Refusals and notes:", ""]
    for r in rows:
        for f, c in r["cells"].items():
            if c.get("detail"):
                lines.append(f"- {r['model']} / {r['case']} / {f}: {c['detail']}")
    cells = [c for r in rows for c in r["cells"].values()]
    bad = [c for c in cells if ("diff" in c and c["diff"] != 0) or (c["status"] == "refused" and not c["nothing_written"])]
    lines += ["", f"Target (difference 0 or refused with nothing written, in every rebuilt cell): "
              f"{'met' if not bad else f'NOT met in {len(bad)} cell(s)'}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_deploy.md")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    t_start = time.time()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_deploy-"))
    tasks = {"demo": DemoTask(work / "demo"), "ppocr_cls": ClsTask()}
    rows = run(tasks, work)
    cmd = "python experiments/bench_deploy.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    write_report(rows, args.out, cmd, t_start)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
