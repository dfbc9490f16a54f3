"""Helpers shared by the benchmark scripts: ORT sessions and latency, environment lines, report formatting,
the default search space without its sensitivity knobs, and the timing of autoquant's per-node sensitivity pass."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import optuna

import autoquant

REPO = Path(__file__).resolve().parent.parent

#: the default space's knobs that make autoquant run its per-node sensitivity pass before the first trial
SENSITIVITY_KNOBS = ("fallback_k", "a16_k", "w4_fraction")


# ---------------------------------------------------------------------------------------------------
# ORT sessions and latency
# ---------------------------------------------------------------------------------------------------
def session(model, threads: int = 1) -> ort.InferenceSession:
    """A single-threaded (by default), sequential CPU session, from a path or an onnx.ModelProto: the setting
    every latency here uses."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def interleaved_medians(models: dict[str, Any], feed: dict[str, np.ndarray], runs: int, warmup: int) -> dict[str, float]:
    """Median seconds of one single-threaded run per model (name -> path); the models run interleaved, run by
    run and in the dict's order, so that load changes hit all of them alike."""
    sess = {k: session(p) for k, p in models.items()}
    for s in sess.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(runs):
        for k, s in sess.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_ratio(model, fp32, feed: dict, runs: int, warmup: int = 3) -> tuple[float, float, float]:
    """(median model / median fp32, fp32 median ms, model median ms): ORT CPU, 1 thread, interleaved."""
    m = interleaved_medians({"q": model, "f": fp32}, feed, runs, warmup)
    return m["q"] / m["f"], 1000 * m["f"], 1000 * m["q"]


# ---------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------
def code_state(dirty_note: str = " (autoquant/ has uncommitted changes)") -> str:
    """The commit of the repository the imported autoquant comes from, plus ``dirty_note`` when autoquant/ has
    uncommitted changes. Outside git (e.g. a `git archive HEAD` snapshot) the snapshot named by
    AUTOQUANT_SNAPSHOT_OF."""
    pkg = Path(autoquant.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pkg, capture_output=True,
                                text=True).stdout.strip()
        if not commit:
            return f"snapshot {os.environ.get('AUTOQUANT_SNAPSHOT_OF', '?')} at {pkg}"
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=pkg, capture_output=True,
                               text=True).stdout.strip()
        return commit + (dirty_note if dirty else "")
    except OSError:
        return "?"


def git_rev() -> str:
    return code_state(" (autoquant/ modified)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info(dists: tuple[str, ...] = ()) -> dict[str, str]:
    """CPU, cores, autoquant's commit, load average and versions (the core stack plus ``dists``)."""
    versions = {"python": platform.python_version(), "autoquant": getattr(autoquant, "__version__", "?"),
                "onnx": onnx.__version__, "onnxruntime": ort.__version__, "optuna": optuna.__version__,
                "numpy": np.__version__}
    versions.update((d, dist_version(d)) for d in dists)
    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "commit": code_state(), "load": loadavg(),
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items())}


def version_cpu_lines() -> list[str]:
    """The "- Versions" and "- CPU" lines of a report's environment section."""
    return [f"- Versions: onnxruntime {ort.__version__}, optuna {optuna.__version__}, onnx {onnx.__version__}, "
            f"numpy {np.__version__}, Python {platform.python_version()}, autoquant "
            f"{getattr(autoquant, '__version__', '?')} (git {git_rev()})",
            f"- CPU: {cpu_model()}; os.cpu_count() = {os.cpu_count()}, usable (affinity) = "
            f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}; {platform.platform()}"]


