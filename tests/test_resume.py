"""Resume, crash recovery, statistics caching, timeout and determinism of optimize().

The SIGKILL test runs optimize() in a child process and kills it at varied moments (while
calibration statistics are collected, while the fp32 baseline is being recorded, during trials,
during delivery), then lets it finish and checks that the study and the delivered files are what
an uninterrupted run leaves behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import autoquant.stats as stats_mod
from autoquant import optimize
from autoquant._io import sha256_file
from autoquant.demo import DemoTask

optuna.logging.set_verbosity(optuna.logging.WARNING)

# What optimize() records in the study together with the fp32 baseline (autoquant/api.py).
STUDY_ATTRS = {"baseline_accuracy", "model_sha256", "fp32_size_bytes", "allowed_accuracy_drop", "drop_type",
               "higher_is_better", "search_space", "stats_key", "prepared_model", "preparation", "seed"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def storage_url(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'study.db').resolve()}"


def load_study(output_dir: Path) -> optuna.Study:
    """The study named in output_dir/autoquant.json, from output_dir/study.db."""
    meta = json.loads((output_dir / "autoquant.json").read_text())
    return optuna.load_study(study_name=meta["study_name"], storage=storage_url(output_dir))


def peek_study(output_dir: Path) -> optuna.Study | None:
    """The study in output_dir/study.db if there is one yet (autoquant.json may not be written yet)."""
    if not (output_dir / "study.db").exists():
        return None
    names = optuna.get_all_study_names(storage_url(output_dir))
    return optuna.load_study(study_name=names[0], storage=storage_url(output_dir)) if names else None


def info(trial: optuna.trial.FrozenTrial) -> dict:
    """A trial's user attributes, with the nested per-trial details (file, sha256, ...) merged in."""
    a = dict(trial.user_attrs)
    details = a.get("details")
    if isinstance(details, dict):
        a.update(details)
    return a


def snapshot(trial: optuna.trial.FrozenTrial) -> dict:
    a = info(trial)
    return {"number": trial.number, "state": trial.state, "params": dict(trial.params),
            "values": list(trial.values or []), "sha256": a.get("sha256"), "accuracy": a.get("accuracy"),
            "model_file": a.get("model_file")}


def stray_tmp_files(output_dir: Path) -> list[str]:
    """Leftovers of atomic writes, '.<name>.<random>.tmp', anywhere under output_dir."""
    return sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob(".*.tmp"))


def cached(output_dir: Path) -> list[str]:
    cache = output_dir / "cache"
    return sorted(p.name.split("-")[0] for p in cache.iterdir()) if cache.exists() else []


class CountingEval:
    """Wraps an eval callback; records every path it is called on, optionally sleeping first."""

    def __init__(self, evaluate, sleep: float = 0.0):
        self.evaluate, self.sleep = evaluate, sleep
        self.paths: list[str] = []

    def __call__(self, path: str) -> float:
        self.paths.append(path)
        if self.sleep:
            time.sleep(self.sleep)
        return self.evaluate(path)


class CountingData:
    """A calibration callable (fresh generator per call) that counts the feeds actually drawn."""

    def __init__(self, task: DemoTask):
        self.task = task
        self.calls = 0
        self.feeds = 0

    def __call__(self):
        self.calls += 1
        for feed in self.task.calibration_data():
            self.feeds += 1
            yield feed


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL at varied moments, then resume to completion
# ---------------------------------------------------------------------------------------------

HELPER = textwrap.dedent('''
    import sys, time
    from pathlib import Path

    task_dir, out_dir, marker_dir = map(Path, sys.argv[1:4])

    from autoquant import optimize
    from autoquant.demo import DemoTask

    t = DemoTask(task_dir)

    def calibration_data():
        # marks that calibration data is being read, and reads slowly so a kill can land here
        for feed in t.calibration_data():
            (marker_dir / "calibrating").touch()
            time.sleep(0.03)
            yield feed

    def slow_eval(path):
        time.sleep(0.15)
        value = t.evaluate(path)
        if path == str(t.model_path):  # the fp32 baseline: optimize() records it right after we return
            (marker_dir / "baseline_scored").touch()
        return value

    (marker_dir / "ready").touch()
    r = optimize(t.model_path, calibration_data, slow_eval, n_trials=12, output_dir=out_dir,
                 show_progress=False, seed=0)
    print("DONE", r.trial_number, r.accuracy, flush=True)
''')

N_TRIALS = 12


def _alive_or_fail(proc: subprocess.Popen, what: str) -> bool:
    if proc.poll() is None:
        return True
    if proc.returncode != 0:
        raise AssertionError(f"helper failed (rc={proc.returncode}) while waiting for {what}: "
                             f"{proc.stderr.read().decode()[-3000:]}")
    return False


