"""Repair: when every scored trial is infeasible, raise the precision of the most accurate one just enough.

After the starting points, the sampler alone may need many evals to find a feasible config on a model
where int8 everywhere is slightly too lossy (PP-OCR: drop 0.0148 against a limit of 0.01). Peers then
revert layers to float one eval at a time (NNCF: one full eval per reverted group). We instead use
what the study already measured, with builds and output SQNR only (no user eval):

1. the most accurate trial's drop ``d`` and output SQNR ``s``;
2. the SQNR the fix needs: ``log10(drop)`` falls linearly with SQNR, ``s_req = s + m·log10(d / (TARGET_SHARE ·
   allowed))``, with ``m`` dB per decade fitted on the study's scored trials (bounded to 10–40), or 20 (drop
   following the output noise amplitude) until two trials with a clear drop exist;
3. along a precision ladder of the space (``fallback_k``: the k most sensitive nodes in float, then
   ``a16_k``: 16-bit activations), bisection for the smallest k whose screened SQNR reaches ``s_req``
   (the ladder's top when none does);
4. that config is enqueued; its trial (one full eval) reuses the screened build.

If the repaired trial is still infeasible it becomes the new most accurate trial and the next repair
starts from it with one more measured point, so the steps shrink like a secant method. Each trial is
repaired at most once: when the most accurate trial was repaired already, the next most accurate one is,
if its drop is within CLOSE_TO_BEST times the most accurate one's. Once a repair is feasible, and the search goes on (no ``stop_when_feasible``),
its ladder step is trimmed by bisection with full evals, down to the cheapest feasible step. When
nothing is left to raise or trim, the sampler goes on as usual. Optuna has no such
step (its samplers see trials, not the model), hence this module.

Limits: single-node sensitivity is not additive. On PP-OCR rec (percentile activations) keeping only
its third most sensitive node, an early Conv, float lowered the output SQNR from 11.0 to 9.2 dB and the
accuracy from 0.960 to 0.918 (experiments/fallback_additivity.py), so the bisection's "SQNR grows with
k" may not hold; trims are therefore decided by full evals and never pruned by SQNR.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from .cost import NOT_SLOWER_THAN_FP32
from .objective import DETAILS, NO_PRUNE, Objective
from .scope import NARROWING
from .select import COMPRESSED, not_slower_than_fp32

#: aim the repaired trial at this share of the allowed drop (a margin for the SQNR -> accuracy model)
TARGET_SHARE = 0.7
#: user attributes of enqueued repair / trim trials: the trial repaired / trimmed, the knob moved
REPAIR_OF = "repair_of"
TRIM_OF = "trim_of"
REPAIR_KNOB = "repair_knob"
#: precision ladders, tried in this order: a narrower scope first (fewer Q/DQ: more accurate and usually faster),
#: then float fallback (ORT CPU runs float nodes at full speed), then 16-bit activations (extra Q/DQ work)
LADDERS = (("quantize_ops", "narrower quantization scope"), ("fallback_k", "most sensitive nodes in float"),
           ("a16_k", "next most sensitive nodes at 16-bit activations"))


#: trials repaired after the most accurate one: those whose drop is at most this multiple of its drop
CLOSE_TO_BEST = 1.5
#: a repair step whose file is above this fraction of fp32's is a float model with Q/DQ around it, not a repair
NOT_A_COMPRESSION = 0.95
#: dB of output SQNR per decade of accuracy drop, before the study can fit it, and the fit's bounds
DEFAULT_DB_PER_DECADE = 20.0
DB_PER_DECADE_BOUNDS = (10.0, 40.0)


def db_per_decade(points: list[tuple[float, float]], allowed: float) -> float:
    """Fit ``log10(drop) = a - sqnr / m`` over (SQNR, drop) of scored trials and return ``m``. Drops within
    a tenth of the allowed one are left out (there the metric's own noise decides); with fewer than two
    points, or SQNRs less than 1 dB apart, or a fit that does not fall with SQNR: DEFAULT_DB_PER_DECADE."""
    pts = [(s, math.log10(d)) for s, d in points if math.isfinite(s) and d > max(0.1 * allowed, 1e-12)]
    if len(pts) < 2 or max(s for s, _ in pts) - min(s for s, _ in pts) < 1.0:
        return DEFAULT_DB_PER_DECADE
    slope = float(np.polyfit([s for s, _ in pts], [d for _, d in pts], 1)[0])  # decades per dB
    if slope >= 0:
        return DEFAULT_DB_PER_DECADE
    return float(np.clip(-1.0 / slope, *DB_PER_DECADE_BOUNDS))


def required_sqnr(sqnr: float, drop: float, allowed: float, per_decade: float = DEFAULT_DB_PER_DECADE) -> float:
    """Output SQNR (dB) at which a trial with this ``drop`` at ``sqnr`` would drop TARGET_SHARE·allowed."""
    target = TARGET_SHARE * allowed
    if target <= 0:
        return math.inf
    return sqnr + per_decade * math.log10(max(drop, target) / target)


def ladder(domain, n_nodes: int, current: int) -> list[int]:
    """The knob's values above ``current`` that the space's domain contains: a list's values, or a range's powers
    of two (and its top). Steps past the number of nodes change nothing, so only the first value that reaches
    ``n_nodes`` is kept; every value returned is legal for the domain (a model with 15 nodes and the list
    0, 1, 2, 4, 8, 16, 32 gets 16, never 15)."""
    if domain is None or domain.fixed:
        return []
    if domain.values is not None:
        values = sorted(int(v) for v in domain.values)
    else:
        top = min(int(domain.high), max(n_nodes, int(domain.low)))
        values = sorted({*(2 ** i for i in range(max(top, 1).bit_length())), top})
        values = [v for v in values if domain.low <= v <= top]
    reach = [v for v in values if v >= n_nodes]
    values = [v for v in values if v < n_nodes] + reach[:1]
    return [v for v in values if v > current]


def scope_ladder(domain, current) -> list[str]:
    """quantize_ops values of the space narrower than ``current`` (autoquant.scope.NARROWING): fewer op types
    quantized, more arithmetic float; usually more accurate and, on ORT CPU, often faster."""
    if domain is None or domain.fixed or current not in NARROWING or domain.values is None:
        return []
    return [v for v in NARROWING[NARROWING.index(current) + 1:] if v in domain.values]


def deliverable_fast(study: optuna.Study, objective: Objective, t) -> bool:
    """Deliverable as fast: not slower than fp32 and compressed, as the delivery rule judges it
    (autoquant.select.not_slower_than_fp32; always True without a latency meter)."""
    return objective.latency is None or not_slower_than_fp32(t, objective.latency.threading,
                                                             int(study.user_attrs.get("fp32_size_bytes", 0)))


def _repair_candidates(study: optuna.Study, objective: Objective) -> list[optuna.trial.FrozenTrial]:
    """The trials to repair, most accurate first: none once a feasible trial is not slower than fp32 (nothing to
    repair). Else the trials not slower than fp32 (a repair keeps what makes it fast), or all trials when none
    is."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete or any(t.user_attrs.get("feasible") and deliverable_fast(study, objective, t)
                           for t in complete):
        return []
    candidates = [t for t in complete
                  if deliverable_fast(study, objective, t) and not t.user_attrs.get("feasible")]
    if not candidates:
        if any(t.user_attrs.get("feasible") for t in complete):
            return []  # feasible but slower, and nothing fast to repair: raising precision makes it no faster
        candidates = complete
    return sorted(candidates, key=lambda t: (objective.scoring.drop(t.user_attrs["accuracy"]), t.number))


