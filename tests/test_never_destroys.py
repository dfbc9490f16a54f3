"""A search never dies and never destroys: outputs never touch inputs, studies sharing a folder or a database keep
their files, broken storages get a StorageError, and values from callbacks or the model cannot crash the study."""

import contextlib
import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import optimize
from autoquant.errors import OutputDirError, StorageError
from autoquant.study import trial_folder

BASE = {"calibration": "minmax", "weight_granularity": "per_tensor", "fallback_k": 0}


def _quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(*args, show_progress=False, measure_latency=False, **kw)


def test_a_model_where_a_deliverable_would_be_written_is_refused_and_kept(demo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inside = out / "quantized.onnx"
    inside.write_bytes(demo.model_path.read_bytes())
    before = inside.read_bytes()
    with pytest.raises(OutputDirError, match="would be overwritten"):
        _quiet(str(inside), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=1)
    assert inside.read_bytes() == before
    # a model elsewhere in output_dir (not an output name) is fine
    other = out / "my_model.onnx"
    other.write_bytes(before)
    assert _quiet(str(other), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=1,
                  search_space={"knobs": BASE}).model_path


def _second_model(demo, path: Path) -> Path:
    """The demo model with its last Gemm's bias shifted: another model, same inputs."""
    m = onnx.load(str(demo.model_path))
    init = next(t for t in reversed(m.graph.initializer) if len(t.dims) == 1)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.01), init.name))
    onnx.save(m, str(path))
    return path


def test_two_models_in_one_output_dir_keep_their_trials(demo, tmp_path):
    out = tmp_path / "shared"
    space = {"knobs": {**BASE, "weight_granularity": ["per_tensor", "per_channel"]}}
    a = _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=2,
               search_space=space, allowed_accuracy_drop=0.2)
    b_model = _second_model(demo, tmp_path / "b.onnx")
    b = _quiet(str(b_model), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=2, search_space=space,
               allowed_accuracy_drop=0.2)
    assert a.study.study_name != b.study.study_name
    folder_a, folder_b = trial_folder(out, a.study.study_name), trial_folder(out, b.study.study_name)
    assert folder_a != folder_b and list(folder_a.glob("*.onnx")) and list(folder_b.glob("*.onnx"))
    # rerunning A resumes it and delivers its own scored file
    again = _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=2,
                   search_space=space, allowed_accuracy_drop=0.2)
    assert again.study.study_name == a.study.study_name and again.trial_number == a.trial_number
    assert again.eval_calls == 0


def _run_in_child(model: str, out: str, n_trials: int, storage: str | None) -> None:
    import warnings

    from autoquant import optimize
    from autoquant.demo import DemoTask

    task = DemoTask(Path(model).parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize(model, task.calibration_data, task.evaluate, output_dir=out, n_trials=n_trials, storage=storage,
                 search_space={"knobs": {**BASE, "weight_granularity": ["per_tensor", "per_channel"]}},
                 show_progress=False, measure_latency=False, allowed_accuracy_drop=0.2, study_name="race")


@pytest.mark.parametrize("storage", [None, "sqlite"])
def test_two_processes_starting_at_once_on_one_sqlite_file_both_finish(demo, tmp_path, storage):
    out = tmp_path / "out"
    url = f"sqlite:///{tmp_path / 'shared.db'}" if storage else None
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run_in_child, args=(str(demo.model_path), str(out), 3, url)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    import optuna

    study = optuna.load_study(study_name="race", storage=url or f"sqlite:///{out / 'study.db'}")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 3


def test_broken_storages_are_storage_errors(demo, tmp_path):
    bad_db = tmp_path / "bad" / "study.db"
    bad_db.parent.mkdir()
    bad_db.write_bytes(b"SQLite format 3\x00" + b"\x07" * 100)  # truncated / garbage
    with pytest.raises(StorageError, match="study.db"):
        _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=bad_db.parent, n_trials=1)
    as_dir = tmp_path / "dir"
    (as_dir / "study.db").mkdir(parents=True)
    with pytest.raises(StorageError, match="directory"):
        _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=as_dir, n_trials=1)
    journal = tmp_path / "garbage.log"
    journal.write_text("this is not a journal\n{\"op_code\": \n")
    with pytest.raises(StorageError, match="journal"):
        _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=tmp_path / "j", n_trials=1,
               storage=f"journal:///{journal}")


