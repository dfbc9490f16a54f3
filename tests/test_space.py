"""Search-space files: loading, validation, suggestions."""

import optuna
import pytest
import yaml

from autoquant import KNOBS, SearchSpace, SearchSpaceError
from autoquant.space import preset_names


def test_default_preset_covers_every_knob():
    space = SearchSpace.load("default")
    assert set(space.domains) == set(KNOBS)
    assert set(space.domains["calibration"].values) == {"minmax", "moving_average", "percentile", "entropy", "mse", "emd"}
    assert "default" in preset_names()


def test_fix_narrow_drop(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"knobs": {"weight_bits": 8, "calibration": ["minmax", "mse"],
                                              "fallback_k": {"low": 0, "high": 2}}}))
    space = SearchSpace.load(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        config = space.suggest(trial, n_fallback_nodes=5)
        study.tell(trial, 0.0)
        assert config["weight_bits"] == 8  # fixed
        assert config["activation_bits"] == 8  # dropped -> default
        assert config["calibration"] in ("minmax", "mse")  # narrowed
        assert 0 <= config["fallback_k"] <= 2
        assert set(config) == set(KNOBS)
        assert "weight_bits" not in trial.params  # fixed knobs are not sampled
        seen.add(config["calibration"])
    assert seen == {"minmax", "mse"}


def test_fallback_cap_follows_model():
    space = SearchSpace({"knobs": {"fallback_k": {"low": 0, "high": 10}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        t = study.ask()
        assert space.suggest(t, n_fallback_nodes=2)["fallback_k"] <= 2
        study.tell(t, 0.0)


def test_percentile_only_with_percentile_calibration():
    space = SearchSpace({"knobs": {"calibration": ["minmax", "percentile"], "percentile": [99.9, 99.99]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        t = study.ask()
        c = space.suggest(t, 0)
        study.tell(t, 0.0)
        assert (c["percentile"] is None) == (c["calibration"] != "percentile")


def test_json_space_file(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"knobs": {"activation_bits": [8, 16]}}')
    assert SearchSpace.load(p).domains["activation_bits"].values == (8, 16)


@pytest.mark.parametrize("spec, match", [
    ({"knobs": {"bits": 8}}, r"unknown knob\(s\) \['bits'\]; known knobs"),
    ({"knobs": {"weight_bits": 3}}, r"weight_bits.*3.*allowed values: \[4, 8, 16\]"),
    ({"knobs": {"calibration": ["minmax", "kl"]}}, r"'kl' is not allowed; allowed values"),
    ({"knobs": {"weight_symmetric": "yes"}}, r"weight_symmetric"),
    ({"knobs": {"fallback_k": {"low": 3, "high": 1}}}, r"low <= high"),
    ({"knobs": {"fallback_k": {"min": 0}}}, r"\{low: L, high: H\}"),
    ({"knobs": {"weight_bits": []}}, r"empty list"),
    ({"knobs": {"weight_bits": {"low": 4, "high": 8}}}, r"not a range"),
    ({"knob": {}}, r"unknown top-level key"),
    ({"name": "x"}, r"needs a 'knobs' mapping"),
    ({"knobs": {"activation_bits": [8, 8]}}, r"listed twice"),
])
def test_invalid_spaces(spec, match):
    with pytest.raises(SearchSpaceError, match=match):
        SearchSpace(spec)


def test_unknown_preset_lists_presets():
    with pytest.raises(SearchSpaceError, match=r"presets: \[.*'default'"):
        SearchSpace.load("no_such_space")


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("knobs: [unclosed")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        SearchSpace.load(p)


def test_baseline_params_are_ort_defaults():
    space = SearchSpace.load("default")
    p = space.baseline_params()
    assert p["calibration"] == "minmax" and p["weight_bits"] == 8 and p["activation_bits"] == 8
    assert p["weight_granularity"] == "per_tensor" and p["fallback_k"] == 0 and "percentile" not in p
