import numpy as np
import pytest

from autoquant.demo import DemoTask


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoTask:
    """The bundled tiny task: naive int8 (minmax, per-tensor) loses ~5 points of top-1 agreement."""
    return DemoTask(tmp_path_factory.mktemp("demo"))


BASE_CONFIG = {
    "calibration": "minmax", "percentile": None, "weight_granularity": "per_tensor", "weight_symmetric": True,
    "activation_symmetric": False, "weight_bits": 8, "activation_bits": 8, "weight_rounding": "nearest_even",
    "fallback_k": 0,
}


@pytest.fixture
def base_config() -> dict:
    return dict(BASE_CONFIG)


@pytest.fixture(scope="session")
def prepared_demo(demo, tmp_path_factory):
    """Prepared model + statistics of the demo task (shared by build-level tests)."""
    from autoquant.data import CalibrationSource
    from autoquant.model import float_activation_tensors, load_model, prepare_model
    from autoquant.stats import collect_statistics

    folder = tmp_path_factory.mktemp("prepared")
    prepared = prepare_model(load_model(str(demo.model_path)), folder / "prepared.onnx")
    proto = prepared.load()
    stats, _ = collect_statistics(proto, float_activation_tensors(proto),
                                  CalibrationSource(demo.calibration_data, prepared.input_specs), prepared.sha256)
    return prepared, stats