def test_an_eval_returning_a_huge_integer_fails_only_that_trial(demo, tmp_path):
    calls = []

    def evaluate(path):
        calls.append(path)
        return demo.evaluate(path) if len(calls) != 2 else 10 ** 400

    r = _quiet(str(demo.model_path), demo.calibration_data, evaluate, output_dir=tmp_path, n_trials=2,
               search_space={"knobs": {**BASE, "weight_granularity": ["per_tensor", "per_channel"]}},
               allowed_accuracy_drop=0.2)
    failed = [t for t in r.study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and "too large" in failed[0].user_attrs["fail_reason"]
    assert r.feasible


def _matmul_chain(n_matmuls: int, d: int = 128) -> onnx.ModelProto:
    r = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n_matmuls):
        inits.append(numpy_helper.from_array((r.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("n_nodes", [1, 3, 5])
def test_repair_on_a_model_with_fewer_nodes_than_the_ladder_values(tmp_path, n_nodes):
    """Seen on a 15-node speech model: the repair enqueued fallback_k=15, which the space (0, 1, 2, 4, ...)
    does not contain, and the study died in Optuna. Every starting point is infeasible here, so repair and
    trim run on ladders longer than the model."""
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_chain(n_nodes), path)
    xs = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    calib = [{"x": xs[i:i + 8]} for i in range(0, 64, 8)]

    def evaluate(p):  # feasible once at least one MatMul is float
        m = onnx.load(p)
        return 1.0 if sum(t.name.endswith("_quantized") for t in m.graph.initializer) < n_nodes else 0.5

    space = {"knobs": {"mode": "static", "fallback_k": [0, 1, 2, 4, 8, 16, 32], "a16_k": [0, 1, 2, 4, 8],
                       "quantize_ops": ["all", "compute"]}}
    r = _quiet(str(path), calib, evaluate, output_dir=tmp_path / "o", n_trials=8, search_space=space)
    assert r.model_path and all(t.state.name != "FAIL" for t in r.study.trials), \
        [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in r.study.trials]
    repairs = [t for t in r.study.trials if "repair of" in t.user_attrs.get("enqueued", "")]
    if n_nodes > 1:  # one MatMul float of a single-MatMul model is no compression: nothing to repair to
        assert r.feasible and repairs
    assert all(t.params.get("fallback_k", 0) in space["knobs"]["fallback_k"] for t in r.study.trials)


SPACE2 = {"knobs": {**BASE, "weight_granularity": ["per_tensor", "per_channel"]}}


def test_a_rerun_after_the_trial_files_were_deleted_scores_them_again(demo, tmp_path):
    import shutil

    out = tmp_path / "o"
    first = _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=2,
                   search_space=SPACE2, allowed_accuracy_drop=0.2)
    shutil.rmtree(out / "trials")
    again = _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=2,
                   search_space=SPACE2, allowed_accuracy_drop=0.2)
    assert again.eval_calls >= 1 and any("missing" in w for w in again.warnings)
    assert Path(again.model_path).is_file() and again.accuracy == demo.evaluate(again.model_path)
    assert again.trial_number >= 2  # a re-scored trial, not one whose file is gone
    third = _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=2,
                   search_space=SPACE2, allowed_accuracy_drop=0.2)
    assert third.eval_calls == 0 and third.trial_number == again.trial_number  # nothing left to redo


def test_ctrl_c_during_a_trial_requeues_its_config_and_leaves_no_partial_file(demo, tmp_path):
    out = tmp_path / "o"
    calls = []

    def evaluate(path):
        calls.append(path)
        if len(calls) == 2:  # the first quantized trial's eval: the user presses Ctrl-C
            raise KeyboardInterrupt
        return demo.evaluate(path)

    with pytest.raises(KeyboardInterrupt):
        _quiet(str(demo.model_path), demo.calibration_data, evaluate, output_dir=out, n_trials=2, search_space=SPACE2,
               allowed_accuracy_drop=0.2)
    import optuna

    study = optuna.load_study(study_name=next(iter(optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}"))),
                              storage=f"sqlite:///{out / 'study.db'}")
    interrupted = study.trials[0]
    assert interrupted.state.name == "FAIL" and "interrupted" in interrupted.user_attrs["fail_reason"]
    assert not Path(calls[1]).exists()
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert any(t.system_attrs["fixed_params"] == interrupted.params for t in waiting)
    r = _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=2,
               search_space=SPACE2, allowed_accuracy_drop=0.2)
    redone = [t for t in r.study.trials if t.user_attrs.get("retry_of") == 0]
    assert redone and redone[0].state.name == "COMPLETE"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB tmpfs (needs root, as CI runs; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_mid_run_is_an_output_dir_error_and_the_rerun_resumes(demo, tiny_disk):
    calls = []

    def evaluate(path):
        calls.append(path)
        if len(calls) == 3:  # another process fills the disk during the second quantized trial's eval
            with open(tiny_disk / "filler", "wb") as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
        return demo.evaluate(path)

    space = {"knobs": {**BASE, "calibration": ["minmax", "percentile"], "weight_granularity": ["per_tensor", "per_channel"]}}
    out = tiny_disk / "o"
    with pytest.raises(OutputDirError, match="no space left"):
        _quiet(str(demo.model_path), demo.calibration_data, evaluate, output_dir=out, n_trials=6, search_space=space,
               allowed_accuracy_drop=0.2)
    (tiny_disk / "filler").unlink()
    r = _quiet(str(demo.model_path), demo.calibration_data, demo.evaluate, output_dir=out, n_trials=6,
               search_space=space, allowed_accuracy_drop=0.2)
    complete = [t for t in r.study.trials if t.state.name == "COMPLETE"]
    assert complete[0].number == 0 and Path(r.model_path).is_file()  # the trial scored before the fault survived
