"""optimize(): validation at the boundary, then the pipeline

    load/validate -> prepare -> statistics once -> study (resume) -> trials -> select -> deliver.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import optuna
from optuna.trial import TrialState

from . import stats as stats_mod
from ._io import atomic_copy, atomic_write, atomic_write_json, remove_stale_tmp, sha256_bytes, sha256_file
from .build import RangeCache
from .data import CalibrationSource
from .deploy import DELIVERED_FLOAT_MODEL, is_dynamic, roundtrip_max_abs_diff, write_deployment
from .formats import FORMATS
from .errors import (AutoQuantError, ConfigError, InternalError, ModelError, NoCompletedTrialError, OutputDirError,
                     StorageError, TrialFailed)
from .stages import Degradations, current_stage, stage
from .prepare import quantizable_summary
from .model import (PreparedModel, compute_nodes, ensure_node_names, file_size_with_data, float_activation_tensors,
                    load_model, prepare_model)
from . import variants
from .launch import calibration_ref, callable_ref
from .cost import LATENCY_THREADING, SpeedMeter, macs_per_node
from .repair import deliverable_fast, repair_point
from .objective import (DETAILS, OBJECTIVES, BudgetReached, Objective, Scoring, Source,
                        check_metric)
from .prune import Pruner
from .refine import Refiner
from .report import save_csv, trials_frame
from .result import OptimizeResult
from .select import COMPRESSED, SELECT_MODES, latency_ratio, not_slower_than_fp32, rank
from .sensitivity import PRECISIONS, measure_sensitivity, rank_nodes
from .space import KNOBS, SearchSpace, preset_names
from .study import (DEFAULT_HEARTBEAT, GRACE_FACTOR, count, create_or_load, file_lock, open_storage,
                    recover_stale_trials, requeue, trial_folder)

_log = logging.getLogger("autoquant")
DELIVERED_MODEL = "quantized.onnx"
DELIVERED_ENCODINGS = "quantized.encodings.json"
#: calibration feeds the delivered encodings are re-imported and compared on (result.roundtrip_max_abs_diff)
ROUNDTRIP_FEEDS = 2
STUDY_ATTRS = {
    "model_sha256", "fp32_size_bytes", "allowed_accuracy_drop", "drop_type", "higher_is_better", "search_space",
    "objective", "stats_key", "prepared_model", "preparation", "seed", "launch", "baseline_accuracy",
}


def _disk_full(exc: BaseException) -> bool:
    """An exception caused (anywhere in its chain) by a full disk: ENOSPC, or SQLite's "disk is full"."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _check_args(eval_callback, allowed_accuracy_drop, drop_type, higher_is_better, n_trials, timeout, seed,
                select, output_dir, study_name, heartbeat_interval, eval_timeout, objective,
                measure_latency) -> None:
    if not callable(eval_callback):
        raise ConfigError(f"eval_callback must be a callable f(model_path: str) -> float, got {type(eval_callback).__name__}")
    if isinstance(allowed_accuracy_drop, bool) or not isinstance(allowed_accuracy_drop, numbers.Real) \
            or not math.isfinite(allowed_accuracy_drop) or allowed_accuracy_drop < 0:
        raise ConfigError(f"allowed_accuracy_drop must be a finite number >= 0, got {allowed_accuracy_drop!r}")
    if drop_type not in ("absolute", "relative"):
        raise ConfigError(f"drop_type must be 'absolute' or 'relative', got {drop_type!r}")
    if not isinstance(higher_is_better, bool):
        raise ConfigError(f"higher_is_better must be True or False, got {higher_is_better!r}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) or n_trials < 1:
        raise ConfigError(f"n_trials must be an integer >= 1 (the total number of trials), got {n_trials!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ConfigError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r:.60}")
    if select not in SELECT_MODES:
        raise ConfigError(f"select must be one of {list(SELECT_MODES)}, got {select!r}")
    if not isinstance(output_dir, (str, os.PathLike)):
        raise ConfigError(f"output_dir must be a path, got {type(output_dir).__name__}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if not isinstance(measure_latency, bool):
        raise ConfigError(f"measure_latency must be True or False, got {measure_latency!r}")
    if (objective == "latency" or select == "fastest") and not measure_latency:
        raise ConfigError("objective='latency' / select='fastest' need measure_latency=True")
    if eval_timeout is not None and (isinstance(eval_timeout, bool) or not isinstance(eval_timeout, numbers.Real)
                                     or not math.isfinite(eval_timeout) or eval_timeout <= 0):
        raise ConfigError(f"eval_timeout must be None or a number of seconds > 0, got {eval_timeout!r}")
    if isinstance(heartbeat_interval, bool) or not isinstance(heartbeat_interval, numbers.Real) \
            or not math.isfinite(heartbeat_interval) or heartbeat_interval <= 0:
        raise ConfigError(f"heartbeat_interval must be a number of seconds > 0, got {heartbeat_interval!r}")
    if study_name is not None and (not isinstance(study_name, str) or not study_name.strip()):
        raise ConfigError(f"study_name must be a non-empty string or None, got {study_name!r}")


def _space_for(search_space, target: str | None) -> SearchSpace:
    """The search space, restricted to a target preset's limits when ``target`` names one."""
    if target is None:
        return SearchSpace.load(search_space)
    targets = [n for n in preset_names() if n != "default"]
    if not isinstance(target, str) or target not in targets:
        raise ConfigError(f"target must be None or one of {targets}, got {target!r}")
    preset = SearchSpace.load(target)
    if isinstance(search_space, str) and search_space == "default":
        return preset
    return SearchSpace.load(search_space).restricted_to(preset)


def _check_search_args(prune, eval_subset_callback, stop_when_feasible, max_high_precision_fraction) -> None:
    for name, value in (("prune", prune), ("stop_when_feasible", stop_when_feasible)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    if eval_subset_callback is not None and not callable(eval_subset_callback):
        raise ConfigError("eval_subset_callback must be None or a callable f(model_path) -> float on a subset")
    if max_high_precision_fraction is not None and (
            isinstance(max_high_precision_fraction, bool) or not isinstance(max_high_precision_fraction, numbers.Real)
            or not 0 <= max_high_precision_fraction <= 1):
        raise ConfigError(f"max_high_precision_fraction must be None or a number in [0, 1], got "
                          f"{max_high_precision_fraction!r}")


def _check_output_dir(output_dir: Path) -> None:
    """Fail early, before any work, if output_dir cannot hold our files."""
    text = str(output_dir)
    if "\x00" in text:
        raise OutputDirError(f"output_dir {text[:200]!r} contains a NUL byte; pass a real path")
    if any(len(part.encode()) > 255 for part in output_dir.parts):
        raise OutputDirError(f"output_dir {text[:200]}...: a path component is longer than 255 bytes; use shorter names")
    if output_dir.resolve().parts[1:2] in (("proc",), ("sys",), ("dev",)):
        raise OutputDirError(f"output_dir {output_dir} is inside a kernel file system; choose a normal directory")
    for sub, kind in (("trials", "a folder"), ("cache", "a folder")):
        if (output_dir / sub).exists() and not (output_dir / sub).is_dir():
            raise OutputDirError(f"output_dir {output_dir}: {sub} is a file, but autoquant keeps {kind} of that "
                                 "name there; move it away or choose another output_dir")
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"output_dir {output_dir} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir {output_dir} is not writable ({probe}); choose a writable directory")
    if output_dir.exists():
        try:
            with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".autoquant-probe-"):
                pass
        except OSError as exc:
            raise OutputDirError(f"output_dir {output_dir} is not writable: {exc}") from None


#: what optimize() writes at the top of output_dir (besides cache/, whose files it only adds) and trials/
OUTPUT_NAMES = ("quantized.", "report.csv", "pareto.png", "result.json", "autoquant.json", "study.db")


def _check_inputs_outside_outputs(model, out: Path) -> None:
    """Refuse a model file that a deliverable would overwrite (``output_dir/quantized.onnx``, a trial file):
    nothing the user has is ever lost. Files in ``cache/`` are autoquant's own copies (a worker reads the
    fp32 copy there) and are never rewritten."""
    if not isinstance(model, (str, os.PathLike)):
        return
    path, root = Path(model).resolve(), out.resolve()
    try:
        rel = path.relative_to(root)
    except ValueError:
        return
    top = rel.parts[0]
    if top == "trials" or (len(rel.parts) == 1 and top.startswith(OUTPUT_NAMES)):
        raise OutputDirError(f"the model {model} is inside output_dir {out} where autoquant writes its outputs "
                             f"({rel} would be overwritten); move the model or pass another output_dir")


def _stage_lock(out: Path):
    """An exclusive lock per output_dir on this machine (workers on other machines that share the folder
    compute identical statistics and write them atomically). Its file lives in the temp dir: output_dir must
    not be created before the inputs are known to be good."""
    return file_lock(str(out.resolve()))


def _check_same_settings(name: str, attrs: dict, settings: dict) -> None:
    """A resumed study must be scored the same way it was created, or its stored verdicts are wrong."""
    for key, value in settings.items():
        if key in attrs and attrs[key] != value:
            raise StorageError(f"study {name!r} was created with {key}={attrs[key]!r}, this call passes {value!r}; "
                               "pass another study_name or output_dir to start a new study")


def _study_name(model_sha: str, space: SearchSpace, drop: float, drop_type: str, higher: bool, objective: str) -> str:
    h = sha256_bytes(f"{model_sha}|{space.fingerprint()}|{drop!r}|{drop_type}|{higher}|{objective}".encode())
    return f"autoquant-{h[:12]}"


def _prepare(proto: onnx.ModelProto, model_sha: str, cache_dir: Path, work: Path) -> PreparedModel:
    """Prepared base model from the cache, or prepared now into ``work`` (copied to the cache by the caller).
    Raises ModelError when nothing in the model can be quantized (no trial could change anything)."""

    def make() -> tuple[onnx.ModelProto, list[str]]:
        named = onnx.ModelProto()
        named.CopyFrom(proto)
        steps = [f"named {n} unnamed nodes"] if (n := ensure_node_names(named)) else []
        prepared = prepare_model(named, work / "prepare.tmp.onnx")
        p = prepared.load()
        prepared.path.unlink()
        return p, steps + prepared.steps

    prepared = variants.cached_model(cache_dir, work, f"prepared-{model_sha[:16]}", make)
    prepared.report = quantizable_summary(prepared.load(), prepared.steps)
    if prepared.report.n_quantizable == 0:
        raise ModelError(f"{prepared.report.warning}; autoquant has nothing to search (float nodes: "
                         f"{prepared.report.float_op_counts()})")
    return prepared


def _variants_needed(space: SearchSpace) -> list[str]:
    """The float-model variants this space can reach."""
    def can(knob: str, value) -> bool:
        dom = space.domains.get(knob)
        return value in (dom.values or ()) if dom is not None else KNOBS[knob].default == value

    out = [variants.BASE]
    if can("cle", False) and can("bn_fold", True):
        out.append(variants.BN_FOLD)
    if can("cle", True):
        out.append(variants.CLE)
    return out


def _stage_inputs(proto: onnx.ModelProto, model_sha: str, calibration_data, space: SearchSpace, cache_dir: Path,
                  progress: bool) -> tuple[dict[str, PreparedModel], dict[str, stats_mod.Statistics]]:
    """Prepared model variants and their statistics, from the cache or made now.

    New files are made in a temp dir and copied into the cache only once complete, so an input error
    (a bad feed #37, ...) leaves nothing behind in output_dir.
    """
    with tempfile.TemporaryDirectory(prefix="autoquant-stage-") as staging:
        work = Path(staging)
        base = _prepare(proto, model_sha, cache_dir, work)
        models = {variants.BASE: base}
        for v in _variants_needed(space)[1:]:
            models[v] = variants.cached_model(cache_dir, work, f"prepared-{model_sha[:16]}-{v}",
                                              lambda v=v: variants.make_variant(base.load(), v))
        source = CalibrationSource(calibration_data, base.input_specs)
        stats_for = {variants.stats_variant(v): models[variants.stats_variant(v)] for v in models}
        statistics = _statistics(stats_for, source, cache_dir, work, progress)
        for f in work.iterdir():
            if not (cache_dir / f.name).exists():
                atomic_copy(f, cache_dir / f.name)  # copy: the temp dir may be on another file system
    for m in models.values():
        m.path = cache_dir / m.path.name
    return models, {v: statistics[variants.stats_variant(v)] for v in models}


def _statistics(models: dict[str, PreparedModel], source: CalibrationSource, cache_dir: Path, work: Path,
                progress: bool) -> dict[str, stats_mod.Statistics]:
    """Statistics per model, from the cache when the data fingerprint matches, else ONE collection pass
    over the data that feeds every model missing from the cache."""
    found: dict[str, stats_mod.Statistics] = {}
    if source.reiterable:
        data_sha = source.fingerprint()
        for name, m in models.items():
            cached = cache_dir / f"stats-{stats_mod.stats_key(m.sha256, data_sha)}.npz"
            if cached.exists():
                try:
                    found[name] = stats_mod.Statistics.load(cached)
                except Exception:  # unreadable / old cache: collect again
                    _log.warning("statistics cache %s unreadable; collecting again", cached)
    missing = [name for name in models if name not in found]
    if missing:
        from tqdm.auto import tqdm

        protos = {name: models[name].load() for name in missing}
        jobs = [(protos[n], float_activation_tensors(protos[n]), models[n].sha256) for n in missing]
        with tqdm(desc="calibration statistics", unit="feed", disable=not progress, leave=False) as bar:
            collected, _ = stats_mod.collect_statistics_many(jobs, source, progress=bar)
        for name, st in zip(missing, collected):
            st.save(work / f"stats-{st.key}.npz")
            found[name] = st
    return found


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    calibration_data: Iterable[dict[str, np.ndarray]] | Callable[[], Iterable[dict[str, np.ndarray]]],
    eval_callback: Callable[[str], float],
    allowed_accuracy_drop: float = 0.01,
    drop_type: str = "absolute",
    higher_is_better: bool = True,
    search_space: str | os.PathLike | dict | SearchSpace = "default",
    n_trials: int = 50,
    timeout: float | None = None,
    seed: int = 0,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    output_dir: str | os.PathLike = "autoquant_out",
    select: str = "smallest",
    show_progress: bool = True,
    heartbeat_interval: float = DEFAULT_HEARTBEAT,
    eval_timeout: float | None = None,
    objective: str = "size",
    measure_latency: bool = True,
    prune: bool = True,
    eval_subset_callback: Callable[[str], float] | None = None,
    stop_when_feasible: bool = False,
    max_high_precision_fraction: float | None = None,
    target: str | None = None,
    baseline_accuracy: float | None = None,
    latency_threading: str = "default",
) -> OptimizeResult:
    """Search quantization configs of ``model`` and deliver the best one within the accuracy limit.

    Returns an :class:`OptimizeResult`; never None. When no trial is feasible the most accurate
    trial is delivered with ``feasible=False`` and a warning. Raises an ``AutoQuantError`` subclass
    for bad input, with a message that says what to fix.

    ``baseline_accuracy``: the fp32 model's score when the user already knows it (the same callback on
    the same data); it replaces the fp32 eval call. Left None, the fp32 model is scored once per study.

    ``latency_threading``: how the latency that the delivery rule compares with fp32 is measured: "default"
    (ONNX Runtime's default intra-op threading, as a session runs out of the box) or "single" (one thread).
    Both ratios are recorded for every trial.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar and warnings replace its INFO lines
    try:
        return _optimize(model, calibration_data, eval_callback, allowed_accuracy_drop, drop_type, higher_is_better,
                         search_space, n_trials, timeout, seed, storage, study_name, output_dir, select, show_progress,
                         heartbeat_interval, eval_timeout, objective, measure_latency, prune, eval_subset_callback,
                         stop_when_feasible, max_high_precision_fraction, target, baseline_accuracy,
                         latency_threading)
    except AutoQuantError:
        raise
    except Exception as exc:  # a bug of ours (or an unexpected third-party failure): say so, keep the study
        where = current_stage.get()
        if _disk_full(exc):
            raise OutputDirError(f"no space left on the device (stage {where!r}): free some space, then rerun the "
                                 "same call: the study's completed trials are kept and it resumes") from exc
        _log.error("autoquant: internal error in stage %s", where, exc_info=True)
        raise InternalError(f"autoquant failed in stage {where!r}: {type(exc).__name__}: {str(exc)[:300]}. The "
                            "study's completed trials are kept (rerun to resume); the traceback is in the "
                            "'autoquant' log; please report it") from exc
    finally:
        optuna.logging.set_verbosity(verbosity)


def _optimize(model, calibration_data, eval_callback, allowed_accuracy_drop, drop_type, higher_is_better,
              search_space, n_trials, timeout, seed, storage, study_name, output_dir, select,
              show_progress, heartbeat_interval, eval_timeout, objective, measure_latency, prune,
              eval_subset_callback, stop_when_feasible, max_high_precision_fraction, target,
              baseline_accuracy=None, latency_threading="default") -> OptimizeResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    _check_args(eval_callback, allowed_accuracy_drop, drop_type, higher_is_better, n_trials, timeout, seed,
                select, output_dir, study_name, heartbeat_interval, eval_timeout, objective, measure_latency)
    _check_search_args(prune, eval_subset_callback, stop_when_feasible, max_high_precision_fraction)
    if baseline_accuracy is not None and (isinstance(baseline_accuracy, bool) or not isinstance(
            baseline_accuracy, numbers.Real) or not math.isfinite(baseline_accuracy)):
        raise ConfigError(f"baseline_accuracy must be None or the fp32 model's finite score, got {baseline_accuracy!r}")
    if latency_threading not in LATENCY_THREADING:
        raise ConfigError(f"latency_threading must be one of {list(LATENCY_THREADING)}, got {latency_threading!r}")
    space = _space_for(search_space, target)
    proto = load_model(model)
    model_bytes = proto.SerializeToString()
    model_sha = sha256_bytes(model_bytes)
    out = Path(output_dir).absolute()  # an eval callback that changes the working directory moves nothing
    _check_output_dir(out)
    _check_inputs_outside_outputs(model, out)
    remove_stale_tmp(out)  # half-written temp files of a killed earlier run
    user_storage = open_storage(storage, out) if storage is not None else None  # fail fast on a bad URL
    cache_dir = out / "cache"

    with _stage_lock(out), _timed(timings, "preparation_and_statistics"):  # workers starting together: the
        # first prepares and collects, the others load
        models, statistics = _stage_inputs(proto, model_sha, calibration_data, space, cache_dir, show_progress)
    prepared = models[variants.BASE]
    fp32_path = Path(model) if not isinstance(model, onnx.ModelProto) else cache_dir / f"fp32-{model_sha[:16]}.onnx"
    if isinstance(model, onnx.ModelProto) and not fp32_path.exists():
        atomic_write(fp32_path, lambda tmp: onnx.save(model, tmp))

    storage_obj = user_storage or open_storage(None, out)
    try:
        name = study_name or _study_name(model_sha, space, float(allowed_accuracy_drop), drop_type, higher_is_better,
                                         objective)
        study = create_or_load(storage_obj, name, higher_is_better, int(seed), int(n_trials))
        attrs = study.user_attrs
        if attrs.get("model_sha256") not in (None, model_sha):
            raise OutputDirError(f"study {name!r} in this storage belongs to another model; pass another study_name "
                                 f"or output_dir")
        _check_same_settings(name, attrs, {
            "allowed_accuracy_drop": float(allowed_accuracy_drop), "drop_type": drop_type,
            "higher_is_better": higher_is_better, "search_space": space.to_json(), "objective": objective,
        })
        if baseline_accuracy is not None and attrs.get("baseline_accuracy", baseline_accuracy) != baseline_accuracy:
            raise ConfigError(f"baseline_accuracy={baseline_accuracy} differs from study {name!r}'s fp32 score "
                              f"{attrs['baseline_accuracy']}; pass the same value, or another study_name / output_dir")
        eval_calls = 0
        if not STUDY_ATTRS <= set(attrs):  # new study, or one whose record a kill interrupted
            with _timed(timings, "fp32_eval"):
                _record_study(study, eval_callback, fp32_path, drop_type, baseline_accuracy, {
                    "model_sha256": model_sha, "fp32_size_bytes": file_size_with_data(fp32_path),
                    "allowed_accuracy_drop": float(allowed_accuracy_drop), "drop_type": drop_type,
                    "higher_is_better": higher_is_better, "search_space": space.to_json(), "objective": objective,
                    "stats_key": statistics[variants.BASE].key,
                    "prepared_model": str(prepared.path), "preparation": _preparation_record(models, statistics),
                    "seed": int(seed),
                    "launch": {  # what `autoquant worker` needs to join this study
                        "model_path": str(fp32_path.resolve()), "output_dir": str(out.resolve()),
                        "calibration_ref": calibration_ref(calibration_data), "eval_ref": callable_ref(eval_callback),
                        "n_trials": int(n_trials), "select": select, "heartbeat_interval": float(heartbeat_interval),
                        "eval_timeout": eval_timeout, "objective": objective, "measure_latency": measure_latency,
                        "prune": prune, "max_high_precision_fraction": max_high_precision_fraction,
                        "latency_threading": latency_threading,
                    },
                })
            eval_calls += baseline_accuracy is None
        baseline = float(study.user_attrs["baseline_accuracy"])
        atomic_write_json(out / "autoquant.json", {"study_name": name, "storage": storage if isinstance(storage, str)
                                                   else (None if storage is None else type(storage).__name__)})

        degraded = Degradations()
        degraded.study = study
        sources = _sources(models, statistics, cache_dir, _sensitivity_precisions(space), degraded)
        default = variants.BN_FOLD if variants.BN_FOLD in models else variants.BASE
        trial_dir = trial_folder(out, name)
        recover_stale_trials(study, trial_dir, GRACE_FACTOR * heartbeat_interval)

        scoring = Scoring(baseline, float(allowed_accuracy_drop), drop_type, higher_is_better)
        pruner = _pruner(study, prepared, statistics, scoring, eval_subset_callback, prune) if (
            prune or eval_subset_callback) else None
        objective = Objective(space=space, sources=sources, n_compute_nodes=len(compute_nodes(models[default].load())),
                              pruner=pruner, max_high_precision_fraction=max_high_precision_fraction,
                              eval_callback=eval_callback, scoring=scoring,
                              output_dir=out, n_trials=int(n_trials), heartbeat_interval=heartbeat_interval,
                              eval_timeout=eval_timeout, objective=objective, trial_dir=trial_dir,
                              latency=_latency_meter(fp32_path, statistics, latency_threading)
                              if measure_latency else None, degradations=degraded)
        notes = _rescore_lost_trials(study, objective)
        with _stage_lock(out), _timed(timings, "screening"):  # workers starting together: one screens, enqueues
            if not study.get_trials(deepcopy=False):  # a new study: its baselines first, most promising first
                points = [(label, params, {}) for label, params in space.starting_points()]
                with degraded.guard("screening", "the starting points run in their listed order, unscreened"):
                    points = objective.screen(space.starting_points())
                for label, params, screened in points[: int(n_trials)]:
                    study.enqueue_trial(params, user_attrs={"enqueued": label, **screened})
        _move_sensitivity_time(timings, "screening", sources)
        try:
            with _timed(timings, "trials"):
                _run_trials(study, objective, int(n_trials), timeout, t_start, show_progress, stop_when_feasible)
        finally:
            shutil.rmtree(objective.trial_dir / "screen", ignore_errors=True)  # screened builds no trial used
        _move_sensitivity_time(timings, "trials", sources)
        if timeout is not None and not count(study, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
            raise NoCompletedTrialError(
                f"no trial ran: timeout={timeout} s expired before the first trial (preparation, statistics, "
                f"sensitivity, the fp32 evaluation and screening the starting points took "
                f"{time.perf_counter() - t_start:.1f} s); raise timeout"
            )
        _record_sensitivity(study, sources[default])  # the rankings the trials measured (on first need)
        with stage("delivery"):
            result = _deliver(study, out, select, higher_is_better, scoring, latency_threading, degraded,
                              statistics[variants.BASE].samples[:ROUNDTRIP_FEEDS])
        result.eval_calls = eval_calls + objective.eval_calls
        result.warnings = notes + degraded.notes + result.warnings
        timings["total"] = time.perf_counter() - t_start
        result.timings = timings
        return result
    finally:
        if user_storage is None:  # our SQLite: close it so its WAL is checkpointed into study.db
            storage_obj.engine.dispose()


def _move_sensitivity_time(timings: dict[str, float], stage_name: str, sources: dict[str, Source]) -> None:
    """The sensitivity ranking is measured on first need, inside screening or a trial: move its seconds from
    that stage to timings["sensitivity"], so the stages add up to the total."""
    spent = sum(getattr(src.measure_ranking, "seconds", 0.0) for src in sources.values())
    new = spent - timings.get("sensitivity", 0.0)
    if new > 0:
        timings[stage_name] = timings.get(stage_name, 0.0) - new
        timings["sensitivity"] = spent


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    """Add the wall seconds of the block to ``timings[name]`` (OptimizeResult.timings); the block is stage
    ``name`` for an InternalError's message."""
    t0 = time.perf_counter()
    try:
        with stage(name):
            yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _record_study(study: optuna.Study, eval_callback, fp32_path: Path, drop_type: str, given: float | None,
                  record: dict) -> None:
    """Score the fp32 model once (unless the user ``given`` its score) and store the study's record,
    baseline last (its presence = complete)."""
    try:
        baseline = float(given) if given is not None else check_metric(eval_callback(str(fp32_path)),
                                                                       "eval_callback on the fp32 model")
    except TrialFailed as exc:
        raise ConfigError(f"{exc}; fix the callback (it scores the fp32 model first)") from None
    except Exception as exc:
        raise ConfigError(f"eval_callback raised {type(exc).__name__}: {str(exc)[:300]} on the fp32 model {fp32_path}; "
                          "fix the callback (it scores the fp32 model first)") from exc
    if drop_type == "relative" and baseline == 0:
        raise ConfigError("drop_type='relative' needs a non-zero fp32 score; the callback returned 0")
    record = {**record, "baseline_accuracy": baseline}
    assert set(record) == STUDY_ATTRS
    for k, v in record.items():
        study.set_user_attr(k, v)


