"""Bad inputs to optimize(): the documented exception, a message that says what to fix, no half-written output.

Every case is a real optimize() call (real ONNX, onnxruntime, Optuna, SQLite); nothing is mocked.
Callback misbehaviour (raising, NaN, None, str, arrays) must only FAIL the trial; the study goes on, and
NoCompletedTrialError (with the reason) is raised only when no trial completed at all.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from optuna.trial import TrialState

from autoquant.study import trial_folder
from autoquant import optimize
from autoquant.demo import DemoTask
from autoquant.errors import (AutoQuantError, CalibrationDataError, ConfigError, ModelError, NoCompletedTrialError,
                              OutputDirError, SearchSpaceError, StorageError)

#: A space that fixes every searched knob: every trial builds the same, cheap model (no sensitivity pass).
FIXED_SPACE = {"knobs": {"calibration": "minmax", "weight_bits": 8, "activation_bits": 8, "fallback_k": 0}}

DELIVERED = ("quantized.onnx", "quantized.encodings.json", "result.json", "report.csv")


# --------------------------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def task(tmp_path_factory) -> DemoTask:
    return DemoTask(tmp_path_factory.mktemp("task"))


@pytest.fixture
def out(tmp_path) -> Path:
    p = tmp_path / "out"
    assert not p.exists()
    return p


def _kwargs(task: DemoTask, out: Path, **overrides) -> dict:
    kw = dict(model=task.model_path, calibration_data=task.calibration_data, eval_callback=task.evaluate,
              allowed_accuracy_drop=1.0, search_space=FIXED_SPACE, n_trials=1, output_dir=out, show_progress=False)
    kw.update(overrides)
    return kw


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def expect(exc_type: type[Exception], substrings: tuple[str, ...], **kwargs) -> Exception:
    """Call optimize(**kwargs), require exc_type (exactly a subclass of it) and every substring in the message."""
    with pytest.raises(AutoQuantError) as info:
        optimize(**kwargs)
    exc = info.value
    assert isinstance(exc, exc_type), f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
    msg = str(exc)
    for s in substrings:
        assert s.lower() in msg.lower(), f"message does not mention {s!r}: {msg}"
    return exc


def assert_not_created(folder: Path) -> None:
    assert not folder.exists(), f"a failing call left output_dir {folder} behind, holding {listing(folder)}"


#: Complete files optimize() may legitimately leave after an error raised once preparation has finished
#: (moved in atomically from a staging dir). Anything else (a .tmp, a trial model, a delivered file) is a leftover.
CACHE_FILES = (r"cache", r"cache/prepared-[0-9a-f]{16}(-[a-z_]+)?\.onnx", r"cache/prepared-[0-9a-f]{16}(-[a-z_]+)?\.json",
               r"cache/stats-[0-9a-f]+\.npz", r"study\.db")


def assert_only_complete_files(folder: Path, allowed: tuple[str, ...]) -> None:
    names = listing(folder)
    unexpected = [n for n in names if not any(re.fullmatch(a, n) for a in allowed)]
    assert not unexpected, f"unexpected files in {folder}: {unexpected} (all: {names})"
    for n in names:  # and every file that is there is complete / readable
        p = folder / n
        if p.is_dir():
            continue
        if n.endswith(".onnx"):
            onnx.checker.check_model(onnx.load(str(p)))
        elif n.endswith(".json"):
            json.loads(p.read_text())
        elif n.endswith(".npz"):
            with np.load(p) as z:
                list(z.keys())
        elif n.endswith(".db"):
            with sqlite3.connect(p) as con:
                assert con.execute("pragma integrity_check").fetchone()[0] == "ok"


def fixed_input_model(path: Path) -> Path:
    """A one-Conv model whose input is fully static: x [1, 1, 8, 8] float32."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------------- the model
def test_missing_model_file(task, out, tmp_path):
    missing = tmp_path / "nope" / "model.onnx"
    expect(ModelError, (str(missing), "does not exist"), **_kwargs(task, out, model=missing))
    assert_not_created(out)


def test_model_path_is_a_directory(task, out, tmp_path):
    expect(ModelError, (str(tmp_path), "not a file"), **_kwargs(task, out, model=tmp_path))
    assert_not_created(out)


