"""Awkward inputs beyond test_bad_inputs.py: each gets an AutoQuantError that says what to fix (or just works),
never a raw third-party exception; the CLI answers each with exit code 2 and one line, no traceback."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from autoquant import optimize
from autoquant.demo import DemoTask
from autoquant.errors import CalibrationDataError, ConfigError, OutputDirError, SearchSpaceError

FIXED = {"knobs": {"calibration": "minmax", "weight_granularity": "per_tensor", "fallback_k": 0}}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> DemoTask:
    return DemoTask(tmp_path_factory.mktemp("task"))


def _run(task, out, model=None, calib=None, ev=None, **kw):
    args = dict(search_space=FIXED, n_trials=1, output_dir=out, show_progress=False, allowed_accuracy_drop=1.0,
                measure_latency=False)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optimize(model or str(task.model_path), calib or task.calibration_data, ev or task.evaluate, **args)


@pytest.mark.parametrize("seed", [-1, 2**40])
def test_seed_out_of_range(task, tmp_path, seed):
    with pytest.raises(ConfigError, match="seed"):
        _run(task, tmp_path / "o", seed=seed)


def test_calibration_generator_raising_part_way(task, tmp_path):
    def feeds():
        for i, feed in enumerate(task.calibration_data()):
            if i == 2:
                raise OSError("disk read error")
            yield feed

    with pytest.raises(CalibrationDataError, match="OSError: disk read error while producing feed #2"):
        _run(task, tmp_path / "o", calib=feeds)
    assert not (tmp_path / "o").exists()


def test_feed_with_non_string_keys(task, tmp_path):
    feeds = [{0: f["x"]} for f in task.calibration_data()]
    with pytest.raises(CalibrationDataError, match="not strings"):
        _run(task, tmp_path / "o", calib=feeds)


@pytest.mark.parametrize("where, needle", [("nul", "NUL"), ("long", "255 bytes"), ("proc", "kernel file system")])
def test_output_dir_that_cannot_be(task, tmp_path, where, needle):
    out = {"nul": str(tmp_path / "a\x00b"), "long": tmp_path / ("x" * 300), "proc": Path("/proc/self/autoquant")}[where]
    with pytest.raises(OutputDirError, match=needle):
        _run(task, out)


@pytest.mark.parametrize("name", ["trials", "cache"])
def test_output_dir_whose_folder_names_are_files(task, tmp_path, name):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / name).write_text("mine")
    with pytest.raises(OutputDirError, match=f"{name} is a file"):
        _run(task, tmp_path / "o")
    assert (tmp_path / "o" / name).read_text() == "mine"


def test_eval_that_changes_the_working_directory_with_a_relative_output_dir(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def evaluate(path):
        score = task.evaluate(path)
        os.chdir(elsewhere)
        return score

    r = _run(task, "rel_out", ev=evaluate, n_trials=2,
             search_space={"knobs": {**FIXED["knobs"], "weight_granularity": ["per_tensor", "per_channel"]}})
    assert Path(r.model_path) == tmp_path / "rel_out" / "quantized.onnx" and Path(r.model_path).is_file()
    assert not (elsewhere / "rel_out").exists()


def test_duplicate_node_names_are_a_model_error(task, tmp_path):
    from autoquant.errors import ModelError

    m = onnx.load(str(task.model_path))
    for node in m.graph.node:
        node.name = "same"
    path = tmp_path / "dup.onnx"
    onnx.save(m, path)
    with pytest.raises(ModelError, match="used more than once"):
        _run(task, tmp_path / "o", model=str(path))
    assert not (tmp_path / "o").exists()


def test_yaml_alias_bomb_gives_a_short_message(task, tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                      for p, c in zip("abcdefg", "bcdefgh")]
    (tmp_path / "bomb.yaml").write_text("\n".join(["bomb:"] + ["  " + ln for ln in lines])
                                        + "\nknobs:\n  calibration: *h\n")
    with pytest.raises(SearchSpaceError) as info:
        _run(task, tmp_path / "o", search_space=str(tmp_path / "bomb.yaml"))
    assert len(str(info.value)) < 1500
    (tmp_path / "bomb_name.yaml").write_text("\n".join(["bomb:"] + ["  " + ln for ln in lines])
                                             + "\nname: *h\nknobs: {}\n")
    (tmp_path / "bomb_name2.yaml").write_text("name: " + "n" * 10_000 + "\nknobs: {}\n")
    for f in ("bomb_name.yaml", "bomb_name2.yaml"):
        with pytest.raises(SearchSpaceError) as info:
            _run(task, tmp_path / "o", search_space=str(tmp_path / f))
        assert len(str(info.value)) < 1500


# --- the CLI, through subprocess: exit code 2, one line on stderr, no traceback ---------------------------------

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "autoquant.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _assert_one_line_error(p, needle):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and needle in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1, p.stderr


@pytest.fixture(scope="module")
def cli_files(task, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    feeds = list(task.calibration_data())
    np.savez(d / "calib.npz", x=np.concatenate([f["x"] for f in feeds]))
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "ev.py").write_text("def evaluate(path):\n    return 1.0\n")
    (d / "space.yaml").write_text("knobs:\n  calibration: minmax\n  fallback_k: 0\n")
    return d


def test_cli_batch_size_zero(task, cli_files):
    p = _cli("optimize", task.model_path, "--calib", cli_files / "calib.npz", "--calib-batch-size", "0", "--eval",
             f"{cli_files / 'ev.py'}:evaluate", "--output-dir", cli_files / "o1", "--quiet", cwd=cli_files)
    _assert_one_line_error(p, "--calib-batch-size must be an integer >= 1")


def test_cli_corrupt_npz(task, cli_files):
    p = _cli("optimize", task.model_path, "--calib", cli_files / "corrupt.npz", "--eval",
             f"{cli_files / 'ev.py'}:evaluate", "--output-dir", cli_files / "o2", "--quiet", cwd=cli_files)
    _assert_one_line_error(p, "cannot be read as .npz")


def test_cli_report_on_a_corrupt_record_and_export_to_a_directory(task, cli_files):
    out = cli_files / "o3"
    p = _cli("optimize", task.model_path, "--calib", cli_files / "calib.npz", "--calib-batch-size", "8", "--eval",
             f"{cli_files / 'ev.py'}:evaluate", "--space", cli_files / "space.yaml", "--n-trials", "1",
             "--output-dir", out, "--quiet", "--no-latency", cwd=cli_files)
    assert p.returncode == 0, p.stderr
    (out / "target_dir").mkdir()
    _assert_one_line_error(_cli("export", out, "--format", "aimet", "--out", out / "target_dir", cwd=cli_files),
                           "is a directory")
    (out / "autoquant.json").write_text("{ not json")
    _assert_one_line_error(_cli("report", out, cwd=cli_files), "cannot be read")


def test_external_data_counts_in_the_fp32_size(task, tmp_path):
    m = onnx.load(str(task.model_path))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(m, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    total = (folder / "model.onnx").stat().st_size + (folder / "weights.bin").stat().st_size
    r = _run(task, tmp_path / "o", model=str(folder / "model.onnx"))
    assert r.fp32_size_bytes == total and r.size_ratio < 0.5  # int8 weights: about a quarter of the bytes


def test_a_large_model_keeps_its_cached_copies_external(task, tmp_path, monkeypatch):
    """Above the size protobuf can hold, the prepared model and its variants are cached with external data
    (tested with the threshold lowered: a 2 GB model has no place in a unit test)."""
    monkeypatch.setattr("autoquant.model.LARGE_MODEL_BYTES", 10_000)
    r = _run(task, tmp_path / "o", n_trials=1)
    cache = tmp_path / "o" / "cache"
    data = sorted(p.name for p in cache.glob("prepared-*.onnx.data"))
    assert data, sorted(p.name for p in cache.iterdir())
    for onnx_file in cache.glob("prepared-*.onnx"):
        proto = onnx.load(str(onnx_file), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), onnx_file
    assert Path(r.model_path).is_file() and r.accuracy == task.evaluate(r.model_path)
    again = _run(task, tmp_path / "o", n_trials=1)  # resumed from the cache
    assert again.trial_number == r.trial_number and again.eval_calls == 0


def test_cli_usage_errors_are_one_line(tmp_path):
    _assert_one_line_error(_cli("optimize", cwd=tmp_path), "the following arguments are required")
    _assert_one_line_error(_cli("optimize", "m.onnx", "--calib", "c", "--eval", "e:f", "--n-trials", "abc",
                                cwd=tmp_path), "invalid int value")