BN_REASON = "unfolded BatchNormalization: ORT would quantize its scale per tensor as a weight"
MASK_REASON = "reads or writes a masking value (|x| >= 1e30, e.g. an attention mask): kept float so it still masks"


def masked_nodes(proto: onnx.ModelProto, masked_tensors) -> list[str]:
    """Nodes that read or write a tensor holding masking sentinels: quantizing them would clip the mask
    to the real values' range, and the masked positions would leak through."""
    return [n.name for n in proto.graph.node if masked_tensors & {*n.input, *n.output}]


def _preparation_record(models: dict[str, PreparedModel], statistics: dict) -> dict:
    """The base model's preparation report, plus nodes kept float for masking values, plus each variant's steps."""
    record = {**models[variants.BASE].report.to_dict(), "variants": {v: m.steps for v, m in models.items()}}
    masked = masked_nodes(models[variants.BASE].load(), statistics[variants.BASE].masked_tensors)
    record["float_nodes"] = {**record.get("float_nodes", {}), **{n: MASK_REASON for n in masked}}
    return record


def _sensitivity_precisions(space: SearchSpace) -> tuple[str, ...]:
    """The precisions the space's knobs rank nodes at: w8a8 orders fallback_k and a16_k, w4a8 orders
    w4_fraction (autoquant.objective). Only these are measured."""
    def used(knob: str) -> bool:
        dom = space.domains.get(knob)
        return dom is not None and bool((dom.values and max(dom.values) > 0) or (dom.high and dom.high > 0))

    return (("w8a8",) if used("fallback_k") or used("a16_k") else ()) + (("w4a8",) if used("w4_fraction") else ())


