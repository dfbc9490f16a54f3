"""Search-space files (YAML / JSON / dict) -> validated knobs -> Optuna suggestions.

One trial = one full quantization config: a dict with a value for every knob in KNOBS.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml

from . import scope
from .errors import SearchSpaceError
from .formats import FORMATS
from .observers import OBSERVERS


@dataclass(frozen=True)
class Knob:
    kind: str  # "choice" | "int" | "float"
    default: Any
    allowed: tuple | None = None  # for "choice"
    bounds: tuple | None = None  # inclusive (low, high) limits a range may use
    doc: str = ""


KNOBS: dict[str, Knob] = {
    "mode": Knob("choice", "static", ("static", "dynamic", "weight_only"),
                 doc="static QDQ; dynamic (ORT quantize_dynamic); weight_only (float activations)"),
    # not ORT's default ("all"): quantizing elementwise arithmetic is the common cause of both accuracy loss
    # and slow models (autoquant.scope); a space that drops the knob gets the fast recipe
    "quantize_ops": Knob("choice", "compute", tuple(scope.SCOPES),
                         doc="op types that get Q/DQ: compute, compute_and_movement, all, or an op-type list"),
    "calibration": Knob("choice", "minmax", tuple(OBSERVERS), doc="activation range method"),
    "percentile": Knob("float", 99.999, bounds=(90.0, 100.0), doc="percentile of |x| (calibration=percentile)"),
    "weight_granularity": Knob("choice", "per_tensor", ("per_tensor", "per_channel")),
    "weight_symmetric": Knob("choice", True, (True, False)),
    "activation_symmetric": Knob("choice", False, (True, False)),
    "weight_bits": Knob("choice", 8, (4, 8, 16)),
    "activation_bits": Knob("choice", 8, (8, 16)),
    "weight_rounding": Knob("choice", "nearest_even", ("nearest_even", "nearest_away", "adaround")),
    "cle": Knob("choice", False, (False, True), doc="cross-layer equalization (folds BatchNorm first)"),
    "bn_fold": Knob("choice", True, (True, False), doc="fold BatchNormalization into Conv/Gemm (cle=false)"),
    "bias_correction": Knob("choice", False, (False, True), doc="empirical bias correction after quantization"),
    "fallback_k": Knob("int", 0, bounds=(0, 1000), doc="k most sensitive compute nodes kept in float"),
    "a16_k": Knob("int", 0, bounds=(0, 1000), doc="next k most sensitive nodes get 16-bit activations"),
    "w4_fraction": Knob("float", 0.0, bounds=(0.0, 1.0), doc="least sensitive fraction of weights at 4 bits"),
}

#: Knobs that only act under a condition on knobs before them: (condition, value when it does not hold).
#: Optuna does not sample them then, so its model of the space stays honest.
_STATIC = (lambda c: c["mode"] == "static")
CONDITIONAL: dict[str, tuple[Callable[[dict], bool], Any]] = {
    "quantize_ops": (_STATIC, None),  # dynamic / weight-only quantize weights of their own op types
    "calibration": (_STATIC, "minmax"),  # activation knobs: only static quantization has activation ranges
    "percentile": (lambda c: c["mode"] == "static" and c["calibration"] == "percentile", None),
    "activation_symmetric": (_STATIC, False),
    "activation_bits": (_STATIC, 8),
    "weight_bits": (lambda c: c["mode"] != "dynamic", 8),  # ORT's dynamic kernels are int8
    "weight_rounding": (lambda c: c["mode"] != "dynamic", "nearest_even"),  # ORT rounds dynamic weights itself
    "bias_correction": (_STATIC, False),
    "bn_fold": (lambda c: not c["cle"], True),  # CLE needs Conv->Relu->Conv adjacency: it always folds BN
    "a16_k": (lambda c: c["mode"] == "static" and c["activation_bits"] == 8, 0),
    "w4_fraction": (lambda c: c["mode"] != "dynamic" and c["weight_bits"] == 8, 0.0),
}

#: Common configurations tried first (projected into the space; knobs a space fixes keep its value),
#: so a feasible model is usually found within the first few evals. None needs the per-node sensitivity
#: ranking: float fallback comes from the repair (autoquant.repair), aimed by SQNR, and the ranking is
#: measured only when a trial first needs it (most models never pay for it).
STARTING_POINTS: list[tuple[str, dict[str, Any]]] = [
    ("onnxruntime defaults: every op type ORT quantizes, minmax, per-tensor, int8, no fallback",
     {"quantize_ops": "all"}),
    ("compute-only int8 (Conv / MatMul / Gemm / Gather), per-channel weights: the fast ORT CPU recipe",
     {"quantize_ops": "compute", "weight_granularity": "per_channel"}),
    ("tensorrt-style: compute ops, symmetric per-channel weights, symmetric entropy activations",
     {"quantize_ops": "compute", "weight_granularity": "per_channel", "activation_symmetric": True,
      "calibration": "entropy"}),
    ("compute and data-movement ops in int8, per-channel weights, percentile activations",
     {"quantize_ops": "compute_and_movement", "weight_granularity": "per_channel", "calibration": "percentile",
      "percentile": 99.99}),
    ("cross-layer equalization, compute ops, per-channel",
     {"quantize_ops": "compute", "weight_granularity": "per_channel", "cle": True}),
    ("onnxruntime dynamic quantization (Transformer / LSTM style): per-channel int8 weights",
     {"mode": "dynamic", "weight_granularity": "per_channel"}),
]
TOP_LEVEL_KEYS = {"name", "description", "knobs", "target"}
#: what a target preset's `target:` section may set: ORT quantizer options for how the QDQ model is
#: written, and an export written next to the delivered model
TARGET_KEYS = {"runtime", "extra_options", "export"}
WRITER_OPTIONS = {"AddQDQPairToWeight", "DedicatedQDQPair", "QDQKeepRemovableActivations", "MinimumRealRange",
                  "ActivationRestrictedAsymmetric", "QDQDisableWeightAdjustForInt32Bias"}
EXPORTS = tuple(FORMATS)


@dataclass(frozen=True)
class Domain:
    """What a space does with one knob: fixed value, choices, or a numeric range."""

    values: tuple | None = None  # choices (a single one means fixed)
    low: float | None = None
    high: float | None = None

    @property
    def fixed(self) -> bool:
        return self.values is not None and len(self.values) == 1 or (self.low is not None and self.low == self.high)

    def to_json(self) -> Any:
        return list(self.values) if self.values is not None else {"low": self.low, "high": self.high}


#: characters of user data an error message quotes at most (a YAML alias bomb expands to millions)
MAX_QUOTED = 400


def _short(text: str, limit: int = MAX_QUOTED) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]} ... [{len(text) - limit} characters] ... {text[-limit // 2:]}"


def _err(name: str, msg: str) -> SearchSpaceError:
    return SearchSpaceError(f"search space {_short(str(name), 200)}: {_short(msg)}")


def _domain(space_name: str, key: str, spec: Any) -> Domain:
    knob = KNOBS[key]
    if isinstance(spec, dict):
        if set(spec) - {"low", "high"} or not {"low", "high"} <= set(spec):
            raise _err(space_name, f"knob {key!r}: a range is written {{low: L, high: H}}, got {spec}")
        if knob.kind == "choice":
            raise _err(space_name, f"knob {key!r} takes a value or a list from {list(knob.allowed)}, not a range")
        low, high = spec["low"], spec["high"]
        for v in (low, high):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _err(space_name, f"knob {key!r}: range bounds must be finite numbers, got {spec}")
        if knob.kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise _err(space_name, f"knob {key!r} is an integer knob; bounds must be integers, got {spec}")
        if not knob.bounds[0] <= low <= high <= knob.bounds[1]:
            raise _err(space_name, f"knob {key!r}: need {knob.bounds[0]} <= low <= high <= {knob.bounds[1]}, got {spec}")
        cast = int if knob.kind == "int" else float
        return Domain(low=cast(low), high=cast(high))
    values = spec if isinstance(spec, list) else [spec]
    if not values:
        raise _err(space_name, f"knob {key!r} has an empty list; give at least one value or drop the knob")
    out = []
    for v in values:
        if key == "quantize_ops":  # a scope name or an op-type list (autoquant.scope)
            try:
                v = scope.normalize(v)
            except ValueError as exc:
                raise _err(space_name, f"knob 'quantize_ops': {exc}") from None
        elif knob.kind == "choice":
            if v not in knob.allowed or isinstance(v, bool) != isinstance(knob.allowed[0], bool):
                raise _err(space_name, f"knob {key!r}: value {v!r} is not allowed; allowed values: {list(knob.allowed)}")
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not knob.bounds[0] <= v <= knob.bounds[1]:
                raise _err(space_name, f"knob {key!r}: value {v!r} must be a number in [{knob.bounds[0]}, {knob.bounds[1]}]")
            if knob.kind == "int" and not float(v).is_integer():
                raise _err(space_name, f"knob {key!r}: value {v!r} must be an integer")
            v = int(v) if knob.kind == "int" else float(v)
        if v in out:
            raise _err(space_name, f"knob {key!r}: value {v!r} is listed twice")
        out.append(v)
    return Domain(values=tuple(out))


class SearchSpace:
    """A validated space. ``suggest(trial)`` returns a full config; dropped knobs take their default."""

    def __init__(self, spec: dict, name: str = "<dict>"):
        if not isinstance(spec, dict):
            raise _err(name, f"must be a mapping with a 'knobs' section, got {type(spec).__name__}")
        unknown = set(spec) - TOP_LEVEL_KEYS
        if unknown:
            raise _err(name, f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_LEVEL_KEYS)}")
        knobs = spec.get("knobs")
        if not isinstance(knobs, dict):
            raise _err(name, "needs a 'knobs' mapping of knob name -> value, list of values, or {low, high}")
        bad = sorted(set(knobs) - set(KNOBS))
        if bad:
            raise _err(name, f"unknown knob(s) {bad}; known knobs: {sorted(KNOBS)}")
        self.name = spec.get("name", name)
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 200:
            raise _err(name, f"'name' must be a non-empty string of at most 200 characters, got "
                             f"{type(self.name).__name__} of length {len(str(self.name))}")
        self.target = _target(name, spec.get("target") or {})
        self.domains: dict[str, Domain] = {k: _domain(name, k, v) for k, v in knobs.items()}
        self._check_consistent(name)

    def _check_consistent(self, name: str) -> None:
        """Knobs that can never take effect are a mistake in the file, not something to ignore."""
        def possible(knob: str) -> tuple:
            dom = self.domains.get(knob)
            return (KNOBS[knob].default,) if dom is None else (dom.values or ())

        if "percentile" in self.domains and "percentile" not in possible("calibration"):
            raise _err(name, "knob 'percentile' is set but 'calibration' never takes 'percentile'; add percentile "
                             "to calibration or drop the percentile knob")
        if False in possible("bn_fold") and "bn_fold" in self.domains and False not in possible("cle"):
            raise _err(name, "knob 'bn_fold' allows false but 'cle' is always true (CLE always folds BatchNorm); "
                             "drop bn_fold or allow cle: false")

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, space: "str | Path | dict | SearchSpace") -> "SearchSpace":
        if isinstance(space, SearchSpace):
            return space
        if isinstance(space, dict):
            return cls(space)
        if not isinstance(space, (str, Path)):
            raise SearchSpaceError(
                f"search_space must be a preset name, a path to a .yaml/.json file or a dict, got {type(space).__name__}"
            )
        if not str(space).strip():
            raise SearchSpaceError(
                f"search_space is an empty string; pass a preset name (presets: {preset_names()}), a .yaml/.json "
                "path or a dict"
            )
        path = Path(space)
        if path.is_dir():
            raise SearchSpaceError(f"search space path {path} is a directory, not a .yaml/.json file")
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
            if not path.is_file():
                raise SearchSpaceError(f"search space file {path} does not exist")
            return cls(_parse(path.read_text(), str(path)), str(path))
        name = str(space)
        available = preset_names()
        if name not in available:
            raise SearchSpaceError(f"unknown search space {name!r}; presets: {available}, or pass a file path or dict")
        text = _spaces_folder().joinpath(f"{name}.yaml").read_text()
        return cls(_parse(text, name), name)

    # -- Optuna ------------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial, n_fallback_nodes: int) -> dict[str, Any]:
        config: dict[str, Any] = {}
        for key, knob in KNOBS.items():
            if key in CONDITIONAL and not CONDITIONAL[key][0](config):
                config[key] = CONDITIONAL[key][1]
                continue
            dom = self.domains.get(key)
            if dom is None:
                config[key] = knob.default
            elif dom.fixed:
                config[key] = dom.values[0] if dom.values is not None else dom.low
            elif dom.values is not None:
                config[key] = trial.suggest_categorical(key, list(dom.values))
            elif knob.kind == "int":
                high = min(int(dom.high), n_fallback_nodes) if key in ("fallback_k", "a16_k") else int(dom.high)
                config[key] = trial.suggest_int(key, int(dom.low), max(int(dom.low), high))
            else:
                config[key] = trial.suggest_float(key, dom.low, dom.high)
        return config

    def starting_points(self) -> list[tuple[str, dict[str, Any]]]:
        """STARTING_POINTS as Optuna params of this space: each knob takes the point's value if the
        space allows it, else its default if allowed, else its first choice. Duplicates dropped."""
        out: list[tuple[str, dict[str, Any]]] = []
        for label, point in STARTING_POINTS:
            params = self._project({**{k: knob.default for k, knob in KNOBS.items()}, **point})
            if all(params != p for _, p in out):
                out.append((label, params))
        return out

    def baseline_params(self) -> dict[str, Any]:
        """Optuna params of ORT's defaults (minmax, per-tensor, 8/8, no fallback) projected into this space."""
        return self.starting_points()[0][1]

    def _project(self, wanted: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        chosen: dict[str, Any] = {}
        for key, knob in KNOBS.items():
            dom = self.domains.get(key)
            if key in CONDITIONAL and not CONDITIONAL[key][0](chosen):
                chosen[key] = CONDITIONAL[key][1]
                continue
            if dom is None or dom.fixed:
                chosen[key] = knob.default if dom is None else (dom.values[0] if dom.values is not None else dom.low)
                continue
            want = wanted[key] if wanted[key] is not None else knob.default
            if dom.values is not None:
                value = want if want in dom.values else knob.default if knob.default in dom.values else dom.values[0]
            else:
                value = min(max(want, dom.low), dom.high)
            params[key] = chosen[key] = value
        return params

    def to_json(self) -> dict:
        out = {"name": self.name, "knobs": {k: d.to_json() for k, d in sorted(self.domains.items())}}
        if self.target:
            out["target"] = self.target
        return out

    def restricted_to(self, target: "SearchSpace") -> "SearchSpace":
        """This space within a target preset's limits: each knob keeps only the values the target allows
        (a knob this space drops takes the target's domain). Empty intersections are an error."""
        knobs = {k: d.to_json() for k, d in self.domains.items()}
        for key, tdom in target.domains.items():
            mine = self.domains.get(key)
            if mine is None:
                knobs[key] = tdom.to_json()
                continue
            if tdom.values is not None and mine.values is not None:
                both = [v for v in mine.values if v in tdom.values]
            elif tdom.values is not None:  # my range, the target's choices
                both = [v for v in tdom.values if mine.low <= v <= mine.high]
            elif mine.values is not None:
                both = [v for v in mine.values if tdom.low <= v <= tdom.high]
            else:
                low, high = max(mine.low, tdom.low), min(mine.high, tdom.high)
                both = {"low": low, "high": high} if low <= high else []
            if not both:
                raise SearchSpaceError(f"search space {self.name}: knob {key!r} allows {mine.to_json()}, target "
                                       f"{target.name!r} only {tdom.to_json()}: no value satisfies both")
            knobs[key] = both
        calibration = knobs.get("calibration", [KNOBS["calibration"].default])
        if "percentile" not in (calibration if isinstance(calibration, list) else [calibration]):
            knobs.pop("percentile", None)  # cannot take effect any more
        return SearchSpace({"name": f"{self.name}@{target.name}", "knobs": knobs, "target": target.target})

    def fingerprint(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def _target(name: str, spec: Any) -> dict:
    if not isinstance(spec, dict) or set(spec) - TARGET_KEYS:
        raise _err(name, f"'target' must be a mapping with keys from {sorted(TARGET_KEYS)}, got {spec!r}")
    extra = spec.get("extra_options") or {}
    if not isinstance(extra, dict) or set(extra) - WRITER_OPTIONS:
        raise _err(name, f"target extra_options may set {sorted(WRITER_OPTIONS)}, got {extra!r}")
    if spec.get("export") not in (None, *EXPORTS):
        raise _err(name, f"target export must be one of {list(EXPORTS)}, got {spec.get('export')!r}")
    return dict(spec)


def _parse(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"search space {where} is not valid YAML/JSON: {exc}") from None
    return data


def _spaces_folder():
    """search_spaces/ shipped in the package, or beside it when running from a source checkout."""
    try:
        return resources.files("autoquant.search_spaces")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "search_spaces"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _spaces_folder().iterdir() if p.name.endswith(".yaml"))
