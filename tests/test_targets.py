"""Deployment targets: each preset's restrictions hold in every model it builds, and its file is written."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from optuna.trial import TrialState

from autoquant import ConfigError, SearchSpaceError, optimize
from autoquant.space import SearchSpace

SIGNED = {TensorProto.INT8, TensorProto.INT4, TensorProto.INT16}


def built_models(result):
    for t in result.study.trials:
        if t.state == TrialState.COMPLETE:
            yield t, onnx.load(f"{result.output_dir}/{t.user_attrs['details']['model_file']}")


def qparams(model):
    """(tensor, is_weight, zero-point type, zero points, n scales) for every Q/DQ node."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3:
            continue
        zp = inits[n.input[2]]
        is_weight = n.input[0] in inits and n.op_type == "DequantizeLinear"
        if is_weight and inits[n.input[0]].data_type == TensorProto.INT32:
            continue  # int32 biases follow the input and weight scales
        yield (n.input[0], is_weight, zp.data_type, numpy_helper.to_array(zp).reshape(-1),
               numpy_helper.to_array(inits[n.input[1]]).size)


def run(demo, tmp_path, target, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=0.05,
                        n_trials=5, output_dir=tmp_path / target, show_progress=False, target=target, **kw)


def test_tensorrt(demo, tmp_path):
    r = run(demo, tmp_path, "tensorrt")
    for _, model in built_models(r):
        for name, is_weight, ztype, zps, n_scales in qparams(model):
            assert ztype == TensorProto.INT8 and not zps.any(), name  # symmetric int8 everywhere
            if is_weight and name.endswith(".w_quantized"):
                assert n_scales > 1, name  # per-channel weights
    cache = open(r.export_path).read().splitlines()
    assert cache[0].startswith("TRT-") and len(cache) > 3 and r.export_path.endswith(".trt-calib.cache")


def test_ncnn(demo, tmp_path):
    r = run(demo, tmp_path, "ncnn")
    for _, model in built_models(r):
        for name, is_weight, ztype, zps, n_scales in qparams(model):
            assert ztype == TensorProto.INT8 and not zps.any()
            if is_weight and name.endswith(".w_quantized"):
                assert n_scales > 1
    table = open(r.export_path).read()
    model = onnx.load(r.model_path)
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dq_out]
    assert quantized and all(f"{name}_param_0 " in table for name in quantized)


def test_qnn_htp(demo, tmp_path):
    r = run(demo, tmp_path, "qnn_htp")
    for t, model in built_models(r):
        for name, is_weight, ztype, zps, n_scales in qparams(model):
            if is_weight:
                assert ztype in (TensorProto.INT8, TensorProto.INT4) and not zps.any()
                if name.endswith(".w_quantized"):
                    assert n_scales > 1
            else:
                assert ztype in (TensorProto.UINT8, TensorProto.UINT16)  # affine unsigned activations
    assert r.export_path.endswith(".encodings.json")


def test_ort_cpu(demo, tmp_path):
    r = run(demo, tmp_path, "ort_cpu")
    for _, model in built_models(r):
        for name, is_weight, ztype, zps, n_scales in qparams(model):
            assert ztype == (TensorProto.INT8 if is_weight else TensorProto.UINT8)
            if is_weight:
                assert not zps.any()
    assert r.export_path is None


def test_user_space_restricted_to_target(demo, tmp_path):
    space = {"knobs": {"activation_symmetric": [False, True], "calibration": ["minmax", "mse"], "fallback_k": 0}}
    r = run(demo, tmp_path, "tensorrt", search_space=space)
    assert r.study.user_attrs["search_space"]["knobs"]["activation_symmetric"] == [True]
    assert all(t.user_attrs["config"]["calibration"] in ("minmax", "mse") for t, _ in built_models(r))
    with pytest.raises(SearchSpaceError, match="activation_symmetric.*tensorrt"):
        SearchSpace({"knobs": {"activation_symmetric": False}}).restricted_to(SearchSpace.load("tensorrt"))


def test_unknown_target(demo, tmp_path):
    with pytest.raises(ConfigError, match="target must be None or one of"):
        run(demo, tmp_path, "tpu")
    assert not (tmp_path / "tpu").exists()
