"""Benchmark of autoquant's per-node sensitivity pass against the method it replaced, on real models.

Both methods give, per compute node, the SQNR (dB) of the model outputs vs fp32 when only that node is quantized:

- fast (``autoquant.sensitivity.measure_sensitivity``, what ``optimize()`` runs): one ``quantize_static`` per
  precision on all nodes, single-node models derived from it, each run downstream of its Q/DQ only, from cached
  fp32 tensors;
- per-node (``autoquant.sensitivity.measure_sensitivity_per_node``, the reference, still used when the full build
  fails): one ``quantize_static(nodes_to_quantize=[node])`` build and one ORT session per node. Timed with what
  autoquant's fallback path adds around it: the ranges of the precision and the fp32 reference outputs.

Each model is prepared as ``optimize()`` prepares it: nodes named, ``autoquant.model.prepare_model``, statistics of
every float activation collected in one pass over the calibration feeds as given
(``autoquant.stats.collect_statistics``), and the ranking done on the BatchNorm-folded variant with the base
model's statistics (the variant the default space ranks on). Both methods then get the same model, statistics
and feeds (the first ``MAX_SAMPLES`` feeds the statistics keep), one after the other in the same process: fast
first, then per-node, the fast one into a fresh cache folder.

Models (``--models``): ``ppocr_rec``, the PP-OCRv4 text recognizer shipped in the rapidocr-onnxruntime wheel,
calibrated on Pillow-rendered text lines at a fixed padded width of 320 in feeds of 8 (``_ocr.OcrData``, the
calibration of bench_real_models.py and bench_search.py); ``demo`` and ``demo_outlier``, autoquant's demo CNNs
(``autoquant.demo.DemoTask``, the second with BatchNormalization).

Reported per model and precision: node count, wall and CPU seconds of each method, the speed-up, Spearman's rank
correlation of the two SQNR vectors (infinite values capped just beyond the finite ones) and the overlap of the
two top-10 lists (``autoquant.sensitivity.rank_nodes``: most sensitive first).

    pip install rapidocr-onnxruntime pillow scipy
    python experiments/bench_sensitivity.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime.quantization  # noqa: F401  (imported before any timing: both methods use it)
from scipy.stats import spearmanr

from autoquant import sensitivity as S
from autoquant.build import RangeCache
from autoquant.data import CalibrationSource
from autoquant.model import compute_nodes, ensure_node_names, float_activation_tensors, load_model, prepare_model
from autoquant.stats import collect_statistics
from autoquant.variants import BN_FOLD, make_variant

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import code_state, fmt, loadavg, machine_info, md_table, publish, set_up, work_dir  # noqa: E402

DISTS = ("scipy", "rapidocr-onnxruntime", "pillow")
MODELS = ("ppocr_rec", "demo", "demo_outlier")
TOP = 10


@dataclass
class Case:
    """A model as prepared for the sensitivity pass, with its statistics."""

    key: str
    title: str
    data_desc: str
    path: Path  # the BatchNorm-folded prepared model the nodes are ranked on
    stats: Any
    nodes: list[str]
    steps: list[str]
    feed_shapes: list[str]
    setup_seconds: float
    rows: list[dict] = field(default_factory=list)


def prepare(key: str, title: str, data_desc: str, model_path: Path, feeds: list[dict], work: Path, t0: float) -> Case:
    """What optimize() does before its sensitivity pass: name nodes, prepare, collect statistics on the base model,
    fold BatchNorm."""
    proto = load_model(str(model_path))
    steps = [f"named {n} unnamed nodes"] if (n := ensure_node_names(proto)) else []
    prepared = prepare_model(proto, work / f"{key}-prepared.onnx")
    base = prepared.load()
    stats, _ = collect_statistics(base, float_activation_tensors(base), CalibrationSource(feeds, prepared.input_specs),
                                  prepared.sha256)
    folded, more = make_variant(base, BN_FOLD)
    path = work / f"{key}-prepared-bn_fold.onnx"
    onnx.save(folded, str(path))
    shapes = [" + ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in s.items()) for s in stats.samples]
    return Case(key, title, data_desc, path, stats, compute_nodes(folded), steps + prepared.steps + more, shapes,
                time.perf_counter() - t0)


def make_ocr(args, work: Path) -> Case:
    from _ocr import OcrData

    t0 = time.perf_counter()
    data = OcrData(args.seed, 0, args.ocr_calib, calib_batch=args.ocr_batch)
    return prepare("ppocr_rec", f"PP-OCRv4 rec (rapidocr-onnxruntime {data.version})",
                   f"{args.ocr_calib} rendered text lines at a fixed padded width of 320, feeds of {args.ocr_batch}",
                   data.model_path, list(data.calibration()), work, t0)


def make_demo(args, work: Path, kind: str) -> Case:
    from autoquant.demo import DemoTask

    t0 = time.perf_counter()
    task = DemoTask(work / f"demo_{kind}", seed=args.seed, n_calib=args.demo_calib, n_eval=50,
                    calib_batch=args.demo_batch, kind=kind)
    key = "demo" if kind == "spiky" else f"demo_{kind}"
    return prepare(key, f"autoquant demo CNN (kind={kind})",
                   f"{args.demo_calib} demo images, feeds of {args.demo_batch}", task.model_path,
                   list(task.calibration_data()), work, t0)


# ---------------------------------------------------------------------------------------------------
# the two methods, and how their rankings compare
# ---------------------------------------------------------------------------------------------------
def timed(fn) -> tuple[Any, float, float, str]:
    """(result, wall s, CPU s of this process, load average before)."""
    load = loadavg()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0, load


def run_fast(case: Case, precision: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-sens-") as cache:
        res = S.measure_sensitivity(case.path, case.stats, case.nodes, Path(cache), precisions=[precision])
    return {n: d[precision] for n, d in res.items()}


def run_per_node(case: Case, precision: str) -> dict[str, float]:
    config = S.PRECISIONS[precision]
    samples = case.stats.samples[:S.MAX_SAMPLES]
    ranges = RangeCache(case.stats).ranges(config)
    reference = S.run_outputs(S.session(case.path, S.fast_session_options()), samples)
    return S.measure_sensitivity_per_node(case.path, ranges, config, case.nodes, samples, reference)


def capped(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.nan_to_num(values, posinf=hi, neginf=lo)


def compare(fast: dict[str, float], slow: dict[str, float], precision: str, top: int = TOP) -> dict[str, Any]:
    nodes = list(fast)
    a, b = np.array([fast[n] for n in nodes]), np.array([slow[n] for n in nodes])
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    lo, hi = (finite.min() - 1.0, finite.max() + 1.0) if finite.size else (-1.0, 1.0)
    rho = float(spearmanr(capped(a, lo, hi), capped(b, lo, hi)).statistic) if len(nodes) > 2 else float("nan")
    both = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(a[both] - b[both])
    rank_a = S.rank_nodes({n: {precision: fast[n]} for n in nodes}, precision)[:top]
    rank_b = S.rank_nodes({n: {precision: slow[n]} for n in nodes}, precision)[:top]
    return {"rho": rho, "top": len(rank_a), "overlap": len(set(rank_a) & set(rank_b)),
            "inf": (int((~np.isfinite(a)).sum()), int((~np.isfinite(b)).sum())),
            "same_inf": int((~np.isfinite(a) & ~np.isfinite(b)).sum()),
            "median_diff": float(np.median(diff)) if diff.size else float("nan"),
            "max_diff": float(diff.max()) if diff.size else float("nan"),
            "over_half_db": int((diff > 0.5).sum()),
            "top_fast": [(n, fast[n]) for n in rank_a], "top_slow": [(n, slow[n]) for n in rank_b]}


def measure(case: Case, precision: str, top: int) -> dict[str, Any]:
    print(f"[{case.key}] {precision}: fast method on {len(case.nodes)} nodes ...", flush=True)
    fast, t_fast, c_fast, load_fast = timed(lambda: run_fast(case, precision))
    print(f"[{case.key}] {precision}: fast {t_fast:.1f} s; per-node method ...", flush=True)
    slow, t_slow, c_slow, load_slow = timed(lambda: run_per_node(case, precision))
    print(f"[{case.key}] {precision}: per-node {t_slow:.1f} s", flush=True)
    return {"precision": precision, "fast_s": t_fast, "fast_cpu": c_fast, "fast_load": load_fast, "slow_s": t_slow,
            "slow_cpu": c_slow, "slow_load": load_slow, **compare(fast, slow, precision, top)}


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def secs(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def write_report(cases: list[Case], failed: list[tuple[str, str]], args, info: dict, started: dt.datetime,
                 total_s: float) -> None:
    cmd = "python experiments/bench_sensitivity.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    workers = max(1, min(4, os.cpu_count() or 1))
    end_commit = code_state()
    L = ["# Sensitivity pass: derived single-node models vs one build per node", "",
         "Reproduce (from the repository root, with the venv's Python):", "", "```",
         "pip install rapidocr-onnxruntime pillow scipy", cmd, "```", "",
         f"- date: {started.strftime('%Y-%m-%d %H:%M %Z')}; total wall time of this run: {total_s / 60:.1f} min",
         f"- autoquant code: commit {info['commit']} at the start"
         + ("" if end_commit == info["commit"] else f", {end_commit} at the end"),
         f"- machine: {info['cpu']}, {info['cores']} cores; load average at the start {info['load']}, at the end "
         f"{loadavg()} (other jobs ran on this machine: see the load before each measurement in the table)",
         f"- versions: {info['versions']}",
         f"- fast = `measure_sensitivity` (one quantize_static per precision, single-node models derived from it, "
         f"run downstream only; {workers} worker threads here: min(4, cores, nodes)), into a fresh cache folder. "
         "per-node = `measure_sensitivity_per_node` (one quantize_static(nodes_to_quantize=[node]) and one ORT "
         "session per node, single-threaded), timed together with the ranges and the fp32 reference outputs it "
         "needs. Same model, statistics and feeds; fast first, then per-node, in one process.",
         f"- feeds: the first {S.MAX_SAMPLES} calibration feeds as given (what autoquant's pass uses); ranges from "
         "the statistics of all calibration feeds. Model: the BatchNorm-folded prepared model (the variant "
         "autoquant ranks on), base-model statistics.",
         f"- CPU s: `time.process_time()` of this process (all its threads). Spearman: over all nodes, infinite "
         f"SQNR capped just beyond the finite values. Top-{args.top} overlap: nodes common to both top-{args.top} "
         "lists of `rank_nodes` (most sensitive first). |ΔdB|: over nodes finite in both.", "",
         "## Results", ""]
    rows = []
    for c in cases:
        for r in c.rows:
            rows.append([c.key, r["precision"], len(c.nodes), f"{secs(r['fast_s'])} ({secs(r['fast_cpu'])})",
                         f"{secs(r['slow_s'])} ({secs(r['slow_cpu'])})", f"{r['slow_s'] / r['fast_s']:.1f}×",
                         f"{r['slow_cpu'] / r['fast_cpu']:.1f}×", fmt(r["rho"]), f"{r['overlap']}/{r['top']}",
                         f"{fmt(r['median_diff'], 3)} / {fmt(r['max_diff'], 3)}", r["over_half_db"],
                         f"{r['inf'][0]} / {r['inf'][1]} ({r['same_inf']} both)",
                         f"{r['fast_load'].split()[0]} / {r['slow_load'].split()[0]}"])
    L.append(md_table(["model", "precision", "nodes", "fast s (CPU s)", "per-node s (CPU s)", "speed-up wall",
                       "speed-up CPU", "Spearman ρ", f"top-{args.top} overlap", "median / max |ΔdB|",
                       "nodes |ΔdB| > 0.5", "inf fast / per-node", "1-min load before fast / per-node"], rows))
    for key, msg in failed:
        L.append(f"\n**{key} failed to set up**: {msg}")
    L += ["", "## Models", ""]
    L.append(md_table(["model", "calibration", "feeds (shape)", "prepared: steps", "set-up s"],
                      [[c.key, c.data_desc, f"{len(c.feed_shapes)} ({c.feed_shapes[0]})",
                        "; ".join(c.steps) or "–", f"{c.setup_seconds:.1f}"] for c in cases]))
    for c in cases:
        for r in c.rows:
            L += ["", f"### {c.title}, {r['precision']}: top {r['top']} (SQNR dB)", ""]
            L.append(md_table(["#", "fast", "per-node"],
                              [[i + 1, f"{a} ({a_v:.2f})", f"{b} ({b_v:.2f})"]
                               for i, ((a, a_v), (b, b_v)) in enumerate(zip(r["top_fast"], r["top_slow"]))]))
    publish(args.out, "\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["ppocr_rec", "demo"], choices=MODELS)
    ap.add_argument("--precisions", nargs="*", default=["w8a8"], choices=list(S.PRECISIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ocr-calib", type=int, default=64, help="rendered calibration lines")
    ap.add_argument("--ocr-batch", type=int, default=8, help="lines per calibration feed")
    ap.add_argument("--demo-calib", type=int, default=256, help="demo calibration images")
    ap.add_argument("--demo-batch", type=int, default=32, help="images per demo calibration feed")
    ap.add_argument("--top", type=int, default=TOP, help="length of the top lists compared")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the prepared models here")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_sensitivity.md")
    args = ap.parse_args()

    info, started, t_all = machine_info(DISTS), dt.datetime.now().astimezone(), time.perf_counter()
    work, tmp = work_dir(args.workdir, "bench-sensitivity-")
    makers = {"ppocr_rec": lambda: make_ocr(args, work), "demo": lambda: make_demo(args, work, "spiky"),
              "demo_outlier": lambda: make_demo(args, work, "outlier")}
    cases: list[Case] = []
    failed: list[tuple[str, str]] = []
    try:
        for _, case in set_up(makers, args.models, failed):
            print(f"[{case.key}] {len(case.nodes)} nodes, {len(case.feed_shapes)} feeds, set-up "
                  f"{case.setup_seconds:.1f} s", flush=True)
            case.rows = [measure(case, p, args.top) for p in args.precisions]
            cases.append(case)
    finally:
        if tmp is not None:
            tmp.cleanup()
    write_report(cases, failed, args, info, started, time.perf_counter() - t_all)


if __name__ == "__main__":
    main()
