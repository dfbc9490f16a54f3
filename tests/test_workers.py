"""Many workers on one study through Optuna's own storages: Journal file (one machine) and PostgreSQL.

Real subprocesses, a real SIGKILL of one worker in the middle of a trial; the study must still reach its
n_trials COMPLETE trials, with the killed worker's trial failed and retried by another.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from autoquant.study import open_storage

N_TRIALS = 10
SPACE = {"knobs": {"calibration": ["minmax", "percentile", "entropy", "mse", "emd"], "percentile": [99.9, 99.99],
                   "activation_bits": [8, 16], "weight_bits": [8, 4], "weight_granularity": ["per_tensor", "per_channel"],
                   "fallback_k": 0}}


def write_inputs(demo, folder: Path) -> dict:
    np.savez(folder / "calib.npz", x=demo.calib)
    np.savez(folder / "eval.npz", x=demo.eval_x, y=demo.labels)
    (folder / "space.json").write_text(json.dumps(SPACE))
    (folder / "evaluate.py").write_text(textwrap.dedent(f"""
        import time, numpy as np, onnxruntime as ort
        data = np.load({str(folder / 'eval.npz')!r})
        def evaluate(path):
            time.sleep(0.4)  # long enough for a kill to land inside a trial
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            return float((s.run(None, {{"x": data["x"]}})[0].argmax(1) == data["y"]).mean())
    """))
    return {"model": str(demo.model_path), "calib": str(folder / "calib.npz"), "eval": f"{folder / 'evaluate.py'}:evaluate",
            "space": str(folder / "space.json")}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "autoquant.cli", *args]


def run_study_with_workers(demo, tmp_path: Path, storage: str) -> optuna.Study:
    inputs = write_inputs(demo, tmp_path)
    name = f"shared-{uuid.uuid4().hex[:8]}"  # a server database may outlive one test run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = lambda i: open(tmp_path / f"proc{i}.log", "w")  # noqa: E731
    creator = subprocess.Popen(cli("optimize", inputs["model"], "--calib", inputs["calib"], "--calib-batch-size", "32",
                                   "--eval", inputs["eval"], "--space", inputs["space"], "--n-trials", str(N_TRIALS),
                                   "--storage", storage, "--study-name", name, "--output-dir", str(tmp_path / "out"),
                                   "--heartbeat", "0.5", "--quiet"), stdout=log(0), stderr=subprocess.STDOUT, env=env)
    workers = [subprocess.Popen(cli("worker", "--storage", storage, "--study", name, "--quiet"),
                                stdout=log(i), stderr=subprocess.STDOUT, env=env) for i in (1, 2)]
    procs = [creator, *workers]
    victim = workers[0]
    st = open_storage(storage, tmp_path)
    killed_trial = None
    deadline = time.monotonic() + 120
    try:
        while killed_trial is None and time.monotonic() < deadline:  # wait for the victim to be inside a trial
            try:
                study = optuna.load_study(study_name=name, storage=st)
            except KeyError:
                time.sleep(0.2)
                continue
            mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if t.user_attrs.get("owner") == f"{socket.gethostname()}:{victim.pid}"]
            if mine:
                time.sleep(0.1)
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
                killed_trial = mine[0].number
            time.sleep(0.05)
        assert killed_trial is not None, "the victim worker never started a trial"
        for p in (creator, workers[1]):
            assert p.wait(timeout=180) in (0, 3), (tmp_path / "proc0.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    study = optuna.load_study(study_name=name, storage=st)
    study.set_user_attr("_test_killed_trial", killed_trial)
    return study


def check_study(study: optuna.Study, tmp_path: Path) -> None:
    killed = study.user_attrs["_test_killed_trial"]
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == N_TRIALS  # PRUNED: hopeless
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL and "process died" in dead.user_attrs["fail_reason"]
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == killed]
    assert len(retried) == 1 and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # a kill before the sampler ran leaves only the enqueued (fixed) params on the dead trial
    assert retried[0].params == {**dead.system_attrs.get("fixed_params", {}), **dead.params}
    owners = {t.user_attrs["owner"] for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(owners) >= 2, owners  # the work was shared
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert study.trials[result["trial_number"]].state == TrialState.COMPLETE


def test_three_workers_on_a_journal_study(demo, tmp_path):
    study = run_study_with_workers(demo, tmp_path, f"journal:///{tmp_path / 'study.log'}")
    check_study(study, tmp_path)


def test_three_workers_on_postgresql(demo, tmp_path):
    url = os.environ.get("AUTOQUANT_TEST_POSTGRES")
    if not url:
        if shutil.which("pg_ctl") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
            pytest.skip("no PostgreSQL server binary (pg_ctl) on this machine")
        pytest.skip("PostgreSQL binaries exist but AUTOQUANT_TEST_POSTGRES is not set: run the suite through "
                    ".ci/run, which starts a local server and sets it")
    pytest.importorskip("psycopg")
    study = run_study_with_workers(demo, tmp_path, url)
    check_study(study, tmp_path)