def test_corrupt_model_file(task, out, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(np.random.default_rng(123).bytes(4096))
    expect(ModelError, (str(bad), "onnx"), **_kwargs(task, out, model=bad))
    assert_not_created(out)


def test_truncated_model_file(task, out, tmp_path):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(task.model_path.read_bytes()[:-700])
    expect(ModelError, (str(bad), "onnx"), **_kwargs(task, out, model=bad))
    assert_not_created(out)


def test_text_file_as_model(task, out, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("import torch\n# this is a python script, not an ONNX export\nprint('hello')\n")
    expect(ModelError, (str(bad), "onnx"), **_kwargs(task, out, model=bad))
    assert_not_created(out)


@pytest.mark.parametrize("model", [3, None, b"model.onnx", ["model.onnx"]], ids=["int", "None", "bytes", "list"])
def test_model_of_wrong_type(task, out, model):
    expect(ModelError, ("model", type(model).__name__, "path"), **_kwargs(task, out, model=model))
    assert_not_created(out)


def test_empty_model_proto(task, out):
    expect(ModelError, ("empty graph",), **_kwargs(task, out, model=onnx.ModelProto()))
    assert_not_created(out)


def test_model_proto_failing_checker(task, out):
    proto = onnx.load(str(task.model_path))
    proto.graph.node[0].input[0] = "not_a_tensor"
    expect(ModelError, ("onnx.checker", "not_a_tensor"), **_kwargs(task, out, model=proto))
    assert_not_created(out)


# --------------------------------------------------------------------------------------------- calibration data
def _feed(task, n=4, **kw):
    return {"x": task.calib[:n].copy(), **kw}


def test_feed_with_wrong_input_name(task, out):
    feeds = [{"image": task.calib[:4]}]
    expect(CalibrationDataError, ("'image'", "['x']", "#0"), **_kwargs(task, out, calibration_data=feeds))
    assert_not_created(out)


def test_feed_with_an_extra_input(task, out):
    feeds = [{"x": task.calib[:4], "mask": task.calib[:4]}]
    expect(CalibrationDataError, ("'mask'", "['x']"), **_kwargs(task, out, calibration_data=feeds))
    assert_not_created(out)


def test_feed_with_wrong_dtype(task, out):
    feeds = [{"x": task.calib[:4].astype(np.float64)}]
    expect(CalibrationDataError, ("float64", "float32", "'x'"), **_kwargs(task, out, calibration_data=feeds))
    assert_not_created(out)


def test_feed_with_wrong_rank(task, out):
    feeds = [{"x": task.calib[:4, 0]}]  # (4, 8, 8): channel axis missing
    expect(CalibrationDataError, ("rank 3", "rank 4", "(4, 8, 8)"), **_kwargs(task, out, calibration_data=feeds))
    assert_not_created(out)


def test_feed_with_wrong_static_dim_demo_model(task, out):
    feeds = [{"x": np.zeros((4, 2, 8, 8), np.float32)}]  # demo input is [N, 1, 8, 8]
    expect(CalibrationDataError, ("(4, 2, 8, 8)", "axis 1 must be 1"), **_kwargs(task, out, calibration_data=feeds))
    assert_not_created(out)


def test_feed_with_wrong_static_dim_fixed_model(task, out, tmp_path):
    model = fixed_input_model(tmp_path / "fixed.onnx")
    feeds = [{"x": np.zeros((4, 1, 8, 8), np.float32)}]  # batch 4, the model is fixed at batch 1
    expect(CalibrationDataError, ("(4, 1, 8, 8)", "[1, 1, 8, 8]", "axis 0 must be 1"),
           **_kwargs(task, out, model=model, calibration_data=feeds))
    assert_not_created(out)


def test_empty_calibration_list(task, out):
    expect(CalibrationDataError, ("empty", "at least one feed"), **_kwargs(task, out, calibration_data=[]))
    assert_not_created(out)


def test_empty_calibration_generator_function(task, out):
    expect(CalibrationDataError, ("empty",), **_kwargs(task, out, calibration_data=lambda: iter(())))
    assert_not_created(out)


def test_single_dict_instead_of_list(task, out):
    expect(CalibrationDataError, ("single dict", "[feed]"), **_kwargs(task, out, calibration_data=_feed(task)))
    assert_not_created(out)


def test_bare_array_instead_of_feeds(task, out):
    expect(CalibrationDataError, ("ndarray", "dict", "['x']"), **_kwargs(task, out, calibration_data=task.calib[:8]))
    assert_not_created(out)


@pytest.mark.parametrize("data", [None, 5], ids=["None", "int"])
def test_calibration_data_of_wrong_type(task, out, data):
    expect(CalibrationDataError, ("calibration_data", "iterable"), **_kwargs(task, out, calibration_data=data))
    assert_not_created(out)


def test_calibration_callable_that_raises(task, out):
    def data():
        raise FileNotFoundError("calib.npy")

    expect(CalibrationDataError, ("calibration_data callable", "FileNotFoundError", "calib.npy"),
           **_kwargs(task, out, calibration_data=data))
    assert_not_created(out)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_calibration_data(task, out, bad_value):
    bad = _feed(task)
    bad["x"][2, 0, 3, 3] = bad_value
    feeds = [_feed(task), bad, _feed(task)]
    expect(CalibrationDataError, ("#1", "NaN or inf", "'x'"), **_kwargs(task, out, calibration_data=feeds))
    assert_not_created(out)


def test_bad_feed_late_in_a_one_shot_generator(task, out):
    """A one-shot iterator is streamed straight into statistics collection: a bad feed #37 leaves nothing."""
    bad = _feed(task)
    bad["x"][0, 0, 0, 0] = np.nan

    def gen():
        for i in range(40):
            yield bad if i == 37 else _feed(task)

    expect(CalibrationDataError, ("#37", "NaN or inf"), **_kwargs(task, out, calibration_data=gen()))
    assert_not_created(out)


def test_feed_with_zero_samples(task, out):
    """A (0, 1, 8, 8) batch is no data: it must be rejected up front, not surface as failing trials."""
    feeds = [{"x": np.zeros((0, 1, 8, 8), np.float32)}]
    exc = expect(CalibrationDataError, ("'x'",), **_kwargs(task, out, calibration_data=feeds))
    assert any(s in str(exc).lower() for s in ("empty", "no sample", "0 samples", "(0, 1, 8, 8)")), str(exc)
    assert_not_created(out)


def test_bad_feed_leaves_an_existing_empty_output_dir_empty(task, out):
    out.mkdir()
    feeds = [_feed(task), {"x": task.calib[:4].astype(np.float64)}]
    expect(CalibrationDataError, ("#1", "float64"), **_kwargs(task, out, calibration_data=feeds))
    assert listing(out) == []


# --------------------------------------------------------------------------------------------- plain arguments
@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"eval_callback": "evaluate.py"}, ("eval_callback", "callable", "str")),
        ({"eval_callback": None}, ("eval_callback", "callable")),
        ({"allowed_accuracy_drop": -0.01}, ("allowed_accuracy_drop", ">= 0", "-0.01")),
        ({"allowed_accuracy_drop": float("nan")}, ("allowed_accuracy_drop", "finite", "nan")),
        ({"allowed_accuracy_drop": "0.01"}, ("allowed_accuracy_drop", "number", "'0.01'")),
        ({"allowed_accuracy_drop": True}, ("allowed_accuracy_drop", "number")),
        ({"drop_type": "percent"}, ("drop_type", "'absolute'", "'relative'", "'percent'")),
        ({"higher_is_better": "yes"}, ("higher_is_better", "True or False")),
        ({"n_trials": 0}, ("n_trials", ">= 1", "0")),
        ({"n_trials": 2.5}, ("n_trials", "integer", "2.5")),
        ({"n_trials": True}, ("n_trials", "integer", "True")),
        ({"n_trials": "10"}, ("n_trials", "integer", "'10'")),
        ({"timeout": -5}, ("timeout", "> 0", "-5")),
        ({"timeout": "60"}, ("timeout", "seconds", "'60'")),
        ({"seed": "a"}, ("seed", "integer", "'a'")),
        ({"seed": 1.5}, ("seed", "integer", "1.5")),
        ({"select": "best"}, ("select", "smallest", "most_accurate", "'best'")),
        ({"output_dir": 5}, ("output_dir", "path", "int")),
        ({"eval_timeout": 0}, ("eval_timeout", "> 0", "0")),
        ({"eval_timeout": "5"}, ("eval_timeout", "seconds", "'5'")),
        ({"heartbeat_interval": -1}, ("heartbeat_interval", "> 0", "-1")),
        ({"study_name": 5}, ("study_name", "string", "5")),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]!r}" for k in v) if isinstance(v, dict) else "",
)
def test_bad_argument(task, out, overrides, needles):
    kw = _kwargs(task, out, **overrides)
    expect(ConfigError, needles, **kw)
    assert_not_created(out)


