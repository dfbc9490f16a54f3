#!/usr/bin/env python
"""Benchmark: accuracy-recovery techniques (BN folding, CLE, AdaRound, bias correction) as searched choices.

One run, one process, one machine, on the two bundled demo tasks (``DemoTask(kind="outlier")``: a CNN with
BatchNorm where one BN channel is scaled x300 and compensated in the next conv; ``kind="spiky"``: the plain
demo CNN with input spikes). It reports:

1. outlier CNN: naive per-tensor int8 vs ``optimize`` with the default space (which techniques the search
   picked, accuracy per technique over all trials), with size and single-thread ORT CPU latency vs fp32;
2. W4A8 per-channel: nearest rounding vs AdaRound (accuracy, output SQNR vs fp32) on both tasks;
3. CLE and bias correction off vs on, W8 and W4 per-tensor, both tasks: output SQNR and accuracy;
4. cost of each technique relative to one fp32 eval pass of the same task.

    python experiments/bench_techniques.py --n-trials 40

Writes experiments/results/bench_techniques.md. This is a benchmark, not a test: it asserts nothing, and
autoquant is used through its public ``optimize`` (plus ``autoquant.variants.make_variant`` for timing).
Every ``optimize`` call gets a fresh temporary output_dir, so no cache is shared between calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import optuna

import autoquant
from autoquant import optimize, variants
from autoquant.data import CalibrationSource
from autoquant.demo import DemoTask, run
from autoquant.model import float_activation_tensors, prepare_model
from autoquant.sensitivity import sqnr_db
from autoquant.stats import collect_statistics_many

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import interleaved_medians, md_table, publish, version_cpu_lines  # noqa: E402
ALLOWED_DROP = 0.01
COLLAPSED_SHARE = 0.99  # a model predicting one class for >= 99 % of the eval images is marked collapsed (†)

# Section 1a: naive per-tensor int8 (ORT-like defaults, no technique). Knobs left out take their default
# (weight_symmetric=True, activation_symmetric=False).
NAIVE = {
    "calibration": "minmax", "weight_granularity": "per_tensor", "weight_bits": 8, "activation_bits": 8,
    "weight_rounding": "nearest_even", "cle": False, "bn_fold": True, "bias_correction": False, "fallback_k": 0,
    "a16_k": 0, "w4_fraction": 0.0,
}


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def latency_ratio(model: Path, fp32: Path, x: np.ndarray, runs: int, warmup: int = 10) -> tuple[float, float]:
    """(median latency of ``model`` / median latency of ``fp32``, fp32 median seconds); single thread,
    the two models interleaved run by run."""
    m = interleaved_medians({"q": model, "f": fp32}, {"x": x}, runs, warmup)
    return m["q"] / m["f"], m["f"]


def f(x, fmt=".4f"):
    if x is None:
        return "—"
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return format(x, fmt)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def short_config(cfg: dict) -> str:
    keys = ["calibration", "percentile", "weight_granularity", "weight_symmetric", "activation_symmetric",
            "weight_bits", "activation_bits", "weight_rounding", "cle", "bn_fold", "bias_correction", "fallback_k",
            "a16_k", "w4_fraction"]
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg and not (k == "percentile" and cfg[k] is None))


class Bench:
    """Tasks, fp32 references and a wrapper around optimize() that measures each delivered model."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.tasks: dict[str, DemoTask] = {}
        self.ref: dict[str, np.ndarray] = {}
        self.fp32_eval: dict[str, float] = {}
        self.fp32_eval_all: dict[str, list[float]] = {}
        self.fp32_lat: dict[str, list[float]] = {}
        for kind in ("outlier", "spiky"):
            task = DemoTask(work / f"task_{kind}", seed=args.seed, n_eval=args.n_eval, kind=kind)
            self.tasks[kind] = task
            self.ref[kind] = run(task.model_path, task.eval_x)
            task.evaluate(str(task.model_path))  # warm-up
            times = []
            for _ in range(args.fp32_evals):
                t0 = time.perf_counter()
                acc = task.evaluate(str(task.model_path))
                times.append(time.perf_counter() - t0)
            self.fp32_eval[kind] = statistics.median(times)
            self.fp32_eval_all[kind] = times
            self.fp32_lat[kind] = []
            print(f"[{kind}] {len(task.eval_x)} eval images, {len(task.calib)} calibration images; one fp32 eval "
                  f"pass: median {ms(self.fp32_eval[kind])} of {args.fp32_evals}; fp32 accuracy {acc}")

    def measure(self, kind: str, model_path) -> tuple[float, bool]:
        """(output SQNR vs fp32 on the eval images, collapsed = one class predicted for >= 99 % of them)."""
        out = run(model_path, self.tasks[kind].eval_x)
        share = np.bincount(out.argmax(1), minlength=out.shape[1]).max() / len(out)
        return sqnr_db([self.ref[kind]], [out]), bool(share >= COLLAPSED_SHARE)

    def optimize(self, kind: str, space, n_trials: int, label: str, per_trial_sqnr: bool = False) -> dict:
        """One optimize() call in a fresh temp output_dir; everything needed is read before it is deleted."""
        task = self.tasks[kind]
        with tempfile.TemporaryDirectory(prefix="bench_techniques-", dir=self.work) as out:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                res = optimize(str(task.model_path), task.calibration_data, task.evaluate,
                               allowed_accuracy_drop=ALLOWED_DROP, drop_type="absolute", higher_is_better=True,
                               search_space=space, n_trials=n_trials, seed=self.args.seed, output_dir=out,
                               select="smallest", show_progress=self.args.progress)
            wall = time.perf_counter() - t0
            trials = []
            for t in sorted(res.study.get_trials(deepcopy=False), key=lambda t: t.number):
                row = {"number": t.number, "state": t.state.name}
                if t.state == optuna.trial.TrialState.PRUNED:
                    row.update(config=dict(t.user_attrs.get("config", {})), reason=t.user_attrs.get("prune_reason"),
                               details=dict(t.user_attrs.get("details", {})))
                elif t.state == optuna.trial.TrialState.COMPLETE:
                    d = dict(t.user_attrs["details"])
                    row.update(config=dict(t.user_attrs["config"]), accuracy=float(t.user_attrs["accuracy"]),
                               feasible=bool(t.user_attrs["feasible"]), size_bytes=int(t.user_attrs["size_bytes"]),
                               details=d)
                    if per_trial_sqnr:
                        p = Path(out) / d["model_file"]
                        row["sqnr"], row["collapsed"] = self.measure(kind, p) if p.exists() else (None, False)
                trials.append(row)
            lat, fp32_lat = latency_ratio(Path(res.model_path), task.model_path, task.eval_x[: self.args.batch],
                                          self.args.latency_runs)
            self.fp32_lat[kind].append(fp32_lat)
            sq, collapsed = self.measure(kind, res.model_path)
            r = {
                "label": label, "kind": kind, "accuracy": res.accuracy, "drop": res.drop, "feasible": res.feasible,
                "config": res.config, "trial_number": res.trial_number, "size_ratio": res.size_ratio,
                "size_bytes": res.size_bytes, "latency_ratio": lat, "aq_latency_ratio": getattr(res, "latency_ratio", None), "sqnr": sq, "collapsed": collapsed,
                "eval_calls": res.eval_calls, "wall": wall, "trials": trials, "float_nodes": res.float_nodes,
                "warnings": [str(w.message) for w in caught],
            }
        print(f"[{kind}] {label}: acc {r['accuracy']:.4f}{' (collapsed)' if collapsed else ''} (drop {r['drop']:.4f}, feasible {r['feasible']}), "
              f"SQNR {r['sqnr']:.2f} dB, size x{r['size_ratio']:.3f}, latency x{lat:.3f}, wall {wall:.2f}s")
        return r