def _wait_for_marker(path: Path, proc: subprocess.Popen, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if not _alive_or_fail(proc, path.name):
            raise AssertionError(f"helper finished before {path.name}")
        assert time.monotonic() < deadline, f"helper never reached {path.name}"
        time.sleep(0.002)


def _wait_for_all_complete(out: Path, proc: subprocess.Popen, limit: float = 30.0) -> None:
    """Until the child's study holds N_TRIALS COMPLETE trials: it is then delivering."""
    deadline = time.monotonic() + limit
    while _alive_or_fail(proc, "all trials complete"):
        study = peek_study(out)
        if study is not None and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= N_TRIALS:
            return
        assert time.monotonic() < deadline, "helper never completed its trials"
        time.sleep(0.002)


def _wait_for_tmp_file(out: Path, proc: subprocess.Popen, limit: float = 30.0) -> None:
    """Until an atomic write is in progress in output_dir (its temp file is visible)."""
    deadline = time.monotonic() + limit
    while _alive_or_fail(proc, "a temp file") and not (out.exists() and stray_tmp_files(out)):
        assert time.monotonic() < deadline, "helper never wrote a file"
        time.sleep(0.0005)


def test_sigkill_then_resume(tmp_path):
    script = tmp_path / "run_optimize.py"
    script.write_text(HELPER)
    task_dir, out, markers = tmp_path / "task", tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    (tmp_path / "systmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "systmp"))  # temp dirs a killed child leaves stay in tmp_path
    cmd = [sys.executable, str(script), str(task_dir), str(out), str(markers)]
    rng = random.Random(20240611)
    # (what to wait for, delay after it):
    #  - in the statistics collection pass (after the ~0.25 s fingerprint pass over the slowed feeds),
    #  - just after the fp32 baseline was scored, while optimize() records it in the study,
    #  - three seeded random moments after start-up (sensitivity, trials),
    #  - as soon as all trials are COMPLETE, i.e. while the result is being delivered,
    #  - in a rerun that only re-delivers, the moment one of its atomic writes is in progress.
    rounds = ([("calibrating", 0.35), ("baseline_scored", 0.005)]
              + [("ready", rng.uniform(0.5, 1.6)) for _ in range(3)] + [("all_complete", 0.0), ("tmp_file", 0.0)])
    log = []
    for i, (marker, delay) in enumerate(rounds):
        for m in markers.iterdir():
            m.unlink()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            if marker == "all_complete":
                _wait_for_all_complete(out, proc)
            elif marker == "tmp_file":
                _wait_for_tmp_file(out, proc)
            else:
                _wait_for_marker(markers / marker, proc)
            time.sleep(delay)
            killed = proc.poll() is None
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)  # reap: a zombie would still look alive to the stale-trial check
            proc.stdout.close()
            proc.stderr.close()
        study = peek_study(out)
        trials = study.get_trials(deepcopy=False) if study else []
        states = {s.name: n for s in TrialState if (n := sum(t.state == s for t in trials))}
        log.append(f"round {i}: {marker}+{delay:.3f}s killed={killed} rc={proc.returncode} trials={states} "
                   f"study_attrs={len(study.user_attrs) if study else 0}/{len(STUDY_ATTRS)} cache={cached(out)} "
                   f"tmp={stray_tmp_files(out) if out.exists() else []}")
        assert not killed or proc.returncode == -signal.SIGKILL, log[-1]
    history = "\n".join(log)
    print(history)  # visible with -s: where each kill landed
    assert sum(" killed=True" in line for line in log) >= 4, history

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"{history}\nfinal run failed:\n{done.stderr[-2500:]}"
    assert "DONE" in done.stdout

    study = load_study(out)
    problems = []  # collected so one run reports every broken guarantee
    # the study's record of the fp32 baseline is complete: a kill while it was being written must
    # not leave a study that later runs trust but cannot use
    missing = sorted(STUDY_ATTRS - set(study.user_attrs))
    if missing:
        problems.append(f"study user_attrs missing {missing}")
    # no half-written atomic-write leftovers of the killed processes
    if stray_tmp_files(out):
        problems.append(f"stray temp files after the final run: {stray_tmp_files(out)}")
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == N_TRIALS, (states, history)
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, (states, history)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), numbers
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("fail_reason"), t

    # delivered files exist and parse
    result = json.loads((out / "result.json").read_text())
    model_path = out / "quantized.onnx"
    onnx.checker.check_model(onnx.load(str(model_path)))
    enc = json.loads((out / "quantized.encodings.json").read_text())
    assert enc["activation_encodings"] and enc["param_encodings"]
    report = pd.read_csv(out / "report.csv")
    assert (report["state"] == "COMPLETE").sum() == N_TRIALS
    assert sorted(report["trial"]) == sorted(numbers)
    assert result["study_name"] == study.study_name

    # the delivered file is, byte for byte, the chosen COMPLETE trial's file
    assert sha256_file(model_path) == result["sha256"]
    chosen = study.trials[result["trial_number"]]
    assert chosen.number == result["trial_number"] and chosen.state == TrialState.COMPLETE
    row = report[report["trial"] == result["trial_number"]].iloc[0]
    assert sha256_file(out / row["model_file"]) == result["sha256"]
    assert row["accuracy"] == result["accuracy"] == chosen.values[0]

    # ... and scores exactly what result.json says
    assert DemoTask(task_dir).evaluate(str(model_path)) == result["accuracy"]

    assert not problems, "\n".join(problems) + "\n" + history