def _record_sensitivity(study: optuna.Study, source: Source) -> None:
    """Record in the study (result.sensitivity()) what the default variant measured so far, merged with
    what earlier runs and other workers recorded."""
    measured = getattr(source.measure_ranking, "sensitivity", {})
    if not measured:
        return
    old = study.user_attrs.get("sensitivity", {})
    merged = {n: {p: (v if v is not None else old.get(n, {}).get(p)) for p, v in d.items()} for n, d in measured.items()}
    if merged != old:
        study.set_user_attr("sensitivity", merged)


def _pruner(study: optuna.Study, prepared: PreparedModel, statistics: dict, scoring: Scoring,
            subset_callback, enabled: bool) -> Pruner:
    subset_scoring = None
    if subset_callback is not None:
        if "subset_baseline" not in study.user_attrs:
            try:
                value = check_metric(subset_callback(str(prepared.path)), "eval_subset_callback on the fp32 model")
            except Exception as exc:
                raise ConfigError(f"eval_subset_callback failed on the fp32 model: {exc}") from None
            study.set_user_attr("subset_baseline", value)
        subset_scoring = Scoring(float(study.user_attrs["subset_baseline"]), scoring.allowed_drop, scoring.drop_type,
                                 scoring.higher_is_better)
    return Pruner(prepared.path, statistics[variants.BASE].samples, subset_callback=subset_callback,
                  subset_scoring=subset_scoring, enabled=enabled)