def repair_point(study: optuna.Study, objective: Objective) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """(label, Optuna params, user attributes) of the next trial to enqueue, or None.

    - a repair made a trial feasible: the next step of the trim (bisection, with full evals, between the
      highest infeasible and the lowest feasible step of its ladder seen so far);
    - nothing is feasible: the repair of the most accurate trial.

    None when there is nothing to trim, a feasible trial exists, nothing was scored, every candidate was
    repaired already, SQNR screening is off (``prune=False`` and no subset callback), or no ladder can
    raise its precision."""
    if objective.pruner is None:
        return None
    trim = _trim_point(study, objective)
    if trim is not None:
        return trim
    trials = study.get_trials(deepcopy=False)
    repaired = objective.repair_tried | {t.user_attrs[REPAIR_OF] for t in trials if REPAIR_OF in t.user_attrs}
    candidates = _repair_candidates(study, objective)
    closest = objective.scoring.drop(candidates[0].user_attrs["accuracy"]) if candidates else 0.0
    for best in candidates:
        # the most accurate trial not repaired yet, among those about as close to the limit as the most accurate
        # one: when a repair came out a little less accurate than its trial (a narrower scope on silero-vad:
        # drop 0.0117 vs 0.0113), that repair is next, on the next ladder; a trial far behind is not worth an eval
        if objective.scoring.drop(best.user_attrs["accuracy"]) > CLOSE_TO_BEST * max(closest, 0.0):
            break
        if best.number not in repaired:
            objective.repair_tried.add(best.number)
            point = _repair(study, objective, best, trials)
            if point is not None:
                return point
    return None