def work_dir(path: Path | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """``path`` (created) or a new temporary directory; the second item is what to clean up at the end."""
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        return Path(tmp.name), tmp
    path.mkdir(parents=True, exist_ok=True)
    return path, None


def set_up(makers: dict, keys, failed: list[tuple[str, str]]):
    """Yields (key, task) for each key in turn, the task made by ``makers[key]()``; a set-up that raises is
    recorded in ``failed`` as (key, message), its traceback printed, and the next key follows."""
    for key in keys:
        print(f"[{key}] setting up ...", flush=True)
        try:
            task = makers[key]()
        except Exception as exc:
            failed.append((key, f"{type(exc).__name__}: {exc}"))
            traceback.print_exc()
            continue
        yield key, task


def ort_default_trial(trials):
    """The COMPLETE trial that autoquant enqueued with ONNX Runtime's default config (the first of
    autoquant.space.STARTING_POINTS), or None. autoquant screens its starting points by SQNR and enqueues them
    best first, so this is not necessarily trial 0."""
    from autoquant.space import STARTING_POINTS

    return next((t for t in sorted(trials, key=lambda t: t.number) if t.state.name == "COMPLETE"
                 and t.user_attrs.get("enqueued") == STARTING_POINTS[0][0]), None)


# ---------------------------------------------------------------------------------------------------
# report formatting
# ---------------------------------------------------------------------------------------------------
def publish(path: Path, md: str) -> None:
    """Writes the report ``md`` to ``path`` and prints it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    print()
    print(md)
    print(f"wrote {path}")


def fmt(x, nd=4) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


CONFIG_KEYS = ("mode", "calibration", "percentile", "weight_granularity", "weight_symmetric", "activation_symmetric",
               "weight_bits", "activation_bits", "weight_rounding", "cle", "bn_fold", "bias_correction", "fallback_k",
               "a16_k", "w4_fraction")


def config_str(cfg: dict | None, keys=CONFIG_KEYS) -> str:
    """``k=v, ...`` of a trial config; percentile only with percentile calibration."""
    if not cfg:
        return "–"
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg and cfg[k] is not None
                     and not (k == "percentile" and cfg.get("calibration") != "percentile"))


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# search space without the sensitivity pass, and what that pass would cost
# ---------------------------------------------------------------------------------------------------
def space_without_sensitivity() -> dict:
    """The default space with the knobs that need autoquant's per-node sensitivity pass fixed at 0."""
    import yaml

    from autoquant.space import _spaces_folder  # the folder autoquant itself reads presets from

    knobs = dict(yaml.safe_load((_spaces_folder() / "default.yaml").read_text())["knobs"])
    for k in SENSITIVITY_KNOBS:
        if k in knobs:
            knobs[k] = 0.0 if k == "w4_fraction" else 0
    return {"knobs": knobs}


def time_sensitivity_pass(out_dir: Path, stats_key: str, precisions: tuple[str, ...] = ("w8a8", "w4a8")
                          ) -> dict[str, Any] | None:
    """Time the default space's sensitivity pass (autoquant.sensitivity.measure_sensitivity, the precisions the
    default space uses) on the model of ``optimize(output_dir=out_dir)``, into a fresh cache folder. Returns the
    node count, the precisions, the seconds and the feed shapes; None when the cache holds no prepared model or
    statistics."""
    from autoquant.model import compute_nodes
    from autoquant.sensitivity import MAX_SAMPLES, measure_sensitivity
    from autoquant.stats import Statistics

    cache = out_dir / "cache"
    # the variant autoquant ranks nodes on (bn_fold when the space has it), else the base model
    prepared = sorted(cache.glob("prepared-*-bn_fold.onnx")) or sorted(cache.glob("prepared-*[0-9a-f].onnx"))
    stats_file = cache / f"stats-{stats_key}.npz"  # statistics of the base model (shared by bn_fold)
    if not prepared or not stats_file.exists():
        return None
    st = Statistics.load(stats_file)
    nodes = compute_nodes(onnx.load(str(prepared[0])))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        measure_sensitivity(prepared[0], st, nodes, Path(tmp), precisions=precisions)
        seconds = time.perf_counter() - t0
    return {"n_nodes": len(nodes), "precisions": list(precisions), "seconds": seconds,
            "feed_shapes": {name: list(v.shape) for name, v in st.samples[0].items()}, "n_feeds": MAX_SAMPLES}