"""Accuracy vs the second objective: every completed trial, the feasible region, the Pareto front.

matplotlib is an optional extra (`pip install autoquant[plot]`); without it plotting raises a clear error.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from ._io import atomic_write
from .errors import ConfigError
from .report import pareto_trials

_AXIS = {"size": ("size_bytes", "model size (bytes)"), "latency": ("latency_ms", "ORT CPU latency (ms, 1 thread)"),
         "bops": ("bops", "bit operations")}


#: x spans more than this ratio (fp32 against int8 / int4 models): a log axis, so the quantized trials do not
#: collapse into one corner
LOG_X_SPAN = 5.0
#: per objective: the detail key of its ratio to fp32 (the fp32 point's x is value / ratio)
_RATIO = {"latency_ms": "latency_ratio", "bops": "bops_ratio"}


def _fp32_x(study: optuna.Study, key: str, trials) -> float | None:
    if key == "size_bytes":
        return study.user_attrs.get("fp32_size_bytes")
    for t in trials:
        d = t.user_attrs.get("details", {})
        if d.get(key) and d.get(_RATIO[key]):
            return d[key] / d[_RATIO[key]]
    return None


def plot_pareto(study: optuna.Study, path: str | Path, delivered: int | None = None) -> Path:
    """Accuracy vs the study's second objective; ``delivered``: the trial to mark as the delivered model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'autoquant[plot]'") from None
    attrs = study.user_attrs
    key, label = _AXIS[attrs.get("objective", "size")]
    higher = bool(attrs.get("higher_is_better", True))

    def x_of(t):
        return t.user_attrs.get(key, t.user_attrs.get("details", {}).get(key))

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if x_of(t) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for feasible, color, name in ((True, "tab:green", "feasible"), (False, "tab:red", "infeasible")):
        pts = [(x_of(t), t.user_attrs["accuracy"]) for t in trials if bool(t.user_attrs["feasible"]) == feasible]
        if pts:
            ax.scatter(*zip(*pts), c=color, s=22, alpha=0.7, label=f"{name} trials")
    front = sorted((x_of(t), t.user_attrs["accuracy"]) for t in pareto_trials(study, higher) if x_of(t) is not None)
    if front:
        ax.plot(*zip(*front), "k--", lw=1, marker="o", mfc="none", label="Pareto front")
    base = attrs.get("baseline_accuracy")
    chosen = [t for t in trials if t.number == delivered]
    if chosen:
        ax.scatter([x_of(chosen[0])], [chosen[0].user_attrs["accuracy"]], marker="*", s=220, c="gold",
                   edgecolors="k", zorder=5, label=f"delivered (trial {delivered})")
    fp32_x = _fp32_x(study, key, trials)
    if fp32_x and base is not None:
        ax.scatter([fp32_x], [base], marker="s", s=60, c="tab:blue", zorder=5, label="fp32 model")
    xs = [x for x in [*(x_of(t) for t in trials), fp32_x] if x]
    if xs and min(xs) > 0 and max(xs) / min(xs) > LOG_X_SPAN:
        ax.set_xscale("log")
    if base is not None:
        allowed = attrs["allowed_accuracy_drop"] * (abs(base) if attrs.get("drop_type") == "relative" else 1)
        limit = base - allowed if higher else base + allowed
        ax.axhline(base, color="tab:blue", lw=1, label="fp32")
        ax.axhspan(limit, ax.get_ylim()[1] if higher else ax.get_ylim()[0], color="tab:green", alpha=0.08,
                   label="within the allowed drop")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (eval_callback)")
    ax.set_title(f"autoquant study {study.study_name}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
