"""One trial: config -> ranges -> QDQ model -> the user's eval on that exact file -> stored attributes."""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import optuna
import onnxruntime as ort
from optuna.trial import TrialState

from ._io import sha256_file
from .build import MixedPrecision, RangeCache, build_qdq_model
from .prune import Pruner
from .cost import NOT_SLOWER_THAN_FP32, SpeedMeter, bops
from .errors import AutoQuantError, TrialFailed
from .refine import Refiner
from .techniques.adaround import Interrupted
from .scope import in_scope
from .space import SearchSpace
from .variants import variant_of
from .stages import Degradations
from .study import OWNER_ATTR, Heartbeat, owner_id, requeue, trial_file_name


_log = logging.getLogger("autoquant")


def check_metric(value: Any, what: str) -> float:
    """The callback's return value as a finite float, or TrialFailed saying what was wrong."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrialFailed(f"{what} returned {type(value).__name__} {value!r:.80}; it must return one finite number")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range, e.g. 10**400
        raise TrialFailed(f"{what} returned an integer too large for a float ({str(value)[:40]}...); it must "
                          "return one finite number") from None
    if not math.isfinite(value):
        raise TrialFailed(f"{what} returned {value}; it must return a finite number")
    return value


def call_with_timeout(fn: Callable[[str], Any], arg: str, timeout: float | None) -> Any:
    """``fn(arg)``, or TimeoutError after ``timeout`` seconds. Python cannot stop a running function, so
    a call that times out keeps running in a daemon thread; its result is ignored."""
    if timeout is None:
        return fn(arg)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(arg)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="autoquant-eval", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class Scoring:
    baseline: float
    allowed_drop: float
    drop_type: str  # "absolute" | "relative"
    higher_is_better: bool

    def drop(self, accuracy: float) -> float:
        d = (self.baseline - accuracy) if self.higher_is_better else (accuracy - self.baseline)
        return d / abs(self.baseline) if self.drop_type == "relative" else d

    def feasible(self, accuracy: float) -> bool:
        return self.drop(accuracy) <= self.allowed_drop + 1e-12


#: user attribute holding a COMPLETE trial's file, timings and provenance (one write, see Objective._run)
DETAILS = "details"
#: user attribute of an enqueued trial that must get its full eval (no SQNR / subset pruning)
NO_PRUNE = "no_prune"


@dataclass
class Source:
    """What a trial builds from, per float-model variant (see autoquant.variants)."""

    path: Path
    ranges: RangeCache
    refiner: Refiner
    nodes: frozenset[str]
    macs: dict[str, int]  # per Conv/Gemm/MatMul node, for bit operations
    always_float: dict[str, str]  # nodes never quantized in this variant -> why (unfolded BatchNorm, masking values)
    measure_ranking: Callable[[str, list[str]], list[str]]  # (precision, nodes) -> those nodes, most sensitive first
    op_types: dict[str, str] = field(default_factory=dict)  # node name -> op type (the trial's quantize_ops)
    node_io: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node name -> its input and output tensors
    _rankings: dict[str, list[str]] = field(default_factory=dict)

    def scope_tensors(self, quantize_ops: str | None) -> set[str] | None:
        """The tensors around the nodes a scope quantizes (None: every tensor, ORT's whole registry)."""
        if quantize_ops in (None, "all") or not self.node_io:
            return None
        return {t for n, io in self.node_io.items() if in_scope(self.op_types.get(n, ""), quantize_ops) for t in io}

    def ranking(self, precision: str, quantize_ops: str | None = None, weighted_only: bool = False) -> list[str]:
        """Sensitivity ranking at ``precision`` of the nodes a trial can place there: the nodes its
        ``quantize_ops`` scope quantizes (``weighted_only``: only those with a weight, for w4_fraction),
        minus the ones always float. Measured on first need, and only for those nodes (a search that never
        places 4-bit weights never pays for the w4a8 pass; a compute-only scope does not measure the
        elementwise nodes); each node's SQNR does not depend on which others are measured, so a ranking
        is the same as the whole ranking filtered to its nodes."""
        key = (precision, quantize_ops or "all", weighted_only)
        if key not in self._rankings:
            nodes = [n for n in self.nodes_in_graph_order() if n not in self.always_float
                     and in_scope(self.op_types.get(n, ""), quantize_ops) and (not weighted_only or n in self.macs)]
            self._rankings[key] = self.measure_ranking(precision, nodes) if nodes else []
        return self._rankings[key]

    def nodes_in_graph_order(self) -> list[str]:
        return [n for n in self.op_types if n in self.nodes] if self.op_types else sorted(self.nodes)


#: states that count towards n_trials: a verdict was reached (scored, or pruned as hopeless)
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


class BudgetReached(Exception):
    """Raised at a trial's start when other workers already hold the study's n_trials (trial -> FAIL)."""


#: the second objective (minimised) next to accuracy: detail key holding it
OBJECTIVES = {"size": "size_bytes", "latency": "latency_ms", "bops": "bops"}


class Objective:
    """The callable handed to ``study.optimize``. Returns (accuracy, model bytes)."""

    def __init__(self, *, space: SearchSpace, sources: dict[str, Source], n_compute_nodes: int,
                 eval_callback: Callable[[str], Any], scoring: Scoring, output_dir: Path, n_trials: int,
                 heartbeat_interval: float, eval_timeout: float | None = None, objective: str = "size",
                 latency: SpeedMeter | None = None, pruner: Pruner | None = None,
                 max_high_precision_fraction: float | None = None, trial_dir: Path | None = None,
                 degradations: Degradations | None = None):
        self.space, self.sources, self.n_compute_nodes = space, sources, n_compute_nodes
        self.pruner, self.max_high_precision_fraction = pruner, max_high_precision_fraction
        self.eval_callback, self.scoring, self.output_dir = eval_callback, scoring, output_dir
        self.n_trials, self.heartbeat_interval, self.eval_timeout = n_trials, heartbeat_interval, eval_timeout
        self.objective, self.latency = objective, latency
        self.fp32_bops = {v: 32 * 32 * float(sum(src.macs.values())) for v, src in sources.items()}
        self.trial_dir = trial_dir or output_dir / "trials"  # the study's folder (autoquant.study.trial_folder)
        self.degradations = degradations or Degradations()
        self.eval_calls = 0
        self.failures = 0
        #: config json -> (built file, refinements, SQNR, measured latencies or None)
        self._screened: dict[str, tuple[Path, dict, float | None, dict | None]] = {}
        self._screened_latency: dict[str, dict] = {}  # trial file -> latencies measured when it was screened
        #: set by the search loop when a timeout applies: True once a running trial should give up
        self.should_stop: Callable[[], bool] | None = None
        #: trials autoquant.repair already tried to repair in this process (not to rebuild its ladders)
        self.repair_tried: set[int] = set()
        #: COMPLETE trials whose model file is gone (deleted trials/ folder): not counted, not reused
        self.lost: set[int] = set()

    def done(self, study: optuna.Study) -> int:
        """Trials that count towards n_trials: COMPLETE or PRUNED, except those whose file was lost."""
        return sum(t.number not in self.lost for t in study.get_trials(deepcopy=False, states=DONE_STATES))

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr(OWNER_ATTR, owner_id())
        self._check_budget(trial)
        t0 = time.perf_counter()
        path = self.trial_dir / trial_file_name(trial.number)
        try:
            with Heartbeat(trial.study, trial._trial_id, self.heartbeat_interval):
                return self._run(trial, path, t0)
        except TrialFailed as exc:
            self.failures += 1
            trial.set_user_attr("fail_reason", str(exc))
            path.unlink(missing_ok=True)
            raise
        except optuna.TrialPruned:
            path.unlink(missing_ok=True)
            raise
        except (BudgetReached, AutoQuantError):
            path.unlink(missing_ok=True)
            raise
        except Exception as exc:  # a bug inside the trial: that trial fails with the reason, the study goes on
            _log.warning("autoquant: internal error in trial %d", trial.number, exc_info=True)
            self.failures += 1
            reason = f"internal error in the trial ({type(exc).__name__}: {str(exc)[:300]}); traceback in the log"
            trial.set_user_attr("fail_reason", reason)
            path.unlink(missing_ok=True)
            raise TrialFailed(reason) from None
        except KeyboardInterrupt:  # Ctrl-C: like a kill, the config is scored again later; no partial file stays
            path.unlink(missing_ok=True)
            trial.set_user_attr("fail_reason", "interrupted (KeyboardInterrupt); its config is queued again")
            requeue(trial.study, trial)
            raise

    def _check_budget(self, trial: optuna.Trial) -> None:
        """With many workers, trials started at the same moment may exceed n_trials: the lowest
        numbers go on, the others are pruned before any work."""
        active = [t for t in trial.study.get_trials(deepcopy=False, states=(*DONE_STATES, TrialState.RUNNING))
                  if t.number not in self.lost]
        ahead = sum(t.state != TrialState.RUNNING or t.number < trial.number for t in active if t.number != trial.number)
        if ahead >= self.n_trials:
            raise BudgetReached(f"study already has {self.n_trials} trials done or running")

    def _run(self, trial: optuna.Trial, path: Path, t0: float) -> tuple[float, float]:
        config = self.space.suggest(trial, self.n_compute_nodes)
        trial.set_user_attr("config", config)
        twin = self._same_config_trial(trial, config)
        if twin is not None and twin.state == TrialState.PRUNED:  # same config, same verdict, no work
            trial.set_user_attr("prune_reason", f"same config as trial {twin.number}, pruned: "
                                                f"{twin.user_attrs.get('prune_reason', '')}")
            raise optuna.TrialPruned()
        if twin is not None:  # same config already scored: its file and score are this trial's
            twin_details = twin.user_attrs[DETAILS]  # reuse chains point at the trial that was evaluated
            details = {**twin_details, "reused_from": twin_details.get("reused_from", twin.number), "eval_seconds": 0.0}
            trial.set_user_attr("high_precision_fraction", twin.user_attrs.get("high_precision_fraction"))
            return self._finish(trial, float(twin.user_attrs["accuracy"]), int(twin.user_attrs["size_bytes"]),
                                details, t0, 0.0)
        variant = variant_of(config)
        src = self.sources[variant]
        fallback, mixed = self._plan(config, src)
        self._check_high_precision(trial, config, fallback, mixed, src)
        t_build = time.perf_counter()
        info = self._screened.pop(json.dumps(config, sort_keys=True), None)
        if info is not None and info[0].exists():  # built (and SQNR-scored) when the starting points were screened
            os.replace(info[0], path)
            refinements, sqnr = info[1], info[2]
            if info[3] is not None:
                self._screened_latency[str(path)] = info[3]
        else:
            refinements, sqnr = self._build(config, src, fallback, mixed, path), None
        t_build = time.perf_counter() - t_build
        sha, size = sha256_file(path), path.stat().st_size
        details: dict[str, Any] = {"sha256": sha, "model_file": str(path.relative_to(self.output_dir)),
                                   "float_nodes": fallback, "float_why": self._float_why(config, src, fallback),
                                   "a16_nodes": list(mixed.a16_nodes),
                                   "w4_nodes": list(mixed.w4_nodes), "variant": variant, "build_seconds": t_build,
                                   **refinements, **self._costs(src, config, fallback, mixed, variant)}
        if self.objective == "latency":  # the pre-scores compare trials by it
            self._measure_latency(path, details, both=False)
        reused = self._identical_completed_trial(trial, sha)
        if reused is None and self.pruner is not None:
            self._prescore(trial, path, details, sqnr)
        self._measure_latency(path, details)  # after pruning: a pruned trial is never timed at both threadings
        t_eval = 0.0
        if reused is not None:  # byte-identical file already scored: its score is this file's score
            accuracy = float(reused.user_attrs["accuracy"])
            details["reused_from"] = reused.number
        else:
            self.eval_calls += 1
            t1 = time.perf_counter()
            try:
                value = call_with_timeout(self.eval_callback, str(path), self.eval_timeout)
            except TimeoutError:
                raise TrialFailed(f"eval_callback took longer than eval_timeout={self.eval_timeout} s") from None
            except Exception as exc:
                raise TrialFailed(f"eval_callback raised {type(exc).__name__}: {str(exc)[:300]}") from None
            finally:
                t_eval = time.perf_counter() - t1
            accuracy = check_metric(value, "eval_callback")
            if not path.exists() or sha256_file(path) != sha:
                raise TrialFailed("eval_callback modified or removed the model file it was given; it must only read it")
        details["eval_seconds"] = t_eval
        return self._finish(trial, accuracy, size, details, t0, t_eval)

    def _finish(self, trial: optuna.Trial, accuracy: float, size: int, details: dict, t0: float,
                t_eval: float) -> tuple[float, float]:
        """Store a scored trial (few, grouped writes: each attribute is one storage transaction)."""
        drop = self.scoring.drop(accuracy)
        trial.set_user_attr("accuracy", accuracy)
        trial.set_user_attr("drop", drop)
        trial.set_user_attr("feasible", self.scoring.feasible(accuracy))
        trial.set_user_attr("size_bytes", size)
        trial.set_constraint("accuracy_drop", drop - self.scoring.allowed_drop)
        # speed as a second constraint (values <= 0 are feasible): the sampler learns to avoid configs slower
        # than fp32, and the delivery rule prefers models that meet both (autoquant.select)
        ratio = self.latency.ratio(details) if self.latency is not None else None
        speed = (float(ratio) - NOT_SLOWER_THAN_FP32) if ratio is not None else 0.0
        trial.set_constraint("latency_ratio", speed)
        # optuna-dashboard reads only Optuna's older list under "constraints" (its _get_feasible_trials); Optuna 5
        # reads both layouts and judges feasibility the same (every value <= 0), so both are written
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [drop - self.scoring.allowed_drop, speed])
        details["overhead_seconds"] = time.perf_counter() - t0 - t_eval
        trial.set_user_attr(DETAILS, details)
        return accuracy, float(size if self.objective == "size" else details[self._objective_key])

    @property
    def _objective_key(self) -> str:
        """Detail key of the second objective (latency: the threading the delivery rule uses)."""
        if self.objective == "latency" and self.latency is not None:
            return self.latency.ms_key
        return OBJECTIVES[self.objective]

    def _build(self, config: dict, src: Source, fallback: list[str], mixed: MixedPrecision, path: Path) -> dict:
        """Build the QDQ model at ``path`` and check that ORT loads it; returns the refinements applied."""
        try:
            ranges = src.ranges.ranges(config, src.scope_tensors(config.get("quantize_ops")))
            info = build_qdq_model(src.path, ranges, config, path, [*fallback, *src.always_float],
                                   refine=lambda model: src.refiner.apply(model, config, self.should_stop),
                                   mixed=mixed, writer_options=self.space.target.get("extra_options"))
        except Interrupted as exc:
            raise TrialFailed(f"timeout reached while building: {exc}; the finished AdaRound layers are cached "
                              f"for a later run") from None
        except Exception as exc:
            raise TrialFailed(f"building the QDQ model failed: {type(exc).__name__}: {exc}") from None
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise TrialFailed(f"onnxruntime cannot load the built model: {exc}") from None
        return dict(info.refinements)

    def screen(self, points: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """Build each starting point, score its output SQNR and measure its latency (no user eval). Order: points
        that build; among them those not slower than fp32 first; then fully quantized before rescue points
        (nodes float / 16-bit); each group highest SQNR first. So the first full evals go to the fast configs
        most likely to be feasible. Built files are kept for the trials that run these configs."""
        if self.pruner is None:
            return [(label, params, {}) for label, params in points]
        scored = []
        has_conv = functools.cache(lambda path: any(n.op_type in ("Conv", "ConvTranspose") for n in
                                                    onnx.load(str(path), load_external_data=False).graph.node))
        screen_dir = self.trial_dir / "screen"
        screen_dir.mkdir(parents=True, exist_ok=True)
        for i, (label, params) in enumerate(points):
            config = self.space.suggest(optuna.trial.FixedTrial(params), self.n_compute_nodes)
            src = self.sources[variant_of(config)]
            # rescue points: float / 16-bit nodes, and dynamic quantization where the model has convolutions
            # (ORT CPU runs ConvInteger slower than static QDQ); for MatMul models (Transformers) dynamic is a
            # first-class point
            heavy = bool(config.get("fallback_k") or config.get("a16_k") or config.get("activation_bits", 8) > 8
                         or config.get("weight_bits", 8) > 8
                         or (config.get("mode") == "dynamic" and has_conv(src.path)))
            sqnr = self.screen_config(config, screen_dir / f"point-{i}.onnx")
            ratio = self.screened_ratio(config)
            slow = ratio is not None and ratio > NOT_SLOWER_THAN_FP32
            attrs = {"screen_sqnr_db": sqnr, "screen_latency_ratio": ratio}
            scored.append((sqnr is None, slow, heavy, -sqnr if sqnr is not None else 0.0, label, params, attrs))
        scored.sort(key=lambda p: p[:4])
        return [(label, params, attrs) for *_, label, params, attrs in scored]

    def screen_config(self, config: dict, path: Path) -> float | None:
        """Build ``config`` at ``path``, measure its latency (when a meter is set) and return its output SQNR
        (None when it does not build). The file is kept for a trial that runs this config (see _run)."""
        src = self.sources[variant_of(config)]
        try:
            fallback, mixed = self._plan(config, src)
            refinements = self._build(config, src, fallback, mixed, path)
        except TrialFailed:
            path.unlink(missing_ok=True)
            return None
        sqnr = latency = None
        with self.degradations.guard("screening (output SQNR, latency)", "that point is ranked as unscreened"):
            sqnr = self.pruner.sqnr(path)
            latency = self.latency.measure(path, both=False) if self.latency is not None else None
        self._screened[json.dumps(config, sort_keys=True)] = (path, refinements, sqnr, latency)
        return sqnr

    def screened_ratio(self, config: dict) -> float | None:
        """The delivery rule's latency ratio of a screened build of ``config`` (None: not screened / measured)."""
        info = self._screened.get(json.dumps(config, sort_keys=True))
        return self.latency.ratio(info[3]) if info is not None and info[3] and self.latency else None

    def forget_screened(self, config: dict) -> None:
        """Drop a screened build no trial will run."""
        info = self._screened.pop(json.dumps(config, sort_keys=True), None)
        if info is not None:
            info[0].unlink(missing_ok=True)

    def _plan(self, config: dict, src: Source) -> tuple[list[str], MixedPrecision]:
        """Sensitivity-ranked per-node precision: the fallback_k most sensitive nodes float, the next
        a16_k with 16-bit activations, the least sensitive w4_fraction of weighted nodes at 4 bits."""
        # rankings are measured on this variant: folding BN / CLE change what is sensitive
        fallback, a16, w4 = [], [], []
        if config["fallback_k"] or config.get("a16_k"):
            # only nodes the trial's scope quantizes: a node outside it is float already
            order = src.ranking("w8a8", config.get("quantize_ops"))
            fallback = order[: config["fallback_k"]]
            a16 = order[config["fallback_k"]: config["fallback_k"] + config.get("a16_k", 0)]
        if config.get("w4_fraction"):
            weighted = [n for n in reversed(src.ranking("w4a8", weighted_only=True)) if n not in fallback]
            w4 = weighted[: int(config["w4_fraction"] * len(weighted))]
        return fallback, MixedPrecision(tuple(a16), tuple(w4))

    @staticmethod
    def _float_why(config: dict, src: Source, fallback: list[str]) -> dict[str, str]:
        """Why each node the trial's scope would quantize stays float (nodes outside the scope are float by
        ``quantize_ops`` and not listed)."""
        why = {n: f"fallback_k: sensitivity rank {i + 1} of the nodes in scope" for i, n in enumerate(fallback)}
        in_trial_scope = {n: r for n, r in src.always_float.items()
                          if in_scope(src.op_types.get(n, ""), config.get("quantize_ops"))}
        return {**why, **in_trial_scope}

    def _check_high_precision(self, trial: optuna.Trial, config: dict, fallback: list[str], mixed: MixedPrecision,
                              src: Source) -> None:
        """Prune, before any work, a config over max_high_precision_fraction (float or 16-bit nodes)."""
        n = max(1, self.n_compute_nodes)
        high = 1.0 if config["activation_bits"] > 8 or config["weight_bits"] > 8 else (len(fallback) + len(mixed.a16_nodes)) / n
        trial.set_user_attr("high_precision_fraction", high)
        if self.max_high_precision_fraction is not None and high > self.max_high_precision_fraction + 1e-12:
            trial.set_user_attr("prune_reason", f"{high:.2f} of the nodes at high precision > "
                                                f"max_high_precision_fraction={self.max_high_precision_fraction}")
            raise optuna.TrialPruned()

    def _prescore(self, trial: optuna.Trial, path: Path, details: dict, sqnr: float | None = None) -> None:
        """Cheap fidelities before the full eval; prune (PRUNED + reason) when clearly hopeless, unless
        the trial was enqueued with NO_PRUNE (it asks a question only a full eval answers)."""
        if sqnr is None:
            with self.degradations.guard("pre-scoring (output SQNR)", "trials are fully evaluated without it"):
                sqnr = self.pruner.sqnr(path)
        details["sqnr_db"] = sqnr
        if trial.user_attrs.get(NO_PRUNE) or sqnr is None:
            return
        reason = self.pruner.sqnr_verdict(trial.study, sqnr)  # far below an infeasible trial: needs no timing
        if reason is None:
            self._measure_latency(path, details, both=False)
            cost = float(path.stat().st_size if self.objective == "size" else details[self._objective_key])
            read = self.latency.ratio if self.latency is not None else None  # a slower feasible trial dominates nothing
            reason = self.pruner.sqnr_verdict(trial.study, sqnr, cost, read, read(details) if read else None)
        if reason is None:
            try:
                reason, details["subset_score"] = self.pruner.subset_verdict(path)
            except TrialFailed:
                raise
            except Exception as exc:
                raise TrialFailed(f"eval_subset_callback raised {type(exc).__name__}: {str(exc)[:300]}") from None
        if reason is not None:
            trial.set_user_attr("prune_reason", reason)
            trial.set_user_attr(DETAILS, details)
            path.unlink(missing_ok=True)
            raise optuna.TrialPruned()

    def _costs(self, src: Source, config: dict, fallback: list[str], mixed: MixedPrecision,
               variant: str) -> dict[str, Any]:
        b = bops(src.macs, config, fallback, mixed.a16_nodes, mixed.w4_nodes)
        return {"bops": b, "bops_ratio": b / self.fp32_bops[variant] if self.fp32_bops[variant] else None}

    def _measure_latency(self, path: Path, details: dict, *, both: bool = True) -> None:
        """The trial file's latency ratio at the delivery rule's threading into ``details`` (from its screening
        when it had one), and with ``both`` the other threading's too; each measured once."""
        if self.latency is None:
            return
        details.update(self._screened_latency.pop(str(path), None) or {})
        with self.degradations.guard("latency", "that trial has no latency ratio (it is not delivered as fast)"):
            details.update(self.latency.measure(path, details, both=both))

    def _same_config_trial(self, trial: optuna.Trial, config: dict):
        """A finished (COMPLETE or PRUNED) trial with exactly this config, if any: samplers propose
        duplicates in small spaces, and rebuilding them (AdaRound, bias correction) is wasted work."""
        for t in trial.study.get_trials(deepcopy=False, states=DONE_STATES):
            if t.number != trial.number and t.number not in self.lost and t.user_attrs.get("config") == config and (
                    t.state == TrialState.PRUNED or DETAILS in t.user_attrs):
                return t
        return None

    def _identical_completed_trial(self, trial: optuna.Trial, sha: str):
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            d = t.user_attrs.get(DETAILS, {})
            if d.get("sha256") == sha and "reused_from" not in d and t.number not in self.lost:
                return t
        return None