def _sources(models: dict[str, PreparedModel], statistics: dict, cache_dir: Path,
             precisions: tuple[str, ...] = ("w8a8", "w4a8"), degraded: Degradations | None = None) -> dict[str, Source]:
    ranges = {id(st): RangeCache(st) for st in statistics.values()}  # variants sharing statistics share ranges
    out = {}
    for v, m in models.items():
        proto = m.load()
        # ORT would quantize an unfolded BatchNorm's scale per tensor as a weight (one outlier channel
        # then zeroes the others): BatchNorm that is not folded stays float.
        keep_float = {n.name: BN_REASON for n in proto.graph.node if n.op_type == "BatchNormalization"}
        keep_float.update(dict.fromkeys(masked_nodes(proto, statistics[v].masked_tensors), MASK_REASON))
        out[v] = Source(m.path, ranges[id(statistics[v])], Refiner(m.path, statistics[v].samples, cache_dir),
                        frozenset(n.name for n in proto.graph.node), macs_per_node(proto), keep_float,
                        _ranking_measure(m, statistics[v], cache_dir, precisions, degraded),
                        {n.name: n.op_type for n in proto.graph.node},
                        {n.name: tuple(t for t in (*n.input, *n.output) if t) for n in proto.graph.node})
    return out


def _ranking_measure(model: PreparedModel, statistics, cache_dir: Path, precisions: tuple[str, ...],
                     degraded: Degradations | None = None):
    """The ranking function of a Source: measures one precision for the fallback candidates asked (those not
    measured yet; ``precisions`` lists the precisions the space may ask for), keeps every SQNR so far in
    ``measure.sensitivity`` and its wall time in ``measure.seconds`` (result.timings). If the measurement
    fails, the ranking degrades to graph order (recorded) and the search goes on."""
    table = {}
    candidates: list[str] = []  # compute_nodes(), read on first need

    def measure(precision: str, wanted: list[str]) -> list[str]:
        t0 = time.perf_counter()
        try:
            return _measure(precision, set(wanted))
        finally:
            measure.seconds += time.perf_counter() - t0

    def _measure(precision: str, wanted: set[str]) -> list[str]:
        if precision not in precisions:
            raise AssertionError(f"precision {precision} not in the space's {precisions}")
        if not candidates:
            candidates.extend(compute_nodes(model.load()))
        nodes = [n for n in candidates if n in wanted]  # the fallback candidates the asking trial can place
        got = None
        with (degraded or Degradations()).guard(f"sensitivity ({precision})",
                                                "nodes are ranked in graph order for fallback_k / a16_k / w4_fraction"):
            got = measure_sensitivity(model.path, statistics, nodes, cache_dir, precisions=(precision,))
        if got is None:
            return nodes
        for n, d in got.items():  # every precision keeps its column in result.sensitivity(): None if not measured
            row = table.setdefault(n, dict.fromkeys(PRECISIONS))
            v = d.get(precision)
            row[precision] = v if v is not None and np.isfinite(v) else None
        return rank_nodes(got, precision)

    measure.sensitivity = table
    measure.seconds = 0.0
    return measure