# --------------------------------------------------------------------------------------------- search space
def test_unknown_preset_name(task, out):
    expect(SearchSpaceError, ("'defualt'", "default"), **_kwargs(task, out, search_space="defualt"))
    assert_not_created(out)


def test_empty_string_search_space(task, out):
    """'' is neither a preset nor a file: the message must say so and list the presets (not 'file . missing')."""
    exc = expect(SearchSpaceError, ("default",), **_kwargs(task, out, search_space=""))
    assert "file . " not in str(exc), f"message talks about the current directory: {exc}"
    assert_not_created(out)


def test_space_dict_with_unknown_knob(task, out):
    space = {"knobs": {"weight_bitz": 8}}
    expect(SearchSpaceError, ("'weight_bitz'", "weight_bits"), **_kwargs(task, out, search_space=space))
    assert_not_created(out)


def test_space_dict_with_unknown_top_level_key(task, out):
    space = {"knob": {"weight_bits": 8}}
    expect(SearchSpaceError, ("'knob'", "knobs"), **_kwargs(task, out, search_space=space))
    assert_not_created(out)


@pytest.mark.parametrize(
    "knobs, needles",
    [
        ({"weight_bits": 3}, ("'weight_bits'", "3", "[4, 8, 16]")),
        ({"weight_bits": [8, 3]}, ("'weight_bits'", "3", "[4, 8, 16]")),
        ({"calibration": "kl"}, ("'calibration'", "'kl'", "minmax", "percentile")),
        ({"weight_symmetric": 1}, ("'weight_symmetric'", "[True, False]")),
        ({"fallback_k": {"low": 0, "high": 5000}}, ("'fallback_k'", "1000")),
        ({"percentile": 101}, ("'percentile'", "[90.0, 100.0]")),
    ],
    ids=["weight_bits=3", "weight_bits=[8,3]", "calibration=kl", "weight_symmetric=1", "fallback_k>max",
         "percentile=101"],
)
def test_space_with_unknown_value_lists_allowed_values(task, out, knobs, needles):
    expect(SearchSpaceError, needles, **_kwargs(task, out, search_space={"knobs": knobs}))
    assert_not_created(out)