def _repair(study: optuna.Study, objective: Objective, best, trials) -> tuple[str, dict, dict] | None:
    """The repair of trial ``best``: the first ladder with a step that raises its SQNR (see the module)."""
    details = best.user_attrs[DETAILS]
    sqnr = details.get("sqnr_db")
    if sqnr is None:
        sqnr = objective.pruner.sqnr(objective.output_dir / details["model_file"])
    drop = objective.scoring.drop(best.user_attrs["accuracy"])
    allowed = objective.scoring.allowed_drop
    scored = [(t.user_attrs[DETAILS]["sqnr_db"], objective.scoring.drop(t.user_attrs["accuracy"]))
              for t in trials if t.state == TrialState.COMPLETE
              and t.user_attrs[DETAILS].get("sqnr_db") is not None and "reused_from" not in t.user_attrs[DETAILS]]
    per_decade = db_per_decade([*scored, (sqnr, drop)], allowed)
    need = required_sqnr(sqnr, drop, allowed, per_decade)
    screen_dir = objective.trial_dir / "screen"
    screen_dir.mkdir(parents=True, exist_ok=True)
    keep_fast = objective.latency is not None and deliverable_fast(study, objective, best)
    for knob, what in LADDERS:
        if knob not in best.params:  # fixed by the space, or not active for this config (a16_k: 8-bit acts only)
            continue
        if knob == "quantize_ops":
            steps = scope_ladder(objective.space.domains.get(knob), best.params[knob])
        else:
            steps = ladder(objective.space.domains.get(knob), objective.n_compute_nodes, int(best.params[knob]))
        if not steps:
            continue
        found = _bisect(objective, best, knob, steps, need, screen_dir, keep_fast,
                        int(study.user_attrs.get("fp32_size_bytes", 0)))
        if found is None or found[1] <= sqnr:
            continue  # this ladder does not raise the SQNR: try the next one
        k, got, params = found
        label = (f"repair of trial {best.number}: {_step_words(knob, k, what)} (screened SQNR {got:.1f} dB; "
                 f"{need:.1f} dB estimated for drop <= {TARGET_SHARE:g} x allowed at {per_decade:.0f} dB/decade)")
        return label, params, {REPAIR_OF: best.number, REPAIR_KNOB: knob, "screen_sqnr_db": got}
    return None


def _step_words(knob: str, value, what: str) -> str:
    return f"quantize_ops={value}" if knob == "quantize_ops" else f"its {value} {what}"


