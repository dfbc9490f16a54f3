#!/usr/bin/env python
"""Benchmark: ONNX Runtime's plain ``quantize_static`` (defaults) vs ``autoquant.optimize`` on the demo CNN.

One run, one process, one machine. Reports accuracy / drop / size / single-threaded CPU latency for each
method and splits autoquant's wall time into preparation + statistics, per-trial overhead, the user's
eval and Optuna bookkeeping. The key number is median per-trial overhead / one fp32 eval pass (target
<= 10 %).

    python experiments/bench_core.py --n-trials 30

Writes experiments/results/bench_core.md. This is a benchmark, not a test: it asserts nothing.

autoquant is not modified. To attribute the overhead, this script wraps a few functions (autoquant's
pipeline stages, ORT's quantizer, Optuna's sampler and storage) with a timer that records exclusive
time per category (a few microseconds per call); ``--no-breakdown`` turns that off.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import logging
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

import autoquant
import autoquant.api
import autoquant.build
import autoquant.objective
import autoquant.space
from autoquant import optimize
from autoquant.demo import DemoTask

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import (interleaved_medians, md_table, ort_default_trial, publish, version_cpu_lines,  # noqa: E402
                     work_dir)
ALLOWED_DROP = 0.01


# ---------------------------------------------------------------------------------------------------
# Exclusive-time attribution by monkeypatching (no file of autoquant is changed)
# ---------------------------------------------------------------------------------------------------
class Timers:
    """Exclusive time per (phase, category). Wrapped calls nested in other wrapped calls are subtracted
    from their parent; inside an ``opaque`` category nothing nested is recorded separately."""

    def __init__(self):
        self.excl: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.stack: list[list] = []  # [category, child_seconds, opaque]
        self.phase = "setup"
        self._undo: list = []

    def _wrap(self, fn, category, opaque=False, phase=None):
        """``category``: a name, or a function of the call's arguments returning one."""
        timers = self

        @functools.wraps(fn)
        def wrapper(*a, **k):
            if timers.stack and timers.stack[-1][2]:
                return fn(*a, **k)
            cat = category(*a, **k) if callable(category) else category
            nested_same = bool(timers.stack) and timers.stack[-1][0] == cat  # e.g. cached -> RDB storage
            frame = [cat, 0.0, opaque]
            old_phase = timers.phase
            if phase is not None:
                timers.phase = phase
            timers.stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                d = time.perf_counter() - t0
                timers.stack.pop()
                key = (timers.phase, cat)
                timers.excl[key] += d - frame[1]
                timers.calls[key] += 0 if nested_same else 1
                if timers.stack:
                    timers.stack[-1][1] += d
                timers.phase = old_phase

        wrapper.__wrapped_by_bench__ = True
        return wrapper

    def patch(self, owner, name, cat, opaque=False, phase=None):
        fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if isinstance(owner, type) and isinstance(fn, (staticmethod, classmethod)):
            return  # not needed here
        setattr(owner, name, self._wrap(fn, cat, opaque, phase))
        self._undo.append((owner, name, fn))

    def restore(self):
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo.clear()

    def total(self, phase=None, cat=None) -> float:
        return sum(v for (p, c), v in self.excl.items() if (phase is None or p == phase) and (cat is None or c == cat))


