"""End to end: optimize() on the tiny task whose naive int8 loses accuracy."""

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import numpy_helper

from autoquant import optimize
from autoquant.encodings import encodings_from_model


@pytest.fixture(scope="module")
def result(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    return optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=0.01,
                    n_trials=12, output_dir=out, show_progress=False, seed=0)


def test_naive_int8_is_not_enough(result):
    first = next(t for t in result.study.trials if t.user_attrs.get("enqueued", "").startswith("onnxruntime defaults"))
    assert first.user_attrs["config"]["calibration"] == "minmax"
    assert first.user_attrs["config"]["activation_bits"] == 8 and first.user_attrs["config"]["fallback_k"] == 0
    # the demo task must make naive int8 infeasible: scored so, or pruned as clearly worse than an infeasible trial
    assert first.user_attrs.get("drop", 1.0) > 0.01 and ("drop" in first.user_attrs or first.state.name == "PRUNED")


def test_feasible_and_reported_accuracy_is_the_delivered_files(result, demo):
    assert result.feasible and result.drop <= 0.01
    assert result.baseline_accuracy == 1.0
    assert demo.evaluate(result.model_path) == result.accuracy  # re-measured on the delivered file
    trial = result.study.trials[result.trial_number]
    assert trial.user_attrs["accuracy"] == result.accuracy
    onnx.checker.check_model(onnx.load(result.model_path))
    ort.InferenceSession(result.model_path, providers=["CPUExecutionProvider"])


def test_preparation_report(result):
    prep = result.preparation
    assert prep["n_quantizable"] >= 4 and prep["warning"] is None
    assert any("shape inference" in step for step in prep["steps"])
    assert set(prep["variants"]) >= {"base", "bn_fold", "cle"}
    assert prep["float_nodes"] == {}  # every op of the demo CNN is handled by ORT's quantizer


def test_delivered_is_smallest_feasible(result):
    from autoquant.select import speed_tiers

    complete = [t for t in result.study.trials if t.state.name == "COMPLETE" and t.user_attrs["feasible"]]
    tiers = speed_tiers(complete, "default", result.fp32_size_bytes)
    best_tier = [t for t in complete if tiers[t.number] == min(tiers.values())]
    assert result.size_bytes == min(t.user_attrs["size_bytes"] for t in best_tier)
    assert result.size_bytes < result.fp32_size_bytes


def test_latency_and_bops_recorded_for_every_trial(result):
    for t in result.study.trials:
        if t.state.name == "COMPLETE":
            d = t.user_attrs["details"]
            assert d["latency_ms"] > 0 and d["latency_ratio"] > 0
            cfg = t.user_attrs["config"]
            if not (d["float_nodes"] or d["a16_nodes"] or d["w4_nodes"]):  # all MACs at the config bit widths
                act_bits = 32 if cfg["mode"] == "weight_only" else cfg["activation_bits"]  # float activations
                assert d["bops_ratio"] == pytest.approx(cfg["weight_bits"] * act_bits / 1024)
    assert result.latency_ratio is not None and "latency" in result.summary()
    # "as configured": the delivered model also timed with ORT's default threading
    assert result.latency_ratio_default_threads > 0 and "default threads" in result.summary()
    assert result.timings["trials"] > 0 and result.timings["total"] >= sum(
        v for k, v in result.timings.items() if k != "total")
    assert {"latency_ms", "latency_ratio", "bops_ratio"} <= set(result.report().columns)


def test_encodings_scales_equal_model_scales(result, tmp_path):
    from autoquant.deploy import deployment

    if result.config["mode"] == "dynamic":  # delivered by speed, which timing decides: no encodings exist for it
        assert result.encodings_path is None
    else:
        enc = json.loads(open(result.encodings_path).read())
        assert enc["version"] == "1.0.0"
        assert deployment(onnx.load(result.model_path))[1] == enc  # the delivered file's own, by float-model names
    # and, on a static (QDQ) trial's file, every Q/DQ scale bit-exactly in its encodings
    static = next(t for t in result.study.trials if t.state.name == "COMPLETE"
                  and t.user_attrs["config"]["mode"] == "static")
    path = str(Path(result.output_dir) / static.user_attrs["details"]["model_file"])
    model = onnx.load(path)
    enc = json.loads(json.dumps(encodings_from_model(model)))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    by_name = {e["name"]: e for e in enc["activation_encodings"] + enc["param_encodings"]}
    q_input = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    n_checked = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        src = q_input.get(node.input[0], node.input[0])  # an activation's DQ reads its Q's output
        name = src[: -len("_quantized")] if src.endswith("_quantized") else src
        entry = by_name[name]
        scale = inits[node.input[1]].reshape(-1)
        assert np.array_equal(np.asarray(entry["scale"], dtype=np.float32), scale)  # bit-exact
        assert entry["enc_type"] == ("PER_CHANNEL" if scale.size > 1 else "PER_TENSOR")
        for key in ("name", "dtype", "bw", "is_sym", "offset"):
            assert key in entry
        n_checked += 1
    assert n_checked > 0 and enc["param_encodings"]
    has_q = any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # none in a weight-only model
    assert bool(enc["activation_encodings"]) == has_q
    assert encodings_from_model(model) == enc


