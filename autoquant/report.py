"""Trials -> a pandas DataFrame (one row per trial, knob columns + metrics) and CSV."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from .objective import DETAILS
from .select import pareto_front
from .space import CONDITIONAL, KNOBS

#: knobs that do not act under some configs (CONDITIONAL): blank in such a trial's row, not a default value.
#: bn_fold is forced on with CLE, which folds BatchNorm itself: it acts, so it is shown
_BLANK_WHEN_INACTIVE = {k: cond for k, (cond, _) in CONDITIONAL.items() if k != "bn_fold"}
#: the columns `autoquant report` prints by default (result.report() returns every column)
COMPACT = ["trial", "state", "delivered", "mode", "quantize_ops", "calibration", "weight_granularity", "weight_bits",
           "activation_bits", "fallback_k", "accuracy", "drop", "feasible", "size_ratio", "latency_ratio",
           "latency_ratio_default_threads", "n_float_nodes", "enqueued", "prune_reason"]

METRICS = ["accuracy", "drop", "feasible", "size_bytes", "size_ratio", "latency_ms", "latency_ratio",
           "latency_ratio_default_threads", "bops_ratio",
           "n_float_nodes", "eval_seconds", "overhead_seconds"]


def pareto_trials(study: optuna.Study, higher_is_better: bool) -> list[optuna.trial.FrozenTrial]:
    front = study.best_trials  # Optuna's Pareto front of feasible trials
    if front:
        return front
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return pareto_front(complete, higher_is_better) if complete else []


def trials_frame(study: optuna.Study, all_trials: bool = False, higher_is_better: bool = True,
                 delivered: int | None = None) -> pd.DataFrame:
    """The Pareto trials (or every trial), plus the ``delivered`` trial, which the default selection may
    take off the (accuracy, size) front when it is faster than fp32 and the smaller ones are not."""
    fp32_size = study.user_attrs.get("fp32_size_bytes")
    front = {t.number for t in pareto_trials(study, higher_is_better)}
    trials = study.get_trials(deepcopy=False) if all_trials else [
        t for t in study.get_trials(deepcopy=False) if t.number in front or t.number == delivered
    ]
    rows = []
    for t in trials:
        a = t.user_attrs
        d = a.get(DETAILS, {})
        row = {"trial": t.number, "state": t.state.name, "pareto": t.number in front,
               "delivered": t.number == delivered}
        config = a.get("config") or {}
        row.update({k: None if config and k in _BLANK_WHEN_INACTIVE and not _active(k, config)
                    else config.get(k, t.params.get(k)) for k in KNOBS})
        row.update({
            "accuracy": a.get("accuracy"), "drop": a.get("drop"), "feasible": a.get("feasible"),
            "size_bytes": a.get("size_bytes"),
            "size_ratio": (a["size_bytes"] / fp32_size) if fp32_size and "size_bytes" in a else None,
            "latency_ms": d.get("latency_ms"), "latency_ratio": d.get("latency_ratio"),
            "latency_ratio_default_threads": d.get("latency_ratio_default_threads"), "bops_ratio": d.get("bops_ratio"),
            "n_float_nodes": len(d["float_nodes"]) if "float_nodes" in d else None,
            "float_nodes": "; ".join(f"{n} ({why})" for n, why in d.get("float_why", {}).items()) or None,
            "eval_seconds": d.get("eval_seconds"), "overhead_seconds": d.get("overhead_seconds"),
            "reused_from": d.get("reused_from"), "model_file": d.get("model_file"),
            "fail_reason": a.get("fail_reason"), "prune_reason": a.get("prune_reason"), "enqueued": a.get("enqueued"),
        })
        rows.append(row)
    cols = ["trial", "state", "pareto", "delivered", *KNOBS, *METRICS, "float_nodes", "reused_from", "model_file",
            "enqueued", "prune_reason", "fail_reason"]
    df = pd.DataFrame(rows, columns=cols)
    if not all_trials and len(df):
        df = df.sort_values(["size_bytes", "accuracy"], ascending=[True, not higher_is_better]).reset_index(drop=True)
    return df


def _active(knob: str, config: dict) -> bool:
    try:
        return bool(_BLANK_WHEN_INACTIVE[knob](config))
    except KeyError:  # a config recorded by an older version without the knobs the condition reads
        return True


def save_csv(df: pd.DataFrame, path: str | Path) -> Path:
    from ._io import atomic_write

    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