def install_timers(t: Timers) -> None:
    import onnxruntime.quantization.quantize  # noqa: F401  (the package attribute is the function)
    ortq = sys.modules["onnxruntime.quantization.quantize"]
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    # setup stages of optimize()
    t.patch(autoquant.api, "_prepare", "preparation (quant_pre_process)", opaque=True)
    t.patch(autoquant.api, "_statistics", "calibration statistics", opaque=True)
    t.patch(autoquant.api, "measure_sensitivity", "sensitivity ranking (fallback order)", opaque=True)
    t.patch(autoquant.api, "_deliver", "delivery (copy, encodings, report)", opaque=True, phase="delivery")
    # trial loop
    t.patch(autoquant.api, "_run_trials", "trial loop: other (tqdm, count(), study.optimize setup)", phase="loop")
    t.patch(autoquant.objective.Objective, "__call__", "objective: other / unattributed", phase="objective")
    t.patch(autoquant.objective.Objective, "_identical_completed_trial", "dedup lookup (python)")
    t.patch(autoquant.space.SearchSpace, "suggest", "suggest (python)")
    t.patch(autoquant.build.RangeCache, "ranges",
            lambda self, config: f"activation ranges: {config['calibration']} observer (computed once per key)")
    t.patch(autoquant.objective, "build_qdq_model", "build: other (onnx load/save, tempdir, cache json, rounding)")
    t.patch(autoquant.build, "quantize_static", "ORT quantize_static (excl. opset upgrade)")
    t.patch(ortq, "update_opset_version", "ORT update_opset_version (opset->21 for 4/16-bit)")
    t.patch(autoquant.objective.ort, "InferenceSession", "ORT InferenceSession load check")
    t.patch(autoquant.objective, "sha256_file", "sha256 of the trial file")
    for cls in (optuna.samplers.TPESampler,):
        for name in ("sample_independent", "sample_relative", "infer_relative_search_space", "before_trial",
                     "after_trial"):
            if name in cls.__dict__:
                t.patch(cls, name, "Optuna TPE sampler")
    for cls in (RDBStorage, _CachedStorage):
        for name, fn in list(cls.__dict__.items()):
            if callable(fn) and not name.startswith("__") and not isinstance(fn, (staticmethod, classmethod)) \
                    and (not name.startswith("_") or name in ("_get_trials",)):
                kind = "write" if name.startswith(("set_", "create_", "delete_")) else "read"
                t.patch(cls, name, f"Optuna storage {kind}: {name.lstrip('_')}")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
class FeedReader(CalibrationDataReader):
    """ORT's reader over the same feeds autoquant receives."""

    def __init__(self, make_iter):
        self._it = iter(make_iter())

    def get_next(self):
        return next(self._it, None)




def latencies(paths: dict[str, Path], x: np.ndarray, runs: int, warmup: int = 10) -> dict[str, float]:
    """Median seconds of one single-threaded run per model; models are interleaved run by run."""
    return interleaved_medians(paths, {"x": x}, runs, warmup)


def f(x, fmt=".4f"):
    return "—" if x is None else format(x, fmt)