def _latency_meter(fp32_path: Path, statistics: dict, threading: str) -> SpeedMeter:
    """Latency vs fp32 on the first calibration feed, batched as the user batches it (per-sample timing
    would overstate the Q/DQ overhead of a model run on batches), single-threaded and with ORT's default
    threading."""
    return SpeedMeter(fp32_path, statistics[variants.BASE].samples[0], threading)


def _run_trials(study: optuna.Study, objective: Objective, n_trials: int, timeout: float | None, t_start: float,
                progress: bool, stop_when_feasible: bool = False) -> None:
    """Run until the study holds n_trials done trials (COMPLETE or PRUNED, whoever ran them: this process
    or other workers), the timeout passes (once a trial has completed: there must be a model to
    deliver), this process saw too many trials fail, or — with ``stop_when_feasible`` — a feasible
    trial exists."""
    from tqdm.auto import tqdm

    grace = GRACE_FACTOR * objective.heartbeat_interval
    if timeout is not None:  # a slow build (AdaRound) gives up at the timeout once there is a model to deliver
        objective.should_stop = _past_timeout(study, t_start, timeout)
    failures_allowed = max(3, n_trials)  # a callback that always fails must not loop forever
    done = objective.done(study)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported in the report, not logged
    try:
        with tqdm(total=n_trials, initial=done, desc="autoquant trials", unit="trial", disable=not progress) as bar:
            while done < n_trials and objective.failures < failures_allowed:
                if stop_when_feasible and _deliverable_found(study, objective):
                    break
                remaining_time = None if timeout is None else timeout - (time.perf_counter() - t_start)
                if remaining_time is not None and remaining_time <= 0:
                    if count(study, TrialState.COMPLETE):
                        break
                    remaining_time = None  # nothing to deliver yet: the timeout stops the search after a first model
                recover_stale_trials(study, objective.trial_dir, grace)
                with objective.degradations.guard("repair", "the sampler goes on without it"):
                    _enqueue_repair(study, objective)
                if done + count(study, TrialState.RUNNING) >= n_trials:
                    time.sleep(min(1.0, objective.heartbeat_interval))  # other workers hold the rest
                else:
                    study.optimize(objective, n_trials=1, timeout=remaining_time, catch=(TrialFailed, BudgetReached))
                now = objective.done(study)
                bar.update(now - done)
                done = now
    finally:
        optuna.logging.set_verbosity(verbosity)