def test_report(result, tmp_path):
    df = result.report()
    assert len(df) >= 1 and (df["pareto"] | df["delivered"]).all()
    assert df.loc[df["delivered"], "trial"].tolist() == [result.trial_number]
    for col in ("calibration", "weight_bits", "activation_bits", "fallback_k", "accuracy", "size_bytes", "drop"):
        assert col in df.columns
    full = result.report(all_trials=True)
    assert len(full) == len(result.study.trials)
    path = result.save_report(tmp_path / "r.csv")
    assert len(pd.read_csv(path)) == len(full)
    out_csv = pd.read_csv(f"{result.output_dir}/report.csv")
    assert len(out_csv) == len(full)


def test_lower_is_better_and_relative(demo, tmp_path):
    """A loss metric (error rate), relative drop: feasibility follows the direction and the baseline."""
    calls = []

    def error_rate(path):
        calls.append(path)
        return 1.0 - demo.evaluate(path) + 0.05  # fp32 error 0.05

    space = {"knobs": {"calibration": "minmax", "activation_bits": [8, 16], "fallback_k": 0}}
    r = optimize(str(demo.model_path), demo.calibration_data, error_rate, allowed_accuracy_drop=0.2,
                 drop_type="relative", higher_is_better=False, search_space=space, n_trials=2,
                 output_dir=tmp_path / "o", show_progress=False)
    assert r.baseline_accuracy == pytest.approx(0.05)
    for t in r.study.trials:
        err = t.user_attrs["accuracy"]
        assert t.user_attrs["drop"] == pytest.approx((err - 0.05) / 0.05)
        assert t.user_attrs["feasible"] == (t.user_attrs["drop"] <= 0.2 + 1e-12)
    assert r.feasible and r.accuracy <= 0.05 * 1.2 + 1e-9
    assert r.study.directions[0].name == "MINIMIZE"


def test_no_feasible_trial_returns_most_accurate_with_warning(demo, tmp_path):
    space = {"knobs": {"calibration": "minmax", "weight_bits": [4, 8], "activation_bits": 8, "fallback_k": 0}}
    with pytest.warns(UserWarning, match="no trial met"):
        r = optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=0.0,
                     search_space=space, n_trials=2, output_dir=tmp_path / "o", show_progress=False)
    assert r is not None and r.feasible is False
    accs = [t.user_attrs["accuracy"] for t in r.study.trials if t.state.name == "COMPLETE"]
    assert r.accuracy == max(accs)
    assert demo.evaluate(r.model_path) == r.accuracy


def test_select_most_accurate(demo, tmp_path):
    space = {"knobs": {"calibration": "minmax", "activation_bits": [8, 16], "fallback_k": 0}}
    r = optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=1.0,
                 search_space=space, n_trials=3, output_dir=tmp_path / "o", show_progress=False,
                 select="most_accurate")
    complete = [t for t in r.study.trials if t.state.name == "COMPLETE"]
    assert r.accuracy == max(t.user_attrs["accuracy"] for t in complete)


def test_model_proto_input(demo, tmp_path):
    proto = onnx.load(str(demo.model_path))
    space = {"knobs": {"calibration": ["entropy"], "activation_bits": 16, "fallback_k": 0}}
    r = optimize(proto, demo.calibration_data, demo.evaluate, search_space=space, n_trials=1,
                 output_dir=tmp_path / "o", show_progress=False)
    assert r.feasible and demo.evaluate(r.model_path) == r.accuracy


def test_list_and_generator_calibration_data(demo, tmp_path):
    feeds = list(demo.calibration_data())
    space = {"knobs": {"calibration": "minmax", "fallback_k": 0}}
    r1 = optimize(str(demo.model_path), feeds, demo.evaluate, search_space=space, n_trials=1,
                  output_dir=tmp_path / "a", show_progress=False)
    r2 = optimize(str(demo.model_path), iter(feeds), demo.evaluate, search_space=space, n_trials=1,
                  output_dir=tmp_path / "b", show_progress=False)
    assert open(r1.model_path, "rb").read() == open(r2.model_path, "rb").read()


@pytest.mark.parametrize("objective, select, key", [("bops", "fewest_bops", "bops"),
                                                    ("latency", "fastest", "latency_ms_default_threads")])
def test_other_objectives(demo, tmp_path, objective, select, key):
    space = {"knobs": {"calibration": "minmax", "activation_bits": [8, 16], "weight_bits": [4, 8], "fallback_k": 0}}
    r = optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=1.0,
                 search_space=space, n_trials=4, output_dir=tmp_path / "o", show_progress=False, objective=objective,
                 select=select)
    complete = [t for t in r.study.trials if t.state.name == "COMPLETE"]
    for t in complete:
        assert t.values[1] == pytest.approx(t.user_attrs["details"][key])  # Optuna's second objective
    chosen = r.study.trials[r.trial_number].user_attrs["details"][key]
    assert chosen == min(t.user_attrs["details"][key] for t in complete)
    assert r.study.user_attrs["objective"] == objective


def test_report_has_the_documented_columns_and_blank_inactive_knobs(result):
    df = result.report(all_trials=True)
    assert {"enqueued", "prune_reason", "fail_reason", "float_nodes"} <= set(df.columns)
    assert df["enqueued"].notna().any()
    pruned = df[df["state"] == "PRUNED"]
    assert pruned.empty or pruned["prune_reason"].notna().all()
    for _, row in df.iterrows():
        if row["mode"] in ("dynamic", "weight_only"):  # no activation ranges: the activation knobs do not act
            assert pd.isna(row["calibration"]) and pd.isna(row["activation_bits"]) and pd.isna(row["quantize_ops"])
        if row["mode"] == "static" and row["calibration"] != "percentile":
            assert pd.isna(row["percentile"])