# ---------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--n-eval", type=int, default=20000, help="DemoTask eval-set size (sets the eval cost)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32-evals", type=int, default=5, help="timed fp32 eval passes (median reported)")
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_core.md")
    ap.add_argument("--workdir", type=Path, default=None, help="keep models here (default: a temp dir, deleted)")
    ap.add_argument("--no-breakdown", action="store_true", help="do not wrap functions to attribute overhead")
    ap.add_argument("--progress", action="store_true", help="show autoquant's progress bars")
    ap.add_argument("--storage", choices=("default", "memory"), default="default",
                    help="default: autoquant's SQLite study in output_dir; memory: optuna InMemoryStorage "
                         "(diagnostic: overhead without database commits)")
    args = ap.parse_args()

    np.random.seed(args.seed)
    ort.set_default_logger_severity(3)
    cmd = "python experiments/bench_core.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = dt.datetime.now().astimezone()
    t_script = time.perf_counter()

    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        sys.exit(f"--workdir {args.workdir} is not empty (a resumed study would skip the trials); give an empty one")
    work, tmp = work_dir(args.workdir, "bench_core-")

    # ---- task --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    task = DemoTask(work / "task", seed=args.seed, n_eval=args.n_eval)
    t_task = time.perf_counter() - t0
    fp32 = task.model_path
    fp32_size = fp32.stat().st_size
    n_calib = len(task.calib)
    print(f"demo task: {len(task.eval_x)} eval images, {n_calib} calibration images, setup {t_task:.2f}s")

    task.evaluate(str(fp32))  # warm-up (first session creation)
    fp32_times = []
    for _ in range(args.fp32_evals):
        t0 = time.perf_counter()
        acc_fp32 = task.evaluate(str(fp32))
        fp32_times.append(time.perf_counter() - t0)
    fp32_eval = statistics.median(fp32_times)
    print(f"one fp32 eval pass: median {fp32_eval*1e3:.1f} ms over {args.fp32_evals} (min {min(fp32_times)*1e3:.1f},"
          f" max {max(fp32_times)*1e3:.1f}); fp32 accuracy {acc_fp32}")

    # ---- (1) plain ONNX Runtime quantize_static -----------------------------------------------------
    ort_rows = []
    root = logging.getLogger()
    for label, kwargs in [
        ("ORT quantize_static, defaults (QDQ, MinMax, per-tensor, act QInt8 / wt QInt8 in ORT "
         f"{ort.__version__})", {}),
        ("ORT quantize_static, act QUInt8 / wt QInt8 (older ORT default; = autoquant's enqueued ORT-default trial)",
         {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}),
    ]:
        out = work / f"ort_{len(ort_rows)}.onnx"
        level = root.level
        root.setLevel(logging.ERROR)  # ORT logs a pre-processing hint
        try:
            t0 = time.perf_counter()
            quantize_static(str(fp32), str(out), FeedReader(task.calibration_data), **kwargs)
            t_q = time.perf_counter() - t0
        finally:
            root.setLevel(level)
        t0 = time.perf_counter()
        acc = task.evaluate(str(out))
        t_e = time.perf_counter() - t0
        ort_rows.append(dict(label=label, path=out, acc=acc, t_quant=t_q, t_eval=t_e))
        print(f"{label}: acc {acc:.4f}, quantize_static {t_q:.2f}s, eval {t_e:.2f}s")

    # ---- (2) autoquant.optimize --------------------------------------------------------------------
    timers = Timers()
    eval_durations: list[float] = []

    def eval_callback(path: str) -> float:
        t = time.perf_counter()
        try:
            return task.evaluate(path)
        finally:
            eval_durations.append(time.perf_counter() - t)

    cb = eval_callback
    if not args.no_breakdown:
        install_timers(timers)
        cb = timers._wrap(eval_callback, "user eval", opaque=True)
    out_dir = work / "autoquant_out"
    storage = optuna.storages.InMemoryStorage() if args.storage == "memory" else None
    wall_start = dt.datetime.now()
    t0 = time.perf_counter()
    try:
        res = optimize(str(fp32), task.calibration_data, cb, allowed_accuracy_drop=ALLOWED_DROP,
                       drop_type="absolute", higher_is_better=True, search_space="default", n_trials=args.n_trials,
                       seed=args.seed, storage=storage, output_dir=out_dir, select="smallest", show_progress=args.progress)
    finally:
        wall_aq = time.perf_counter() - t0
        wall_end = dt.datetime.now()
        timers.restore()
    print(f"autoquant.optimize: {wall_aq:.2f}s, acc {res.accuracy:.4f}, drop {res.drop:.4f}, "
          f"feasible {res.feasible}, config {res.config}")

    trials = sorted((t for t in res.study.get_trials(deepcopy=False)
                     if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
    all_trials = res.study.get_trials(deepcopy=False)
    n_failed = sum(t.state == optuna.trial.TrialState.FAIL for t in all_trials)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    overhead = [t.user_attrs["details"]["overhead_seconds"] for t in trials]
    evals = [t.user_attrs["details"]["eval_seconds"] for t in trials]
    builds = [t.user_attrs["details"]["build_seconds"] for t in trials]
    reused = [t for t in trials if "reused_from" in t.user_attrs["details"]]
    evaluated = [t for t in trials if "reused_from" not in t.user_attrs["details"]]
    baseline_eval = eval_durations[0] if eval_durations else None
    not_in_attrs = [d - o - e for d, o, e in zip(durations, overhead, evals)]  # Optuna work around the objective
    first_start = min(t.datetime_start for t in all_trials)
    last_complete = max(t.datetime_complete for t in all_trials if t.datetime_complete)
    pre_trial = (first_start - wall_start).total_seconds()
    post_trial = (wall_end - last_complete).total_seconds()
    span = (last_complete - first_start).total_seconds()
    gaps = span - sum((t.datetime_complete - t.datetime_start).total_seconds() for t in all_trials
                      if t.datetime_complete)
    brief_pre = wall_aq - sum(durations)  # "total wall minus sum of trial durations"
    trial0 = ort_default_trial(trials)  # the enqueued ORT-default config (screening decides its number)

    # ---- latency ------------------------------------------------------------------------------------
    x = task.eval_x[: args.batch]
    lat_paths = {"fp32": fp32, "ort0": ort_rows[0]["path"], "ort1": ort_rows[1]["path"],
                 "aq": Path(res.model_path)}
    if trial0 is not None:
        lat_paths["aq0"] = out_dir / trial0.user_attrs["details"]["model_file"]
    lat = latencies(lat_paths, x, args.latency_runs)
    print("latency (median, 1 thread, batch %d): " % args.batch
          + ", ".join(f"{k} {v*1e3:.3f} ms" for k, v in lat.items()))

    # ---- tables -------------------------------------------------------------------------------------
    med_over = statistics.median(overhead)
    ratio = med_over / fp32_eval
    full_over = [o + n for o, n in zip(overhead, not_in_attrs)]
    header = ["Method", "Accuracy", "Drop vs fp32", f"Feasible (drop ≤ {ALLOWED_DROP})", "Size (bytes)",
              "Size ratio", "Latency ratio (1 thr, b=%d)" % args.batch, "Eval calls (incl. fp32)", "Wall (s)",
              "Calib/stats + prep (s)", "Σ per-trial overhead (s)", "User eval (s)",
              "Median overhead / fp32 eval", "Median build (s)"]
    rows = [["fp32 reference", f(acc_fp32), f(0.0), "—", fp32_size, "1.000", "1.000", 1, "—", "—", "—",
             f(fp32_eval, ".3f"), "—", "—"]]
    for r in ort_rows:
        sz = r["path"].stat().st_size
        drop = acc_fp32 - r["acc"]
        key = "ort0" if r is ort_rows[0] else "ort1"
        rows.append([r["label"], f(r["acc"]), f(drop), "yes" if drop <= ALLOWED_DROP + 1e-12 else "**no**", sz,
                     f(sz / fp32_size, ".3f"), f(lat[key] / lat["fp32"], ".3f"), 2,
                     f(r["t_quant"] + r["t_eval"] + fp32_eval, ".2f"), f(r["t_quant"], ".2f") + " (calib + build)",
                     "—", f(r["t_eval"] + fp32_eval, ".2f"), "—", "—"])
    if trial0 is not None:
        a = trial0.user_attrs
        rows.append([f"autoquant trial {trial0.number} (enqueued ORT-default config, same ranges source)",
                     f(a["accuracy"]),
                     f(a["drop"]), "yes" if a["feasible"] else "**no**", a["size_bytes"],
                     f(a["size_bytes"] / fp32_size, ".3f"), f(lat["aq0"] / lat["fp32"], ".3f"), "—", "—", "—",
                     f(a["details"]["overhead_seconds"], ".3f"), f(a["details"]["eval_seconds"], ".3f"), "—", f(a["details"]["build_seconds"], ".3f")])
    rows.append([f"**autoquant.optimize** (default space, {args.n_trials} trials, select=smallest)",
                 f(res.accuracy), f(res.drop), "yes" if res.feasible else "**no**", res.size_bytes,
                 f(res.size_bytes / res.fp32_size_bytes, ".3f"), f(lat["aq"] / lat["fp32"], ".3f"), res.eval_calls,
                 f(wall_aq, ".2f"), f(brief_pre, ".2f"), f(sum(overhead), ".2f"),
                 f(sum(evals) + (baseline_eval or 0.0), ".2f"),
                 f"**{ratio*100:.1f} %** ({'meets' if ratio <= 0.10 else 'misses'} ≤ 10 %)",
                 f(statistics.median(builds), ".3f")])
    main_table = md_table(header, rows)

    # wall split of optimize()
    t_prep = timers.total(cat="preparation (quant_pre_process)")
    t_stats = timers.total(cat="calibration statistics")
    t_sens = timers.total(cat="sensitivity ranking (fallback order)")
    t_setup_storage = sum(v for (p, c), v in timers.excl.items() if p == "setup" and c.startswith("Optuna storage"))
    split_rows = [
        ["optimize() wall total", f(wall_aq, ".3f"), ""],
        ["before the first trial (first datetime_start − call)", f(pre_trial, ".3f"), ""],
        ["  of which preparation (`_prepare`)", f(t_prep, ".3f") if timers.excl else "—", ""],
        ["  of which calibration statistics (`_statistics`)", f(t_stats, ".3f") if timers.excl else "—",
         f"{n_calib} images"],
        ["  of which sensitivity ranking (`measure_sensitivity`)", f(t_sens, ".3f") if timers.excl else "—", ""],
        ["  of which baseline fp32 eval (user)", f(baseline_eval, ".3f"), ""],
        ["  of which Optuna storage calls (study creation, study user attrs, enqueue)",
         f(t_setup_storage, ".3f") if timers.excl else "—", "excludes RDBStorage.__init__ (engine, schema)"],
        ["  of which other (load, checks, SQLite engine/schema, float inits)",
         f(pre_trial - t_prep - t_stats - t_sens - t_setup_storage - (baseline_eval or 0), ".3f")
         if timers.excl else "—", ""],
        ["Σ trial durations (datetime_complete − datetime_start)", f(sum(durations), ".3f"),
         f"{len(trials)} COMPLETE, {n_failed} FAIL"],
        ["  Σ overhead_seconds", f(sum(overhead), ".3f"), f"median {med_over*1e3:.1f} ms, max {max(overhead)*1e3:.1f} ms"],
        ["  Σ eval_seconds", f(sum(evals), ".3f"),
         f"{len(evaluated)} evaluated (median {statistics.median([t.user_attrs['details']['eval_seconds'] for t in evaluated])*1e3:.1f} ms),"
         f" {len(reused)} reused byte-identical"],
        ["  Σ Optuna work in the trial but outside the objective (duration − overhead − eval)",
         f(sum(not_in_attrs), ".3f"), f"median {statistics.median(not_in_attrs)*1e3:.1f} ms / trial"],
        ["gaps between trials (`_run_trials` loop, study.optimize setup)", f(gaps, ".3f"), ""],
        ["after the last trial (delivery: copy, encodings, report.csv)", f(post_trial, ".3f"), ""],
        ["brief's 'calib/stats + prep' = wall − Σ trial durations", f(brief_pre, ".3f"),
         "= before-first-trial + gaps + delivery"],
    ]
    split_table = md_table(["Part of autoquant wall time", "Seconds", "Note"], split_rows)

    half = len(trials) // 2
    per_trial_rows = [
        ["median overhead_seconds / one fp32 eval", f"{ratio*100:.1f} %",
         f"{med_over*1e3:.1f} ms / {fp32_eval*1e3:.1f} ms"],
        ["median (overhead + Optuna work outside objective) / one fp32 eval",
         f"{statistics.median(full_over)/fp32_eval*100:.1f} %", f"{statistics.median(full_over)*1e3:.1f} ms"],
        ["fp32 eval pass needed for ≤ 10 % (10 × median overhead)", f"{10*med_over:.2f} s",
         f"≈ n_eval {int(10 * med_over / fp32_eval * len(task.eval_x)):,} on this task"],
        ["median overhead, first half of trials", f"{statistics.median(overhead[:half])*1e3:.1f} ms", ""],
        ["median overhead, second half of trials", f"{statistics.median(overhead[half:])*1e3:.1f} ms", ""],
        ["median build_seconds", f"{statistics.median(builds)*1e3:.1f} ms",
         "t0 → built, loaded by ORT, hashed (includes suggest + ranges)"],
        ["median eval_seconds of evaluated (non-reused) trials",
         f"{statistics.median([t.user_attrs['details']['eval_seconds'] for t in evaluated])*1e3:.1f} ms", "QDQ models"],
    ]
    per_trial_table = md_table(["Per-trial metric", "Value", "Note"], per_trial_rows)

    breakdown_table = ""
    if timers.excl:
        in_obj = {c: v for (p, c), v in timers.excl.items() if p == "objective" and c != "user eval"}
        loop = {c: v for (p, c), v in timers.excl.items() if p == "loop"}
        n = len(trials) + n_failed
        sum_obj = sum(in_obj.values())
        brows = []
        for c, v in sorted(in_obj.items(), key=lambda kv: -kv[1]):
            brows.append(["in objective (≈ overhead_seconds)", c, timers.calls[("objective", c)], f(v, ".3f"),
                          f(v / n * 1e3, ".1f"), f"{v / sum_obj * 100:.1f} %"])
        brows.append(["in objective", "**sum (vs Σ overhead_seconds %.3f s)**" % sum(overhead), "", f(sum_obj, ".3f"),
                      f(sum_obj / n * 1e3, ".1f"), "100 %"])
        for c, v in sorted(loop.items(), key=lambda kv: -kv[1]):
            brows.append(["Optuna loop, outside objective (not in overhead_seconds)", c, timers.calls[("loop", c)],
                          f(v, ".3f"), f(v / n * 1e3, ".1f"), ""])
        breakdown_table = md_table(["Where", "Category (exclusive time)", "Calls", "Total (s)", "Per trial (ms)",
                                    "Share of in-objective"], brows)

    env_lines = [
        f"- Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        *version_cpu_lines(),
        f"- Task: `autoquant.demo.DemoTask(seed={args.seed}, n_eval={args.n_eval})` — {len(task.eval_x)} eval images, "
        f"{n_calib} calibration images (batches of {task.calib_batch}); metric = top-1 agreement with fp32",
        f"- One fp32 eval pass (`task.evaluate`, new 1-thread session + run over all eval images): "
        f"**{fp32_eval*1e3:.1f} ms** (median of {args.fp32_evals}; min {min(fp32_times)*1e3:.1f}, "
        f"max {max(fp32_times)*1e3:.1f})",
        f"- autoquant: `optimize(..., allowed_accuracy_drop={ALLOWED_DROP}, drop_type='absolute', "
        f"search_space='default', n_trials={args.n_trials}, seed={args.seed}, select='smallest', "
        f"show_progress={args.progress}" + (", storage=InMemoryStorage()" if storage is not None else "")
        + ")`, fresh output_dir in a temp dir"
        + (" (new SQLite study, output_dir/study.db)" if storage is None else " (**diagnostic: no SQLite**)"),
        f"- Latency: ORT CPUExecutionProvider, intra_op=inter_op=1 thread, batch {args.batch}, median of "
        f"{args.latency_runs} runs per model after 10 warm-up runs, models interleaved run by run; fp32 median "
        f"{lat['fp32']*1e3:.3f} ms",
        f"- Overhead attribution: {'on (wrapped functions, exclusive time)' if timers.excl else 'off'}",
        f"- Whole script: {time.perf_counter() - t_script:.1f} s",
    ]
    chosen = ", ".join(f"{k}={v}" for k, v in res.config.items())
    md = "\n\n".join([
        "# bench_core: ORT quantize_static defaults vs autoquant.optimize",
        f"Reproduce (from the repository root, in the venv):\n\n```\n{cmd}\n```",
        "\n".join(env_lines),
        "## Results\n\n" + main_table,
        f"autoquant delivered trial {res.trial_number}: {chosen}.",
        "Notes: *Size ratio* = model file bytes / fp32 file bytes. *Latency ratio* = median latency / fp32 median "
        "latency in the same process. *Eval calls* count the fp32 baseline eval. For ORT, *User eval* = fp32 eval "
        "+ one eval of the quantized model and *Calib/stats + prep* = the whole `quantize_static` call. For "
        "autoquant, *Calib/stats + prep* follows the brief's definition (wall − Σ trial durations), which also "
        "contains the baseline eval, the sensitivity ranking, gaps between trials and delivery — see the split "
        "below. *User eval* = Σ eval_seconds + baseline eval.",
        "## autoquant wall-time split\n\n" + split_table,
        "## Per-trial overhead\n\n" + per_trial_table,
        ("## Where the per-trial overhead goes\n\nExclusive time of wrapped functions (nested wrapped calls "
         "subtracted from their parent); 'objective: other' is the rest of `Objective.__call__` (e.g. "
         "`trial.set_user_attr` Python overhead, path handling). The in-objective sum is slightly above "
         "Σ overhead_seconds because it also holds what autoquant does after taking that reading (the "
         "`overhead_seconds` write itself, the post-eval sha256, a `reused_from` write). *Calls* of an "
         "activation-range row count every lookup, including cache hits. *Per trial* = total / number of "
         "trials.\n\n" + breakdown_table) if breakdown_table else "",
    ]).rstrip() + "\n"

    publish(args.out, md)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