def _trim_point(study: optuna.Study, objective: Objective) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """After a repair made a trial feasible, its ladder step may be more than needed (the SQNR model is
    rough): bisect the ladder steps between the highest infeasible and the lowest feasible step of that
    config family, one full eval per step, so it ends at the cheapest feasible step in about log2(steps)
    evals (NNCF reverts one group per eval)."""
    trials = study.get_trials(deepcopy=False)
    repairs = [t for t in trials if REPAIR_OF in t.user_attrs and t.state == TrialState.COMPLETE
               and t.user_attrs.get("feasible")]
    for rep in reversed(repairs):
        knob = rep.user_attrs[REPAIR_KNOB]
        if knob == "quantize_ops":
            continue  # a scope is not trimmed: the narrower one is both the more accurate and the faster
        family = _without(rep.params, knob)
        feasible: dict[int, bool] = {}  # step -> feasible (PRUNED: judged hopeless = not feasible)
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and knob in t.params and \
                    _without(t.params, knob) == family:
                k = int(t.params[knob])
                feasible[k] = feasible.get(k, False) or bool(t.state == TrialState.COMPLETE and t.user_attrs["feasible"])
        hi = min(k for k, ok in feasible.items() if ok)
        lo = max((k for k, ok in feasible.items() if not ok and k < hi), default=-1)
        steps = [v for v in ladder(objective.space.domains.get(knob), objective.n_compute_nodes, lo) if v < hi]
        if not steps:
            continue
        k = steps[len(steps) // 2]
        label = (f"trim of repair trial {rep.number}: {knob}={k} (so far {knob}={hi} is feasible"
                 + ("" if lo < 0 else f", {knob}={lo} is not") + ")")
        # no SQNR pruning: on PP-OCR, fewer float nodes gave a lower SQNR than no float node at all, yet
        # the question here is feasibility, which only the full eval answers
        return label, {**rep.params, knob: k}, {TRIM_OF: rep.number, REPAIR_KNOB: knob, NO_PRUNE: True}
    return None


def _without(params: dict[str, Any], knob: str) -> dict[str, Any]:
    """A trial's params except ``knob``: the config family a ladder moves in."""
    return {k: v for k, v in params.items() if k != knob}


def _bisect(objective: Objective, best, knob: str, steps: list, need: float, screen_dir, keep_fast: bool = False,
            fp32_size: int = 0):
    """The cheapest useful step: (step, SQNR, params), or None when no step builds.

    Along the ladder SQNR grows, and so do size and (mostly) latency. A step is *useful* when its build is
    still a compression ("every node float" never is: file <= NOT_A_COMPRESSION x fp32's) and, with
    ``keep_fast``, a deliverable-fast one (<= COMPRESSED x fp32's, at fp32's latency or below). The top useful
    step is found by bisection on that, then the smallest useful step whose screened SQNR reaches ``need``
    (the top useful step when none does).
    Builds of steps not chosen are deleted."""
    scored: dict[int, tuple[float | None, dict, dict, Path]] = {}

    def screen(i: int) -> float | None:
        if i not in scored:
            params = {**best.params, knob: steps[i]}
            config = objective.space.suggest(optuna.trial.FixedTrial(params), objective.n_compute_nodes)
            path = screen_dir / f"repair-{best.number}-{knob}-{steps[i]}.onnx"
            scored[i] = (objective.screen_config(config, path), params, config, path)
        return scored[i][0]

    def useful(i: int) -> bool:
        if screen(i) is None:
            return False
        _, _, config, path = scored[i]
        limit = (COMPRESSED if keep_fast else NOT_A_COMPRESSION) * fp32_size
        small = fp32_size <= 0 or not path.exists() or path.stat().st_size <= limit
        ratio = objective.screened_ratio(config)
        return small and (not keep_fast or ratio is None or ratio <= NOT_SLOWER_THAN_FP32)

    top = _last_true(len(steps), useful)
    if top is None:
        for _, _, config, _ in scored.values():
            objective.forget_screened(config)
        return None
    first = _last_true(top + 1, lambda i: not (screen(i) is not None and screen(i) >= need), default=-1) + 1
    chosen = min(first, top)
    for i, (_, _, config, _) in scored.items():
        if i != chosen:
            objective.forget_screened(config)
    got, params, _, _ = scored[chosen]
    return steps[chosen], got, params


def _last_true(n: int, pred, default=None):
    """The largest i < n with pred(i), for a pred that is True up to some index then False (bisection)."""
    lo, hi, found = 0, n - 1, default
    while lo <= hi:
        mid = (lo + hi) // 2
        if pred(mid):
            found, lo = mid, mid + 1
        else:
            hi = mid - 1
    return found