def _rescore_lost_trials(study: optuna.Study, objective: Objective) -> list[str]:
    """COMPLETE trials whose model file is missing or changed (a deleted trials/ folder) cannot be delivered:
    they stop counting towards n_trials and their configs are queued to be built and scored again."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    lost = []
    for t in complete:
        d = t.user_attrs.get(DETAILS, {})
        f = objective.output_dir / d.get("model_file", "")
        if "model_file" in d and not (f.is_file() and sha256_file(f) == d.get("sha256")):
            lost.append(t)
    objective.lost = {t.number for t in lost}
    kept = [t.user_attrs.get("config") for t in complete if t.number not in objective.lost]
    queued = [t.number for t in lost if t.user_attrs.get("config") not in kept and requeue(study, t) is not None]
    if not lost:
        return []
    note = (f"{len(lost)} completed trials' model files were missing or changed (trials "
            f"{sorted(objective.lost)[:10]}); {len(queued)} configs were queued to be scored again")
    _log.warning(note)
    return [note]


def _deliverable_found(study: optuna.Study, objective: Objective) -> bool:
    """A feasible trial exists, and (when latency is measured) one that is not slower than fp32: a feasible but
    slower model does not end a ``stop_when_feasible`` search while trials remain."""
    return any(t.user_attrs.get("feasible") and deliverable_fast(study, objective, t)
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _past_timeout(study: optuna.Study, t_start: float, timeout: float) -> Callable[[], bool]:
    """True once ``timeout`` seconds passed since ``t_start`` and a trial completed (a model exists)."""
    return lambda: time.perf_counter() - t_start > timeout and count(study, TrialState.COMPLETE) > 0


def _enqueue_repair(study: optuna.Study, objective: Objective) -> None:
    """Once the queue is empty and nothing is feasible: enqueue the repair of the most accurate trial
    (autoquant.repair). Under the stage lock, so concurrent workers enqueue it once."""
    if objective.pruner is None or count(study, TrialState.WAITING):  # no SQNR to aim with / queue not empty
        return
    with _stage_lock(objective.output_dir):
        if count(study, TrialState.WAITING):
            return
        point = repair_point(study, objective)
        if point is not None:
            label, params, attrs = point
            study.enqueue_trial(params, user_attrs={"enqueued": label, **attrs})


def _deliver(study: optuna.Study, out: Path, select: str, higher_is_better: bool, scoring: Scoring,
             threading: str = "default", degraded: Degradations | None = None,
             feeds: list[dict] | None = None) -> OptimizeResult:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        reasons = sorted({t.user_attrs.get("fail_reason", t.system_attrs.get("fail_reason", "unknown"))
                          for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))})
        raise NoCompletedTrialError(
            f"no trial of study {study.study_name!r} completed, so there is no model to deliver. Reasons: "
            + "; ".join(reasons[:5])
        )
    chosen = None
    fp32_size = int(study.user_attrs["fp32_size_bytes"])
    for t in rank(complete, select, higher_is_better, fp32_size, threading):
        d = t.user_attrs[DETAILS]
        src = out / d["model_file"]
        if src.exists() and sha256_file(src) == d["sha256"]:
            chosen = t
            break
        _log.warning("trial %d's model file %s is missing or changed; it cannot be delivered", t.number, src)
    if chosen is None:
        raise NoCompletedTrialError("every completed trial's model file is missing or modified; rerun the study")
    a, details = chosen.user_attrs, chosen.user_attrs[DETAILS]
    model_path = atomic_copy(out / details["model_file"], out / DELIVERED_MODEL)
    if sha256_file(model_path) != details["sha256"]:  # the delivered file is the scored file, byte for byte
        raise AutoQuantError("delivered model differs from the scored trial file (disk error?)")
    degraded = degraded or Degradations()
    notes = _delivery_warnings(chosen, complete, scoring, threading, fp32_size)
    enc_path = float_path = roundtrip = None
    if is_dynamic(model_path):  # not a failure: no file format holds scales computed at run time
        _log.info("no encodings: the delivered model uses dynamic quantization, whose activation scales ONNX "
                  "Runtime computes at run time; deploy quantized.onnx with ONNX Runtime")
    else:
        with degraded.guard("encodings", f"no {DELIVERED_ENCODINGS} / {DELIVERED_FLOAT_MODEL} was written; the "
                                         f"model is delivered"):
            enc_path, float_path = write_deployment(model_path, out, DELIVERED_ENCODINGS)
    if enc_path is not None and feeds:
        with degraded.guard("round trip", "the encodings were not checked against the delivered model"):
            roundtrip = roundtrip_max_abs_diff(float_path, enc_path, model_path, feeds)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    result = OptimizeResult(
        model_path=str(model_path), accuracy=float(a["accuracy"]), baseline_accuracy=scoring.baseline,
        drop=float(a["drop"]), feasible=bool(a["feasible"]), trial_number=chosen.number, config=dict(a["config"]),
        encodings_path=str(enc_path) if enc_path else None, size_bytes=int(a["size_bytes"]),
        fp32_size_bytes=int(study.user_attrs["fp32_size_bytes"]), study=study, output_dir=str(out),
        higher_is_better=higher_is_better, float_nodes=list(details["float_nodes"]),
        preparation=dict(study.user_attrs.get("preparation", {})),
        latency_ratio=details.get("latency_ratio"), bops_ratio=details.get("bops_ratio"),
        latency_ratio_default_threads=details.get("latency_ratio_default_threads"), warnings=notes,
        float_model_path=str(float_path) if float_path else None, roundtrip_max_abs_diff=roundtrip,
    )
    fmt = (study.user_attrs.get("search_space", {}).get("target") or {}).get("export")
    if fmt:  # the target runtime's own file, next to the model
        from .export import export

        with degraded.guard(f"export ({fmt})", "no export file was written; the model is delivered"):
            result.export_path = str(export(model_path, out / f"quantized{FORMATS[fmt]}", fmt))
    with degraded.guard("report", "no report.csv was written; the study holds every trial"):
        save_csv(trials_frame(study, all_trials=True, higher_is_better=higher_is_better, delivered=chosen.number),
                 out / "report.csv")
    with degraded.guard("plot", "no pareto.png was written"):
        try:
            result.plot(out / "pareto.png")
        except ConfigError:  # matplotlib is an optional extra
            _log.info("matplotlib not installed: no pareto.png")
    atomic_write_json(out / "result.json", {
        "model_path": DELIVERED_MODEL, "encodings_path": DELIVERED_ENCODINGS if enc_path else None,
        "float_model_path": DELIVERED_FLOAT_MODEL if float_path else None, "roundtrip_max_abs_diff": roundtrip,
        "sha256": details["sha256"],
        "accuracy": result.accuracy, "baseline_accuracy": result.baseline_accuracy, "drop": result.drop,
        "feasible": result.feasible, "trial_number": result.trial_number, "config": result.config,
        "size_bytes": result.size_bytes, "fp32_size_bytes": result.fp32_size_bytes, "study_name": study.study_name,
        "latency_ratio": result.latency_ratio, "latency_ratio_default_threads": result.latency_ratio_default_threads,
        "warnings": notes,
    })
    return result


def _delivery_warnings(chosen, complete, scoring: Scoring, threading: str, fp32_size: int) -> list[str]:
    """What the user must know about the delivered model: infeasible, or slower than fp32."""
    a = chosen.user_attrs
    if not a["feasible"]:
        return [f"no trial met allowed_accuracy_drop={scoring.allowed_drop} ({scoring.drop_type}); delivering the "
                f"most accurate trial {chosen.number} (drop {a['drop']:.4g}) with feasible=False"]
    ratio = latency_ratio(chosen, threading)
    if ratio is None or not_slower_than_fp32(chosen, threading, fp32_size):
        return []
    size = a["size_bytes"] / fp32_size
    return [f"the delivered model runs at {ratio:.2f}x fp32's latency ({_THREADING_WORDS[threading]}) and "
            f"{size:.2f}x its size: none of the {sum(bool(t.user_attrs.get('feasible')) for t in complete)} feasible "
            f"trials is both at fp32 speed or faster and at most {COMPRESSED:g}x its size; raise n_trials, widen "
            f"the space (quantize_ops), or allow a larger drop"]


_THREADING_WORDS = {"default": "ONNX Runtime's default threading", "single": "one thread"}