def acc(r: dict) -> str:
    """Accuracy, with † when the model predicts (almost) one class only."""
    return f"{r['accuracy']:.4f}" + ("†" if r.get("collapsed") else "")


def trial_knobs(c: dict, d: dict) -> list:
    return [c["calibration"] + (f" {c['percentile']}" if c.get("percentile") else ""),
            c["weight_granularity"].replace("per_", ""), f"W{c['weight_bits']}A{c['activation_bits']}",
            c["weight_rounding"], c["cle"], c["bn_fold"], c["bias_correction"], c["fallback_k"], c.get("a16_k", "—"),
            c.get("w4_fraction", "—"), ", ".join(d.get("float_nodes", [])) or "—", d.get("variant", "—")]


def complete(r: dict) -> list[dict]:
    return [t for t in r["trials"] if t["state"] == "COMPLETE"]


def build_s(r: dict, index: int) -> float:
    return complete(r)[index]["details"]["build_seconds"]


def med_build(rs: list[dict], index: int) -> float:
    return statistics.median(build_s(r, index) for r in rs)


# ---------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-trials", type=int, default=40, help="trials of the default-space search (section 1b)")
    ap.add_argument("--n-eval", type=int, default=5000, help="DemoTask eval-set size (sets the eval cost)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32-evals", type=int, default=5, help="timed fp32 eval passes per task (median reported)")
    ap.add_argument("--variant-repeats", type=int, default=5,
                    help="timed make_variant calls / statistics passes per variant (median)")
    ap.add_argument("--cost-repeats", type=int, default=3,
                    help="repeats of the section-2 optimize() calls (fresh dirs) for AdaRound build timings (median)")
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32, help="batch for the latency measurement")
    ap.add_argument("--w4-calibration", choices=("entropy", "percentile"), default="entropy",
                    help="fixed activation calibration of the W4A8 AdaRound comparison (section 2)")
    ap.add_argument("--w4-percentile", type=float, default=99.99, help="used when --w4-calibration percentile")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_techniques.md")
    ap.add_argument("--progress", action="store_true", help="show autoquant's progress bars")
    args = ap.parse_args()

    np.random.seed(args.seed)
    ort.set_default_logger_severity(3)
    cmd = "python experiments/bench_techniques.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = dt.datetime.now().astimezone()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_script = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_techniques-")
    work = Path(tmp.name)
    B = Bench(args, work)

    # ---- 1. outlier CNN: naive vs default-space search -----------------------------------------------
    naive = B.optimize("outlier", {"knobs": NAIVE}, 1, "naive per-tensor int8")
    search = B.optimize("outlier", "default", args.n_trials, f"default space, {args.n_trials} trials",
                        per_trial_sqnr=True)

    # ---- 2. W4A8 per-channel: nearest vs AdaRound ------------------------------------------------------
    w4 = {"weight_bits": 4, "activation_bits": 8, "weight_granularity": "per_channel",
          "calibration": args.w4_calibration, "fallback_k": 0, "cle": False, "bn_fold": True,
          "bias_correction": False, "a16_k": 0, "w4_fraction": 0.0}
    if args.w4_calibration == "percentile":
        w4["percentile"] = args.w4_percentile
    ada: dict[tuple[str, str], dict] = {}
    ada_reps: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.cost_repeats):  # repeats (fresh output_dirs) only for the build timings
        for kind in ("spiky", "outlier"):
            for rounding in ("nearest_even", "adaround"):
                # n_trials=2: trial 1 repeats trial 0's config, timing the warm (AdaRound: cached) build; its
                # file is byte-identical, so it is scored by reuse, not by a second eval.
                r = B.optimize(kind, {"knobs": {**w4, "weight_rounding": rounding}}, 2,
                               f"W4A8 per-channel {args.w4_calibration}, {rounding} (repeat {rep + 1})")
                ada.setdefault((kind, rounding), r)
                ada_reps.setdefault((kind, rounding), []).append(r)

    # ---- 3. CLE and bias correction off vs on ---------------------------------------------------------
    techs = {"off": {}, "CLE": {"cle": True}, "bias corr.": {"bias_correction": True},
             "CLE + bias corr.": {"cle": True, "bias_correction": True}}
    tech: dict[tuple[str, int, str, str], dict] = {}
    for kind in ("outlier", "spiky"):
        for wbits in (8, 4):
            for calib in ("minmax", "entropy"):
                for name, over in techs.items():
                    knobs = {**NAIVE, "weight_bits": wbits, "calibration": calib, **over}
                    tech[kind, wbits, calib, name] = B.optimize(
                        kind, {"knobs": knobs}, 2, f"W{wbits}A8 per-tensor {calib}, {name}")

    # ---- 4. cost of the graph techniques (make_variant) and of CLE's extra statistics -----------------
    variant_cost: dict[str, dict[str, float]] = {}
    stats_cost: dict[str, dict[str, float]] = {}
    for kind, task in B.tasks.items():
        proto = onnx.load(str(task.model_path))
        t0 = time.perf_counter()
        prepared = prepare_model(proto, work / f"prepared_{kind}.onnx")
        t_prep = time.perf_counter() - t0
        base = prepared.load()
        cost = {"prepare (quant_pre_process, once)": t_prep}
        protos = {variants.BASE: base}
        for v in (variants.BN_FOLD, variants.CLE):
            times = []
            for _ in range(args.variant_repeats):
                b = onnx.ModelProto()
                b.CopyFrom(base)
                t0 = time.perf_counter()
                protos[v], _steps = variants.make_variant(b, v)
                times.append(time.perf_counter() - t0)
            cost[v] = statistics.median(times)
        variant_cost[kind] = cost
        # CLE changes activation values, so it needs its own statistics (collected in the same pass)
        jobs = {v: (protos[v], float_activation_tensors(protos[v]), v) for v in (variants.BASE, variants.CLE)}
        st_times = {"base only": [], "base + cle": []}
        for _ in range(args.variant_repeats):  # interleaved, so load changes hit both alike
            for label, names in (("base only", [variants.BASE]), ("base + cle", [variants.BASE, variants.CLE])):
                src = CalibrationSource(task.calibration_data, prepared.input_specs)
                t0 = time.perf_counter()
                collect_statistics_many([jobs[n] for n in names], src)
                st_times[label].append(time.perf_counter() - t0)
        st = {k: statistics.median(v) for k, v in st_times.items()}
        stats_cost[kind] = st
        print(f"[{kind}] prepare {ms(t_prep)}, bn_fold {ms(cost['bn_fold'])}, cle {ms(cost['cle'])}; statistics "
              f"pass base {ms(st['base only'])}, base+cle {ms(st['base + cle'])}")

    # =====================================================================================================
    # report
    # =====================================================================================================
    out_md: list[str] = []
    fp32o = B.fp32_eval["outlier"]

    # -- section 1 --
    main_rows = []
    for r in (naive, search):
        main_rows.append([r["label"], acc(r), f(r["drop"]), "yes" if r["feasible"] else "**no**",
                          f(r["sqnr"], ".2f"), f(r["size_ratio"], ".3f"), f(r["latency_ratio"], ".3f"),
                          f(r["aq_latency_ratio"], ".3f"), r["eval_calls"], f(r["wall"], ".2f")])
    sec1_table = md_table(["outlier CNN", "Accuracy (top-1 agreement)", "Drop vs fp32", "Feasible (≤ 0.01)",
                           "Output SQNR vs fp32 (dB)", "Size ratio", "Latency ratio (1 thr, b=%d)" % args.batch,
                           "autoquant's own latency ratio (1 thr, 1 sample)", "Eval calls (incl. fp32)", "Wall (s)"],
                          main_rows)
    cfg = search["config"]
    picked = [f"cle={cfg['cle']}", f"bn_fold={cfg['bn_fold']}", f"bias_correction={cfg['bias_correction']}",
              f"weight_rounding={cfg['weight_rounding']}"]
    ctrials = complete(search)
    n_fail = sum(t["state"] == "FAIL" for t in search["trials"])
    n_pruned = sum(t["state"] == "PRUNED" for t in search["trials"])

    pruned = [t for t in search["trials"] if t["state"] == "PRUNED"]

    def group_rows(trials: list[dict], pruned: list[dict]) -> list[list]:
        rows = []
        groups = [("cle", [False, True], None), ("bias_correction", [False, True], None),
                  ("weight_rounding", ["nearest_even", "nearest_away", "adaround"], None),
                  ("bn_fold", [True, False], lambda c: not c["cle"]),
                  ("activation_bits", [8, 16], None), ("weight_bits", [8, 4], None)]
        for knob, values, where in groups:
            for v in values:
                sel = [t for t in trials if t["config"][knob] == v and (where is None or where(t["config"]))]
                n_pruned = sum(t["config"].get(knob) == v and (where is None or where(t["config"])) for t in pruned)
                if not sel:
                    rows.append([knob + (" (cle=False trials)" if where else ""), v, 0, "—", "—", "—", "—", "—",
                                 n_pruned])
                    continue
                acc = [t["accuracy"] for t in sel]
                sq = [t["sqnr"] for t in sel if t.get("sqnr") is not None]
                rows.append([knob + (" (cle=False trials)" if where else ""), v, len(sel), f(float(np.mean(acc))),
                             f(float(np.median(acc))), f(max(acc)), sum(t["feasible"] for t in sel),
                             f(float(np.median(sq)), ".2f") if sq else "—", n_pruned])
        return rows

    ghead = ["Knob", "Value", "COMPLETE trials", "Mean acc", "Median acc", "Max acc", "Feasible",
             "Median SQNR (dB)", "PRUNED trials (not scored)"]
    group_all = md_table(ghead, group_rows(ctrials, pruned))

    def plain(c: dict) -> bool:  # 8-bit activations everywhere, no float fallback
        return c["activation_bits"] == 8 and c["fallback_k"] == 0 and c.get("a16_k", 0) == 0

    narrow = [t for t in ctrials if plain(t["config"])]
    group_a8 = md_table(ghead, group_rows(narrow, [t for t in pruned if plain(t["config"])]))
    trial_rows = []
    fp32_bytes = search["size_bytes"] / search["size_ratio"]
    for t in sorted(ctrials + pruned, key=lambda t: t["number"]):
        c, d = t["config"], t["details"]
        if t["state"] == "PRUNED":
            trial_rows.append([t["number"], "PRUNED", "—", f(d.get("sqnr_db"), ".2f") + " (calib)", "—",
                               *trial_knobs(c, d), "—", "—", t.get("reason") or "—"])
            continue
        trial_rows.append([t["number"], acc(t), "yes" if t["feasible"] else "no", f(t.get("sqnr"), ".2f"),
                           f(t["size_bytes"] / fp32_bytes, ".3f"), *trial_knobs(c, d),
                           f(d["build_seconds"] * 1e3, ".1f"),
                           "reuse of %d" % d["reused_from"] if "reused_from" in d else f(d["eval_seconds"] * 1e3, ".1f"),
                           f(d.get("latency_ratio"), ".2f")])
    trials_table = md_table(["#", "Acc", "Feas.", "SQNR dB", "Size ratio", "Calibration", "W gran.", "Bits",
                             "Rounding", "cle", "bn_fold", "bias corr.", "fallback_k", "a16_k", "w4_fraction",
                             "Float nodes", "Variant", "Build (ms)", "Eval (ms)",
                             "autoquant latency ratio / prune reason"], trial_rows)

    # -- section 2 --
    sec2_rows = []
    for kind in ("spiky", "outlier"):
        for rounding in ("nearest_even", "adaround"):
            r = ada[kind, rounding]
            d0 = complete(r)[0]["details"]
            reps = ada_reps[kind, rounding]
            reused = all("reused_from" in complete(x)[1]["details"] for x in reps)
            same = len({x["accuracy"] for x in reps}) == 1 and len({x["sqnr"] for x in reps}) == 1
            sec2_rows.append([kind, rounding, acc(r) + ("" if same else " (differs between repeats!)"), f(r["drop"]),
                              f(r["sqnr"], ".2f"), d0.get("adaround_layers", "—"), f(r["size_ratio"], ".3f"),
                              f(r["latency_ratio"], ".3f"), ms(med_build(reps, 0)),
                              ms(med_build(reps, 1)) + ("" if reused else " (not byte-identical!)")])
    sec2_table = md_table(["Task", "Weight rounding", "Accuracy", "Drop", "Output SQNR vs fp32 (dB)",
                           "AdaRound layers", "Size ratio", "Latency ratio", "Build, 1st trial (median)",
                           "Build, 2nd trial, same config (median)"], sec2_rows)

    # -- section 3 --
    sec3_rows = []
    for kind in ("outlier", "spiky"):
        for wbits in (8, 4):
            for calib in ("minmax", "entropy"):
                cells = []
                off = tech[kind, wbits, calib, "off"]
                for name in techs:
                    r = tech[kind, wbits, calib, name]
                    if name == "off":
                        cells.append(f"{r['sqnr']:.2f} ({acc(r)})")
                    else:
                        cells.append(f"{r['sqnr']:.2f} ({r['sqnr'] - off['sqnr']:+.2f}) / {acc(r)} "
                                     f"({r['accuracy'] - off['accuracy']:+.4f})")
                sec3_rows.append([kind, f"W{wbits}A8", calib, *cells])
    sec3_table = md_table(["Task", "Bits", "Calibration", "off: SQNR dB (acc)",
                           *[f"{n}: SQNR dB (Δ) / acc (Δ)" for n in list(techs)[1:]]], sec3_rows)
    wins = {}
    for name in ("CLE", "bias corr."):
        wins[name] = [(k, tech[k[0], k[1], k[2], name]["sqnr"] - tech[k[0], k[1], k[2], "off"]["sqnr"],
                       tech[k[0], k[1], k[2], name]["accuracy"] - tech[k[0], k[1], k[2], "off"]["accuracy"])
                      for k in {(a, b, c) for (a, b, c, _) in tech}]
    win_rows = []
    for name, lst in wins.items():
        up = [x for x in lst if x[1] > 0.1]
        down = [x for x in lst if x[1] < -0.1]
        acc_up = [x for x in lst if x[2] > 0]
        acc_down = [x for x in lst if x[2] < 0]
        n_coll = sum(tech[k[0], k[1], k[2], "off"]["collapsed"] or tech[k[0], k[1], k[2], name]["collapsed"]
                     for k, _, _ in lst)
        best = max(lst, key=lambda x: x[1])
        worst = min(lst, key=lambda x: x[1])
        win_rows.append([name, f"{len(up)} / {len(lst)}", f"{len(down)} / {len(lst)}",
                         f"{len(acc_up)} / {len(acc_down)}", n_coll,
                         f"{best[1]:+.2f} dB ({best[0][0]}, W{best[0][1]}, {best[0][2]})",
                         f"{worst[1]:+.2f} dB ({worst[0][0]}, W{worst[0][1]}, {worst[0][2]})"])
    wins_table = md_table(["Technique", "SQNR up > 0.1 dB", "SQNR down > 0.1 dB", "Accuracy up / down",
                           "Rows with a collapsed model (off or on)", "Best ΔSQNR", "Worst ΔSQNR"], win_rows)

    # -- section 4 --
    cost_rows = []
    for kind in ("outlier", "spiky"):
        fe = B.fp32_eval[kind]
        vc = variant_cost[kind]

        def row(what, seconds, note=""):
            cost_rows.append([kind, what, ms(seconds), f"{seconds / fe:.2f}×", note])

        row("one fp32 eval pass (reference)", fe, f"median of {args.fp32_evals}, n_eval={args.n_eval}")
        row("BN folding (make_variant bn_fold)", vc["bn_fold"],
            f"median of {args.variant_repeats}; once per study (cached)")
        row("CLE incl. BN folding (make_variant cle)", vc["cle"],
            f"median of {args.variant_repeats}; once per study (cached)")
        sc = stats_cost[kind]
        row("CLE's own statistics (extra in the one pass)", sc["base + cle"] - sc["base only"],
            f"pass base only {ms(sc['base only'])} vs base + cle {ms(sc['base + cle'])}; once per study")
        n0, a0 = ada_reps[kind, "nearest_even"], ada_reps[kind, "adaround"]
        row("AdaRound, first use (W4A8 per-ch., build − nearest build)", med_build(a0, 0) - med_build(n0, 0),
            f"build {ms(med_build(a0, 0))} vs {ms(med_build(n0, 0))} (medians of {len(a0)} fresh runs; AdaRound "
            f"runs: {', '.join(ms(build_s(r, 0)) for r in a0)}); includes layer-input collection")
        row("AdaRound, cached second use (build − nearest build)", med_build(a0, 1) - med_build(n0, 1),
            f"build {ms(med_build(a0, 1))} vs {ms(med_build(n0, 1))} (medians of {len(a0)})")
        bc_extra = []
        for wbits in (8, 4):
            for calib in ("minmax", "entropy"):
                off = tech[kind, wbits, calib, "off"]
                on = tech[kind, wbits, calib, "bias corr."]
                bc_extra.append(build_s(on, 1) - build_s(off, 1))
        row("bias correction (build with − without)", statistics.median(bc_extra),
            "median over W8/W4 × minmax/entropy, warm 2nd trial; range "
            f"{ms(min(bc_extra))} … {ms(max(bc_extra))}; every trial (not cached)")
    cost_table = md_table(["Task", "Technique", "Wall time", "÷ one fp32 eval", "Note"], cost_rows)

    # AdaRound in the default-space search (outlier task)
    sr = sorted(ctrials, key=lambda t: t["number"])
    ada_trials = [t for t in sr if t["config"]["weight_rounding"] == "adaround"]
    near_trials = [t for t in sr if t["config"]["weight_rounding"] == "nearest_even"
                   and not t["config"]["bias_correction"]]
    search_cost_lines = []
    if ada_trials:
        first = ada_trials[0]
        search_cost_lines.append(
            f"- First AdaRound trial of the search: #{first['number']} ({first['config']['weight_granularity']}, "
            f"W{first['config']['weight_bits']}A{first['config']['activation_bits']}, "
            f"bias_correction={first['config']['bias_correction']}): build {ms(first['details']['build_seconds'])} "
            f"= {first['details']['build_seconds'] / fp32o:.1f}× one fp32 eval.")
        if len(ada_trials) > 1:
            later = [t["details"]["build_seconds"] for t in ada_trials[1:]]
            search_cost_lines.append(
                f"- Later AdaRound trials ({len(later)}): build median {ms(statistics.median(later))}, min "
                f"{ms(min(later))}, max {ms(max(later))} (the per-layer cache hits only when the same weight and "
                "quantization grid were seen before; other grids are recomputed).")
    else:
        search_cost_lines.append("- The search sampled no AdaRound trial.")
    if near_trials:
        nb = [t["details"]["build_seconds"] for t in near_trials]
        search_cost_lines.append(f"- nearest_even trials without bias correction ({len(nb)}): build median "
                                 f"{ms(statistics.median(nb))}.")
    bc_trials = [t["details"]["build_seconds"] for t in sr if t["config"]["bias_correction"]
                 and t["config"]["weight_rounding"] != "adaround"]
    if bc_trials:
        search_cost_lines.append(f"- Bias-correction trials (non-AdaRound, {len(bc_trials)}): build median "
                                 f"{ms(statistics.median(bc_trials))}.")
    overhead = [t["details"]["overhead_seconds"] for t in sr]
    search_cost_lines.append(f"- Search totals: Σ build {sum(t['details']['build_seconds'] for t in sr):.2f} s, "
                             f"Σ overhead {sum(overhead):.2f} s, Σ eval "
                             f"{sum(t['details']['eval_seconds'] for t in sr):.2f} s, wall {search['wall']:.2f} s.")

    # -- environment --
    fp32_lat_all = [x for v in B.fp32_lat.values() for x in v]
    env_lines = [
        f"- Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        *version_cpu_lines(),
        f"- Tasks: `DemoTask(kind=..., seed={args.seed}, n_eval={args.n_eval})` — {args.n_eval} eval images, "
        f"{len(B.tasks['outlier'].calib)} calibration images (batches of {B.tasks['outlier'].calib_batch}); "
        "metric = top-1 agreement with fp32 (fp32 = 1.0). SQNR = 10·log10(Σ fp32² / Σ (fp32 − quant)²) over the "
        "logits of all eval images (`autoquant.sensitivity.sqnr_db`). Eval label frequencies: "
        + "; ".join(f"{k} " + "/".join(f"{v:.4f}" for v in np.bincount(t.labels, minlength=4) / len(t.labels))
                    for k, t in B.tasks.items())
        + f". **†** = the model predicts one class for ≥ {COLLAPSED_SHARE:.0%} of the eval images (collapsed): "
        "its accuracy is then just that class's frequency.",
        "- One fp32 eval pass (`task.evaluate`: new 1-thread session + run over the eval set): outlier "
        f"{ms(B.fp32_eval['outlier'])}, spiky {ms(B.fp32_eval['spiky'])} (median of {args.fp32_evals})",
        f"- Every `optimize()` call: fresh temp output_dir (new SQLite study, no shared cache), seed {args.seed}, "
        f"allowed_accuracy_drop={ALLOWED_DROP} absolute, select='smallest' (which prefers feasible trials that "
        "autoquant measured no slower than fp32, when there are any), other arguments at their defaults (e.g. "
        "prune=True, measure_latency=True). Fixed spaces list every technique knob; "
        "knobs left out take their defaults (weight_symmetric=True, activation_symmetric=False).",
        f"- Latency: ORT CPUExecutionProvider, intra_op = inter_op = 1 thread, batch {args.batch}, median of "
        f"{args.latency_runs} runs after 10 warm-up runs, interleaved run by run with the fp32 model in the same "
        f"process (fp32 median {ms(statistics.median(fp32_lat_all))} over all measurements). The models are "
        "tiny (≈ 0.1 ms per batch), so latency ratios mostly show the fixed cost of the QDQ nodes.",
        f"- Whole script: {time.perf_counter() - t_script:.1f} s. Load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in load_start) if load_start else '?'}, at the end "
        f"{'/'.join(f'{x:.2f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'} — other processes "
        "on the machine inflate the timings of section 4 (accuracy and SQNR do not depend on load).",
    ]

    naive_cfg = short_config(naive["config"])
    md = "\n\n".join([
        "# bench_techniques: accuracy-recovery techniques as searched choices",
        f"Reproduce (from the repository root, in the venv):\n\n```\n{cmd}\n```",
        "\n".join(env_lines),
        "## 1. Outlier CNN: naive per-tensor int8 vs the default-space search\n\n"
        f"Naive config (n_trials=1): {naive_cfg}.\n\n" + sec1_table,
        f"The search delivered trial {search['trial_number']} ({len(ctrials)} COMPLETE, {n_pruned} PRUNED, "
        f"{n_fail} FAIL): "
        f"{short_config(cfg)}; float nodes {search['float_nodes'] or 'none'}.\n\n"
        f"Techniques picked: {', '.join(picked)}."
        + (f"\n\nWarnings from optimize: {'; '.join(search['warnings'])}" if search["warnings"] else ""),
        "### Accuracy by technique over all COMPLETE trials\n\nThe Optuna sampler does not vary one knob at a "
        "time, so these groups differ in the other knobs too (e.g. 16-bit activations or float fallback also "
        "fix the outlier); read them as tendencies. *Median SQNR* = output SQNR vs fp32 of each trial's model on "
        "the eval images. bn_fold is forced on when cle is on, so its rows use cle=False trials only. PRUNED "
        "trials were stopped by autoquant's SQNR pre-score before the eval (no accuracy); they count towards "
        "n_trials.\n\n" + group_all,
        f"Same, only the {len(narrow)} COMPLETE trials with activation_bits=8, fallback_k=0 and a16_k=0 (where "
        "only the calibration / weight knobs and the techniques can deal with the outlier channel):\n\n"
        + group_a8,
        "<details><summary>All COMPLETE and PRUNED trials</summary>\n\nSQNR: this script's, on the eval "
        "images; for PRUNED trials autoquant's pre-score on 2 calibration feeds. Latency ratio: autoquant's own "
        "per-trial measurement (`details['latency_ratio']`, 1 thread, interleaved with fp32 on the first "
        "calibration feed as given).\n\n" + trials_table + "\n\n</details>",
        "## 2. W4A8 per-channel: nearest rounding vs AdaRound\n\n"
        f"Space: {short_config({**w4, 'weight_rounding': '<varied>', 'weight_symmetric': True, 'activation_symmetric': False})}; "
        "same calibration data; n_trials=2 (trial 1 repeats the config to time the warm build — AdaRound's "
        "per-layer cache is then hit — and is scored by reuse of the byte-identical file). Each call was run "
        f"{args.cost_repeats}× in fresh output_dirs for the build timings (medians shown); accuracy and SQNR "
        "are from the first run (identical in every repeat unless marked).\n\n" + sec2_table,
        "## 3. CLE and bias correction: output SQNR off vs on\n\n"
        "Per-tensor weights, 8-bit activations, nearest_even, bn_fold on, fallback 0, the rest default; only "
        "cle / bias_correction change within a row. Cells: SQNR dB (Δ vs off) / accuracy (Δ vs off).\n\n"
        + sec3_table,
        "Summary over the 8 rows (task × bits × calibration):\n\n" + wins_table,
        "## 4. Cost relative to one fp32 eval pass\n\n"
        "BN folding / CLE: `autoquant.variants.make_variant(prepared_model, v)` on the prepared model. AdaRound: "
        "build_seconds of the section-2 runs (same config, nearest_even vs adaround; both 1st trials include the "
        "one-off opset-21 conversion for int4). Bias correction: build_seconds of the section-3 runs, with vs "
        "without (2nd trial, warm). The cost of AdaRound and bias correction grows with the calibration samples "
        "they use (here 256 images) and the layer sizes, not with the eval set; the ratios below are for this "
        f"n_eval={args.n_eval} eval pass and shrink in proportion for a costlier eval.\n\n" + cost_table,
        "In the default-space search of section 1 (outlier task):\n\n" + "\n".join(search_cost_lines),
    ]).rstrip() + "\n"

    publish(args.out, md)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
