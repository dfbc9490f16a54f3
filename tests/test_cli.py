"""The console script, run as a real subprocess."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from autoquant.cli import calibration_from_path, main

CLI = [sys.executable, "-m", "autoquant.cli"]


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run(CLI + ["demo", "--quiet", "--n-trials", "6", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "autoquant demo: trial" in proc.stdout and "accuracy" in proc.stdout
    assert (tmp_path / "out" / "quantized.onnx").exists()


def test_optimize_report_cli(demo, tmp_path):
    np.savez(tmp_path / "calib.npz", x=demo.calib)
    np.savez(tmp_path / "eval.npz", x=demo.eval_x, y=demo.labels)
    (tmp_path / "my_eval.py").write_text(textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        data = np.load({str(tmp_path / 'eval.npz')!r})
        def evaluate(path):
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            return float((s.run(None, {{"x": data["x"]}})[0].argmax(1) == data["y"]).mean())
    """))
    out = tmp_path / "out"
    proc = subprocess.run(CLI + ["optimize", str(demo.model_path), "--calib", str(tmp_path / "calib.npz"),
                                 "--calib-batch-size", "32", "--eval", f"{tmp_path / 'my_eval.py'}:evaluate",
                                 "--n-trials", "3", "--drop", "0.5", "--output-dir", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "(feasible)" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["feasible"] and result["model_path"] == "quantized.onnx"
    rep = subprocess.run(CLI + ["report", str(out)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "calibration" in rep.stdout and "size_ratio" in rep.stdout and "enqueued" in rep.stdout
    assert "model_file" not in rep.stdout  # the compact view; --all has every trial and column
    assert max(len(line) for line in rep.stdout.splitlines()) < 400
    assert str(result["trial_number"]) in rep.stdout
    full = subprocess.run(CLI + ["report", str(out), "--all"], capture_output=True, text=True, timeout=120)
    assert full.returncode == 0 and "model_file" in full.stdout and "size_bytes" in full.stdout


def test_bad_input_exit_code_and_message(tmp_path, capsys):
    code = main(["optimize", str(tmp_path / "missing.onnx"), "--calib", str(tmp_path), "--eval", "x:y",
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "autoquant: error:" in err and "Traceback" not in err


def test_calib_npz_split(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((10, 1, 8, 8), np.float32))
    feeds = list(calibration_from_path(str(tmp_path / "c.npz"), batch_size=4)())
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(3):
        np.savez(d / f"{i}.npz", x=np.ones((2, 1, 8, 8), np.float32) * i)
    feeds = list(calibration_from_path(str(d))())
    assert [float(f["x"][0, 0, 0, 0]) for f in feeds] == [0.0, 1.0, 2.0]


def test_report_on_empty_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no autoquant study" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["aimet", "aimet-0.6.1", "ncnn-table"])
def test_export_cli(demo, tmp_path, fmt):
    from autoquant import optimize

    space = {"knobs": {"calibration": "minmax", "activation_bits": 8, "activation_symmetric": True,
                       "weight_granularity": "per_channel", "fallback_k": 0}}
    optimize(str(demo.model_path), demo.calibration_data, demo.evaluate, allowed_accuracy_drop=1.0, search_space=space,
             n_trials=1, output_dir=tmp_path / "o", show_progress=False)
    assert main(["export", str(tmp_path / "o"), "--format", fmt, "--out", str(tmp_path / "x")]) == 0
    text = (tmp_path / "x").read_text()
    if fmt.startswith("aimet"):
        assert json.loads(text)["version"] == ("1.0.0" if fmt == "aimet" else "0.6.1")
    else:
        assert "conv1_param_0" in text