# ---------------------------------------------------------------------------------------------
# 2. rerunning with a larger n_trials runs only the missing trials
# ---------------------------------------------------------------------------------------------

def test_resume_runs_only_missing_trials(demo, tmp_path):
    out = tmp_path / "out"
    ev1 = CountingEval(demo.evaluate)
    r1 = optimize(demo.model_path, demo.calibration_data, ev1, n_trials=4, output_dir=out, show_progress=False)
    first = [snapshot(t) for t in r1.study.get_trials(deepcopy=True)]
    assert [s["state"] for s in first] == [TrialState.COMPLETE] * 4
    assert ev1.paths[0] == str(demo.model_path)  # the fp32 baseline is scored first
    assert r1.eval_calls == len(ev1.paths)

    passes = stats_mod.PASSES
    ev2 = CountingEval(demo.evaluate)
    r2 = optimize(demo.model_path, demo.calibration_data, ev2, n_trials=6, output_dir=out, show_progress=False)
    assert stats_mod.PASSES == passes, "statistics were collected again instead of loaded from the cache"

    trials = r2.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert [snapshot(t) for t in trials[:4]] == first
    assert [snapshot(t) for t in load_study(out).get_trials(deepcopy=False)[:4]] == first
    assert r2.baseline_accuracy == r1.baseline_accuracy
    assert str(demo.model_path) not in ev2.paths, "the fp32 baseline was measured again"
    new = trials[4:]
    reused = [t for t in new if info(t).get("reused_from") is not None]  # byte-identical file: no eval needed
    assert sorted(ev2.paths) == sorted(str(out / info(t)["model_file"]) for t in new if t not in reused)
    assert len(ev2.paths) == 2 - len(reused)
    assert r2.eval_calls == len(ev2.paths)

    # a third call with the same n_trials does no work at all
    ev3 = CountingEval(demo.evaluate)
    r3 = optimize(demo.model_path, demo.calibration_data, ev3, n_trials=6, output_dir=out, show_progress=False)
    assert ev3.paths == [] and r3.eval_calls == 0
    assert len(r3.study.get_trials(deepcopy=False)) == 6
    assert stats_mod.PASSES == passes


# ---------------------------------------------------------------------------------------------
# 3. calibration statistics: one collection pass per study, independent of n_trials
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:no trial met allowed_accuracy_drop")  # n_trials=1: only naive int8
def test_stats_collected_once_per_study(demo, tmp_path):
    per_pass = sum(1 for _ in demo.calibration_data())
    drawn = {}
    for n_trials in (5, 1):
        data = CountingData(demo)
        passes = stats_mod.PASSES
        r = optimize(demo.model_path, data, demo.evaluate, n_trials=n_trials, output_dir=tmp_path / f"n{n_trials}",
                     show_progress=False)
        assert len(r.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == n_trials
        assert stats_mod.PASSES - passes == 1, f"n_trials={n_trials}: {stats_mod.PASSES - passes} collection passes"
        # at most one fingerprint pass + one collection pass; no calibration inference per trial
        assert per_pass <= data.feeds <= 2 * per_pass, f"n_trials={n_trials}: drew {data.feeds} feeds"
        drawn[n_trials] = data.feeds
    assert drawn[5] == drawn[1]


# ---------------------------------------------------------------------------------------------
# 4. timeout
# ---------------------------------------------------------------------------------------------

def test_timeout_honoured(demo, tmp_path):
    out = tmp_path / "out"
    ev = CountingEval(demo.evaluate, sleep=0.2)
    t0 = time.perf_counter()
    r = optimize(demo.model_path, demo.calibration_data, ev, n_trials=1000, timeout=3, output_dir=out,
                 show_progress=False)
    wall = time.perf_counter() - t0
    assert wall < 12, f"optimize(timeout=3) took {wall:.1f} s"
    assert wall >= 3 - 0.05, f"stopped after {wall:.1f} s, before both the 3 s budget and the 1000 trials"
    complete = r.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert 1 <= len(complete) < 1000
    assert r.trial_number in {t.number for t in complete}
    assert sha256_file(r.model_path) == json.loads((out / "result.json").read_text())["sha256"]
    assert demo.evaluate(r.model_path) == r.accuracy


# ---------------------------------------------------------------------------------------------
# 5. determinism
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_trials(demo, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = optimize(demo.model_path, demo.calibration_data, demo.evaluate, n_trials=6, seed=0, output_dir=out,
                     show_progress=False)
        trials = r.study.get_trials(deepcopy=False)
        runs.append({
            "params": [(t.number, t.state, dict(t.params)) for t in trials],
            "values": [list(t.values or []) for t in trials],
            "chosen": r.trial_number,
            "model": (out / "quantized.onnx").read_bytes(),
            "encodings": (out / "quantized.encodings.json").read_bytes(),
        })
    a, b = runs
    assert a["params"] == b["params"]
    assert a["values"] == b["values"]
    assert a["chosen"] == b["chosen"]
    assert a["model"] == b["model"], "delivered quantized.onnx differs between two runs with the same seed"
    assert a["encodings"] == b["encodings"]