def test_malformed_yaml_space_file(task, out, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("knobs:\n  weight_bits: [8, 4\n  calibration: minmax\n")
    expect(SearchSpaceError, (str(path), "not valid YAML"), **_kwargs(task, out, search_space=str(path)))
    assert_not_created(out)


def test_yaml_space_file_that_is_not_a_mapping(task, out, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("- weight_bits\n- calibration\n")
    expect(SearchSpaceError, (str(path), "mapping", "knobs"), **_kwargs(task, out, search_space=path))
    assert_not_created(out)


def test_missing_space_file(task, out, tmp_path):
    path = tmp_path / "nope.yaml"
    expect(SearchSpaceError, (str(path), "does not exist"), **_kwargs(task, out, search_space=path))
    assert_not_created(out)


def test_search_space_of_wrong_type(task, out):
    expect(SearchSpaceError, ("search_space", "int"), **_kwargs(task, out, search_space=5))
    assert_not_created(out)


# --------------------------------------------------------------------------------------------- output dir, storage
def test_output_dir_under_a_regular_file(task, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    target = blocker / "out"
    expect(OutputDirError, (str(blocker), "is a file"), **_kwargs(task, target))
    assert blocker.read_text() == "I am a file"


def test_output_dir_is_a_regular_file(task, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("I am a file")
    expect(OutputDirError, (str(blocker), "not a directory"), **_kwargs(task, blocker))
    assert blocker.read_text() == "I am a file"


@pytest.mark.parametrize("url", ["postgresql://nobody@127.0.0.1:1/none", "nosuchscheme://host/db"],
                         ids=["postgres-unreachable", "invalid-scheme"])
def test_storage_that_cannot_be_opened(task, out, url):
    expect(StorageError, (url,), **_kwargs(task, out, storage=url))
    assert_not_created(out)


def test_sqlite_storage_in_a_missing_directory(task, out, tmp_path):
    url = f"sqlite:///{tmp_path}/no/such/dir/study.db"
    expect(StorageError, (url,), **_kwargs(task, out, storage=url))
    assert_not_created(out)
    assert not (tmp_path / "no").exists()


def test_storage_of_wrong_type(task, out):
    expect(StorageError, ("storage", "int"), **_kwargs(task, out, storage=42))
    assert_not_created(out)


# --------------------------------------------------------------------------------------------- eval callback
DELETE = object()  # sentinel: the callback deletes the file it was given


class Callback:
    """Scores with the demo metric, but misbehaves on the calls ``bad_calls`` (1-based; call 1 is the fp32 model)."""

    def __init__(self, task: DemoTask, bad, bad_calls):
        self.task, self.bad, self.bad_calls, self.paths = task, bad, bad_calls, []

    def __call__(self, path: str):
        self.paths.append(path)
        if self.bad_calls(len(self.paths)):
            if isinstance(self.bad, BaseException):
                raise self.bad
            if self.bad is DELETE:
                Path(path).unlink()
                return self.task.evaluate(self.task.model_path)
            return self.bad
        return self.task.evaluate(path)


MISBEHAVIOURS = [
    (RuntimeError("boom on quantized"), ("RuntimeError", "boom on quantized")),
    (float("nan"), ("nan", "finite number")),
    (None, ("NoneType", "finite number")),
    ("0.93", ("str", "'0.93'", "finite number")),
    (np.array([0.9, 0.9, 0.9]), ("ndarray", "finite number")),
]
MISBEHAVIOUR_IDS = ["raises", "nan", "None", "str", "array3"]

ALLOWED_AFTER_FAILED_STUDY = CACHE_FILES + (r"autoquant\.json", r"trials", r"trials/autoquant-[0-9a-f]{12}")


@pytest.mark.parametrize("bad, needles", MISBEHAVIOURS, ids=MISBEHAVIOUR_IDS)
def test_callback_failing_on_every_quantized_model(task, out, bad, needles):
    cb = Callback(task, bad, lambda n: n >= 2)
    exc = expect(NoCompletedTrialError, ("no trial", "eval_callback") + needles,
                 **_kwargs(task, out, eval_callback=cb, n_trials=2))
    assert cb.paths[0] == str(task.model_path), "the first call must score the fp32 model"
    assert len(cb.paths) >= 2 and all(Path(p).parent.parent == out / "trials" for p in cb.paths[1:])
    # the study went on after the first failure (it did not stop at trial 0), and stopped eventually
    assert len(cb.paths) >= 3, f"only {len(cb.paths)} calls; the study stopped after the first failed trial: {exc}"
    assert_only_complete_files(out, ALLOWED_AFTER_FAILED_STUDY)  # no trial model, nothing delivered


def test_model_with_nothing_quantizable(out, tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Exp", ["x"], ["y"], name="exp")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "exp.onnx"
    onnx.save(model, str(path))
    feeds = [{"x": np.ones((2, 4), np.float32)}]
    expect(ModelError, ("nothing in this model can be quantized", "Exp"), model=str(path), calibration_data=feeds,
           eval_callback=lambda p: 1.0, output_dir=out, show_progress=False)
    assert_not_created(out)


def test_slow_callback_hits_eval_timeout(task, out):
    import time

    def slow(path):
        if Path(path) != task.model_path:
            time.sleep(3.0)
        return task.evaluate(path)

    t0 = time.monotonic()
    exc = expect(NoCompletedTrialError, ("eval_timeout=0.3",), **_kwargs(task, out, eval_callback=slow, n_trials=1,
                                                                      eval_timeout=0.3))
    assert time.monotonic() - t0 < 12, exc  # 3 failed trials x 0.3 s, not 3 x 3 s


@pytest.mark.parametrize("knobs, needles", [
    ({"calibration": ["minmax", "mse"], "percentile": [99.9]}, ("percentile", "never takes")),
    ({"cle": True, "bn_fold": [True, False]}, ("bn_fold", "cle", "always")),
], ids=["percentile-without-percentile-calibration", "bn_fold-with-cle-always-on"])
def test_contradictory_space(task, out, knobs, needles):
    expect(SearchSpaceError, needles, **_kwargs(task, out, search_space={"knobs": knobs}))
    assert_not_created(out)


def test_callback_deleting_the_model_file_fails_the_trial(task, out):
    cb = Callback(task, DELETE, lambda n: n >= 2)
    expect(NoCompletedTrialError, ("modified or removed",), **_kwargs(task, out, eval_callback=cb, n_trials=1))
    assert task.model_path.exists()
    assert_only_complete_files(out, ALLOWED_AFTER_FAILED_STUDY)


@pytest.mark.parametrize("bad, needles", MISBEHAVIOURS, ids=MISBEHAVIOUR_IDS)
def test_callback_failing_once_only_fails_that_trial(task, out, bad, needles):
    cb = Callback(task, bad, lambda n: n == 2)  # call 1 = fp32 baseline, call 2 = trial 0
    result = optimize(**_kwargs(task, out, eval_callback=cb, n_trials=2))
    assert Path(result.model_path).is_file()
    onnx.checker.check_model(onnx.load(result.model_path))
    trials = result.study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(failed) == 1 and failed[0].number == 0, [(t.number, t.state) for t in trials]
    assert len(complete) == 2
    reason = failed[0].user_attrs.get("fail_reason", "")
    assert "eval_callback" in reason and all(n.lower() in reason.lower() for n in needles), reason
    assert not (trial_folder(out, result.study.study_name) / "trial_00000.onnx").exists(), \
        "the failed trial's model file was left behind"
    assert result.trial_number != 0
    assert "FAIL" in (out / "report.csv").read_text()


@pytest.mark.parametrize("bad, needles", MISBEHAVIOURS, ids=MISBEHAVIOUR_IDS)
def test_callback_failing_on_the_fp32_baseline_is_a_config_error(task, out, bad, needles):
    cb = Callback(task, bad, lambda n: n == 1)
    expect(ConfigError, ("fp32", "fix the callback") + needles, **_kwargs(task, out, eval_callback=cb, n_trials=2))
    assert cb.paths == [str(task.model_path)], "no trial may run after the baseline failed"
    assert_only_complete_files(out, CACHE_FILES)  # complete cache files and the study db only


def test_relative_drop_with_zero_baseline_is_a_config_error(task, out):
    expect(ConfigError, ("relative", "non-zero", "0"),
           **_kwargs(task, out, eval_callback=lambda p: 0.0, drop_type="relative"))
    assert_only_complete_files(out, CACHE_FILES)


def test_timeout_spent_before_the_first_trial_still_delivers_one(task, out):
    """Preparation, statistics and the fp32 eval can outlast the timeout: one trial still runs, so the
    work is not lost and there is a model to deliver; no second trial starts."""
    result = optimize(**_kwargs(task, out, timeout=1e-6, n_trials=5))
    done = [t for t in result.study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(done) == 1 and result.trial_number == done[0].number
    assert all((out / n).exists() for n in DELIVERED)


# --------------------------------------------------------------------------------------------- reused study_name
def _first_run(task, out):
    result = optimize(**_kwargs(task, out, study_name="shared"))
    return {n: (out / n).read_bytes() for n in DELIVERED}, result


def test_study_name_reused_for_another_model(task, out, tmp_path):
    before, _ = _first_run(task, out)
    other = fixed_input_model(tmp_path / "other.onnx")
    expect(OutputDirError, ("'shared'", "another model", "study_name"),
           **_kwargs(task, out, model=other, calibration_data=[{"x": np.ones((1, 1, 8, 8), np.float32)}],
                     eval_callback=lambda p: 1.0, study_name="shared"))
    assert {n: (out / n).read_bytes() for n in DELIVERED} == before, "the earlier delivery was changed"


@pytest.mark.parametrize(
    "overrides, setting",
    [
        ({"allowed_accuracy_drop": 0.0}, "allowed_accuracy_drop"),
        ({"higher_is_better": False}, "higher_is_better"),
        ({"drop_type": "relative"}, "drop_type"),
        ({"search_space": {"knobs": {**FIXED_SPACE["knobs"], "weight_bits": 16}}}, "search_space"),
    ],
    ids=["allowed_accuracy_drop", "higher_is_better", "drop_type", "search_space"],
)
def test_study_name_reused_with_conflicting_settings(task, out, overrides, setting):
    """Resuming study 'shared' with other scoring settings must not silently reuse the old trials' scores."""
    before, _ = _first_run(task, out)
    with pytest.raises(AutoQuantError) as info:
        optimize(**_kwargs(task, out, study_name="shared", **overrides))
    exc = info.value
    assert isinstance(exc, (StorageError, OutputDirError, ConfigError)), f"{type(exc).__name__}: {exc}"
    assert setting in str(exc) and "study_name" in str(exc), str(exc)
    assert {n: (out / n).read_bytes() for n in DELIVERED} == before, "the earlier delivery was changed"
