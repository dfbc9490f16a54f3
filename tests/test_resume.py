"""Resume, crash recovery, statistics caching, timeout and determinism of optimize().

The SIGKILL test starts a 30-trial study in a child process and SIGKILLs it 10 times, resuming each
time: aimed at the calibration statistics pass, at a trial's model build, at the user's eval and at
the writing of the delivered files, plus random moments; it records where each kill landed. At the
end: exactly 30 COMPLETE trials, none RUNNING, no config evaluated twice (except a killed trial's
retry or the byte-identical reuse), every file in output_dir parses after every kill, and the
delivered model, encodings and report are consistent (re-evaluating the model gives the reported
accuracy).
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
from collections import Counter
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
# 1. SIGKILL at 10 moments of a 30-trial study, resuming each time
# ---------------------------------------------------------------------------------------------
#
# The child process runs optimize() on the demo task through a small harness that (a) appends the
# phase it is in to a log file, one write(2) per line so the last line survives a SIGKILL, and
# (b) slows four places down so a kill can be aimed at them: each calibration feed, the write of a
# trial's model file (inside build_qdq_model's atomic write: half the bytes, a pause, the rest, as a
# slow disk would), the user's eval, and the writes of the delivered files. Nothing in autoquant,
# ONNX Runtime or Optuna is replaced; the wrappers call the real functions.

HELPER = textwrap.dedent(r'''
    import os, sys, time
    from pathlib import Path

    task_dir, out_dir, phase_path = map(Path, sys.argv[1:4])
    n_trials = int(sys.argv[4])
    FEED_S, BUILD_S, EVAL_S, WRITE_S = map(float, sys.argv[5:9])
    _log = open(phase_path, "a", buffering=1)

    def phase(name, detail=""):
        _log.write(f"{name} {detail}\n")  # line buffered: one write(2) per line, kept by a SIGKILL

    phase("startup")
    import autoquant._io as aq_io
    import autoquant.api as aq_api
    import autoquant.build as aq_build
    import autoquant.objective as aq_objective
    from autoquant import optimize
    from autoquant._io import sha256_file
    from autoquant.demo import DemoTask

    t = DemoTask(task_dir)
    DELIVERED = {"quantized.onnx", "quantized.encodings.json", "report.csv", "result.json"}

    def slow_disk(write, delay, where):
        def w(tmp):
            write(tmp)
            data = Path(tmp).read_bytes()
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                phase(where, f"half-written {Path(tmp).name}")
                time.sleep(delay)
                f.write(data[len(data) // 2:])
        return w

    real_build_write = aq_build.atomic_write  # build_qdq_model's atomic write of trials/trial_NNNNN.onnx
    def build_write(path, write):
        if Path(path).name.startswith("trial_"):
            write = slow_disk(write, BUILD_S, "build")
        return real_build_write(path, write)
    aq_build.atomic_write = build_write

    real_io_write = aq_io.atomic_write  # used by atomic_copy / atomic_write_json / save_csv
    def io_write(path, write):
        if Path(path).name in DELIVERED and Path(path).parent.resolve() == out_dir.resolve():
            write = slow_disk(write, WRITE_S, "outputs")
        return real_io_write(path, write)
    aq_io.atomic_write = io_write

    real_build = aq_objective.build_qdq_model
    def traced_build(prepared_path, ranges, config, out_path, *args, **kwargs):
        phase("build", Path(out_path).name)
        info = real_build(prepared_path, ranges, config, out_path, *args, **kwargs)
        phase("trial", f"built {Path(out_path).name}")
        return info
    aq_objective.build_qdq_model = traced_build

    real_call = aq_objective.Objective.__call__
    def traced_call(self, trial):
        phase("trial", f"start {trial.number}")
        try:
            return real_call(self, trial)
        finally:
            phase("optuna", f"end {trial.number}")  # Optuna records the result after we return
    aq_objective.Objective.__call__ = traced_call

    real_deliver = aq_api._deliver
    def traced_deliver(*args, **kwargs):
        phase("outputs", "start")
        result = real_deliver(*args, **kwargs)
        phase("done")
        return result
    aq_api._deliver = traced_deliver

    passes = [0]
    def calibration_data():
        passes[0] += 1
        for i, feed in enumerate(t.calibration_data()):
            phase("calibration", f"pass {passes[0]} feed {i}")
            time.sleep(FEED_S)
            yield feed
        phase("setup", f"pass {passes[0]} read")

    def slow_eval(path):
        baseline = path == str(t.model_path)
        phase("baseline_eval" if baseline else "eval", Path(path).name)
        time.sleep(EVAL_S)
        value = t.evaluate(path)
        phase("setup" if baseline else "trial", f"scored {Path(path).name} {sha256_file(path)} {value!r}")
        return value

    phase("setup", "optimize() called")
    # prune=False: every trial gets the full eval, so the study ends with exactly n_trials COMPLETE trials
    r = optimize(t.model_path, calibration_data, slow_eval, n_trials=n_trials, output_dir=out_dir,
                 show_progress=False, seed=0, heartbeat_interval=0.5, prune=False)
    print("DONE", r.trial_number, r.accuracy, flush=True)
''')

N_TRIALS = 30
N_KILLS = 10
# seconds: per calibration feed (8 feeds per pass), trial-file write, eval call, delivered-file write
SLOW = {"feed": 0.03, "build": 0.06, "eval": 0.12, "write": 0.2}
TARGETED = ("calibration", "build", "eval", "outputs")


def kill_plan(rng: random.Random, n_kills: int = N_KILLS) -> list[dict]:
    """Where to aim each kill. The first is in the fresh run's statistics collection pass, the last two
    while the delivered files are written (the study is complete by then); the rest, shuffled: twice
    in a trial's model build, twice in the user's eval, once at a random time after start-up and the
    others at random times after the run's first trial started (short enough that the study is not
    complete before the last two kills)."""
    middle = ([{"target": "build", "nth": rng.randint(1, 3)} for _ in range(2)]
              + [{"target": "eval", "nth": rng.randint(1, 3)} for _ in range(2)]
              + [{"target": "random", "after": "start-up", "delay": rng.uniform(0.2, 3.0)}]
              + [{"target": "random", "after": "trial", "delay": rng.uniform(0.0, 2.0)} for _ in range(n_kills - 8)])
    rng.shuffle(middle)
    return ([{"target": "calibration", "feed": rng.randint(0, 6)}] + middle
            + [{"target": "outputs", "file": "quantized.onnx"}, {"target": "outputs", "file": "result.json"}])


def phase_lines(path: Path) -> list[tuple[str, str]]:
    """(phase, detail) per complete line of a child's phase log."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last element is an unfinished line (or "")
    return [(name, detail.strip()) for name, _, detail in (line.partition(" ") for line in lines)]


def _own_tmp(folder: Path, pid: int, prefixes: tuple[str, ...]) -> list[Path]:
    """Temp files of atomic writes by process ``pid`` in ``folder`` whose name starts with a prefix."""
    if not folder.is_dir():
        return []
    tag = f"-{pid}."
    return [Path(e.path) for e in os.scandir(folder)
            if e.name.endswith(".tmp") and tag in e.name and e.name.startswith(prefixes)]


def _wait(proc: subprocess.Popen, what: str, ready, limit: float = 60.0, poll: float = 0.002):
    """Poll ``ready()`` until it returns something truthy; fail if the child exits or time runs out."""
    deadline = time.monotonic() + limit
    while True:
        got = ready()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"child exited (rc={proc.returncode}) before {what}: "
                                 f"{proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"child never reached {what}"
        time.sleep(poll)


def aim(proc: subprocess.Popen, plan: dict, log_path: Path, out: Path, rng: random.Random) -> str:
    """Wait for the moment ``plan`` aims at; returns a description of it."""
    target = plan["target"]
    if target == "calibration":  # pass 1 fingerprints the feeds, pass 2 collects statistics
        want = ("calibration", f"pass 2 feed {plan['feed']}")
        _wait(proc, "the statistics pass", lambda: want in phase_lines(log_path))
        time.sleep(rng.uniform(0, SLOW["feed"] / 2))
        return f"statistics pass, feed {plan['feed']}"
    if target == "build":  # the nth (or, if that one was missed, a later) build of this run is writing
        def building():     # its model file, half of it so far
            lines = phase_lines(log_path)
            builds = [d for p, d in lines if p == "build" and not d.startswith("half-written")]
            if len(builds) < plan["nth"] or lines[-1][0] != "build" or not lines[-1][1].startswith("half-written"):
                return None
            folders = [d for d in (out / "trials").glob("*") if d.is_dir()]  # the study's trial folder
            return [p for d in folders for p in _own_tmp(d, proc.pid, (f".{builds[-1]}.",))] or None  # its temp file
        tmp = _wait(proc, f"build #{plan['nth']}", building, poll=0.0005)
        time.sleep(rng.uniform(0, SLOW["build"] / 2))
        return f"build #{plan['nth']} of this run, {tmp[0].name.split('.')[1]} temp file present"
    if target == "eval":
        _wait(proc, f"eval #{plan['nth']}",
              lambda: sum(p == "eval" for p, _ in phase_lines(log_path)) >= plan["nth"])
        time.sleep(rng.uniform(0, SLOW["eval"] * 0.7))
        return f"eval #{plan['nth']} of this run"
    if target == "outputs":
        prefix = f".{plan['file']}."

        def writing():
            lines = phase_lines(log_path)
            if not lines or lines[-1][0] != "outputs" or not lines[-1][1].startswith(f"half-written {prefix}"):
                return None
            return _own_tmp(out, proc.pid, (prefix,))  # its temp file
        _wait(proc, f"writing {plan['file']}", writing, poll=0.0005)
        time.sleep(rng.uniform(0, SLOW["write"] / 2))
        return f"writing {plan['file']} (temp file present)"
    if plan["after"] == "start-up":
        _wait(proc, "start-up", lambda: ("setup", "optimize() called") in phase_lines(log_path))
    else:
        _wait(proc, "a trial", lambda: any(p == "trial" for p, _ in phase_lines(log_path)))
    time.sleep(plan["delay"])
    return f"{plan['delay']:.2f} s after {plan['after']}"


def check_files_parse(out: Path) -> list[str]:
    """Every finished (non-temp) JSON / ONNX / NPZ / CSV file under out parses; returns the problems."""
    import numpy as np

    problems = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".onnx":
                onnx.checker.check_model(onnx.load(str(p)))
            elif p.suffix == ".npz":
                with np.load(p) as z:
                    for k in z.files:
                        z[k]
            elif p.suffix == ".csv":
                pd.read_csv(p)
        except Exception as exc:
            problems.append(f"{p.relative_to(out)} ({p.stat().st_size} bytes) does not parse: "
                            f"{type(exc).__name__}: {exc}"[:300])
    return problems


def run_kill_loop(workdir: Path, n_trials: int = N_TRIALS, n_kills: int = N_KILLS, seed: int = 20240611,
                  echo=None) -> dict:
    """Start optimize() in a child, SIGKILL it ``n_kills`` times at the moments of kill_plan(), then let
    one last run finish. Returns what happened (used by the test and by experiments/bench_reliability.py)."""
    script = workdir / "run_optimize.py"
    script.write_text(HELPER)
    task_dir, out, logs = workdir / "task", workdir / "out", workdir / "phases"
    logs.mkdir()
    (workdir / "systmp").mkdir()
    env = dict(os.environ, TMPDIR=str(workdir / "systmp"))  # temp dirs a killed child leaves stay in workdir
    rng = random.Random(seed)
    plans = kill_plan(rng, n_kills)
    rounds = []
    t0 = time.monotonic()
    for i, plan in enumerate(plans):
        log_path = logs / f"round{i:02d}.log"
        cmd = [sys.executable, str(script), str(task_dir), str(out), str(log_path), str(n_trials),
               *(str(SLOW[k]) for k in ("feed", "build", "eval", "write"))]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            moment = aim(proc, plan, log_path, out, rng)
            killed = proc.poll() is None
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)  # (also when aiming failed: never leave the child running)
            proc.wait(timeout=60)  # reap: a zombie would still look alive to the stale-trial check
            proc.stdout.close()
            proc.stderr.close()
        landed, detail = (phase_lines(log_path) or [("not started", "")])[-1]
        study = peek_study(out)
        trials = study.get_trials(deepcopy=False) if study else []
        states = {s.name: n for s in TrialState if (n := sum(t.state == s for t in trials))}
        rounds.append({
            "round": i, "target": plan["target"], "moment": moment, "killed": killed, "rc": proc.returncode,
            "landed": landed, "detail": detail.strip(), "trials": states, "cache": cached(out), "tmp_left": stray_tmp_files(out),
            "unparsable": check_files_parse(out) if out.exists() else [], "t": time.monotonic() - t0,
        })
        if echo:
            echo(format_round(rounds[-1]))
    final_log = logs / "final.log"
    cmd = [sys.executable, str(script), str(task_dir), str(out), str(final_log), str(n_trials),
           *(str(SLOW[k]) for k in ("feed", "build", "eval", "write"))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    return {"rounds": rounds, "out": out, "task_dir": task_dir, "final": done, "logs": logs,
            "seconds": time.monotonic() - t0}


def format_round(r: dict) -> str:
    return (f"round {r['round']}: aimed at {r['target']} ({r['moment']}) -> killed={r['killed']} rc={r['rc']} "
            f"landed in {r['landed']} [{r['detail'][:60]}] trials={r['trials']} cache={dict(Counter(r['cache']))} tmp_left={len(r['tmp_left'])} "
            f"unparsable={r['unparsable']} t={r['t']:.1f}s")


def evaluations(logs: Path) -> list[tuple[int, str, float]]:
    """(trial number, sha256 of the file, score) of every eval call that returned, from all runs."""
    out = []
    for path in sorted(logs.glob("*.log")):
        for p, d in phase_lines(path):
            if p == "trial" and d.startswith("scored "):
                _, name, sha, value = d.split()
                out.append((int(name[len("trial_"):-len(".onnx")]), sha, float(value)))
    return out


def test_sigkill_then_resume(tmp_path):
    check_kill_loop(run_kill_loop(tmp_path))


def check_kill_loop(run: dict, n_trials: int = N_TRIALS, n_kills: int = N_KILLS) -> dict:
    """Assert every guarantee after run_kill_loop(); returns a summary of what was checked."""
    rounds, out, done = run["rounds"], run["out"], run["final"]
    history = "\n".join(map(format_round, rounds))
    print(history)  # visible with -s: where each kill landed

    # ten kills, each a real SIGKILL of a live process, each aimed moment hit
    assert [r["killed"] for r in rounds] == [True] * n_kills, history
    assert all(r["rc"] == -signal.SIGKILL for r in rounds), history
    for r in rounds:
        if r["target"] != "random":
            assert r["landed"] == r["target"], f"round {r['round']} missed its phase\n{history}"
    assert set(TARGETED) <= {r["landed"] for r in rounds}, history
    # a kill never leaves a truncated file under its final name: every JSON / ONNX / NPZ / CSV parses
    broken = [f"round {r['round']}: {p}" for r in rounds for p in r["unparsable"]]
    assert not broken, "\n".join(broken) + "\n" + history
    # the kills during a write interrupted it: the half-written temp file is what was left behind
    for r in rounds:
        if r["target"] in ("build", "outputs"):
            assert r["detail"].startswith("half-written") and any(
                Path(f).name == r["detail"].split()[-1] for f in r["tmp_left"]), (r, history)

    assert done.returncode == 0, f"{history}\nfinal run failed:\n{done.stderr[-2500:]}"
    assert "DONE" in done.stdout

    study = load_study(out)
    problems = []  # collected so one run reports every broken guarantee
    missing = sorted(STUDY_ATTRS - set(study.user_attrs))
    if missing:
        problems.append(f"study user_attrs missing {missing}")
    if stray_tmp_files(out):
        problems.append(f"stray temp files after the final run: {stray_tmp_files(out)}")
    problems += check_files_parse(out)

    # exactly 30 COMPLETE, none RUNNING / WAITING, every FAIL a trial whose process was killed
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == n_trials, (states, history)
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, (states, history)
    assert set(states) <= {TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED}, (states, history)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), numbers
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) <= n_kills, (len(failed), history)
    for t in failed:
        assert "process died" in t.user_attrs.get("fail_reason", ""), (t.number, t.user_attrs)

    # every killed trial that had a config is retried exactly once, with the same config
    for t in failed:
        params = {**t.system_attrs.get("fixed_params", {}), **t.params}
        retries = [u for u in trials if u.user_attrs.get("retry_of") == t.number]
        if params:
            assert len(retries) == 1, (t.number, [u.number for u in retries])
            assert retries[0].params == params, (t.number, retries[0].params, params)
        else:
            assert not retries, (t.number, [u.number for u in retries])

    # none duplicated: among the COMPLETE trials, a config is evaluated once; a later trial with the
    # same config is either the retry of a killed trial or reuses the byte-identical scored file
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    by_number = {t.number: t for t in trials}
    first_eval: dict[str, int] = {}
    for t in complete:
        key = json.dumps(t.user_attrs["config"], sort_keys=True)
        reused = info(t).get("reused_from")
        if reused is not None:
            src = by_number[reused]
            assert src.state == TrialState.COMPLETE and info(src).get("reused_from") is None, (t.number, reused)
            assert info(src)["sha256"] == info(t)["sha256"] and src.values[0] == t.values[0], (t.number, reused)
            continue
        if key in first_eval and "retry_of" not in t.user_attrs:
            problems.append(f"trials {first_eval[key]} and {t.number} both evaluated config {key}")
        first_eval.setdefault(key, t.number)
    # ... and, from the child's own record of every eval call that returned: a model file is scored
    # more than once only when the trial of the earlier score was killed before it was recorded
    evals = evaluations(run["logs"])
    scored = {}
    for number, sha, value in evals:
        scored.setdefault(sha, []).append(number)
    assert len({n for n, _, _ in evals}) == len(evals), "a trial's eval returned twice"
    for sha, nums in scored.items():
        kept = [n for n in nums if by_number[n].state == TrialState.COMPLETE]
        lost = [n for n in nums if by_number[n].state != TrialState.COMPLETE]
        if len(kept) > 1:
            problems.append(f"model {sha[:12]} was scored by COMPLETE trials {kept}")
        for n in lost:
            assert by_number[n].state == TrialState.FAIL and "process died" in by_number[n].user_attrs["fail_reason"]
    for t in complete:  # a reused score really was not recomputed; an evaluated trial's score is the one logged
        logged = [v for n, _, v in evals if n == t.number]
        if info(t).get("reused_from") is not None:
            assert not logged, (t.number, logged)
        else:
            assert logged == [t.values[0]], (t.number, logged, t.values)

    # delivered model, encodings and report: present and consistent with the study and each other
    result = json.loads((out / "result.json").read_text())
    model_path = out / "quantized.onnx"
    onnx.checker.check_model(onnx.load(str(model_path)))
    delivered = onnx.load(str(model_path))
    from autoquant.deploy import DYNAMIC_OPS, deployment
    if any(n.op_type in DYNAMIC_OPS for n in delivered.graph.node):  # run-time scales: no encodings exist
        assert not (out / "quantized.encodings.json").exists() and result["encodings_path"] is None
    else:
        enc = json.loads((out / "quantized.encodings.json").read_text())
        ints = [e for e in enc["activation_encodings"] if e["dtype"] == "INT"]
        assert enc["param_encodings"]  # activation encodings too, unless the delivered model is weight-only
        assert bool(ints) == any(n.op_type == "QuantizeLinear" for n in delivered.graph.node)
        assert enc == json.loads(json.dumps(deployment(delivered)[1])), \
            "quantized.encodings.json does not describe quantized.onnx"
        assert result["roundtrip_max_abs_diff"] == 0.0
    report = pd.read_csv(out / "report.csv")
    assert (report["state"] == "COMPLETE").sum() == n_trials
    assert sorted(report["trial"]) == sorted(numbers)
    assert result["study_name"] == study.study_name
    for t in complete:
        row = report[report["trial"] == t.number].iloc[0]
        assert row["state"] == "COMPLETE" and row["accuracy"] == t.values[0], (t.number, row.to_dict())

    # the delivered file is, byte for byte, the chosen COMPLETE trial's file
    assert sha256_file(model_path) == result["sha256"]
    chosen = study.trials[result["trial_number"]]
    assert chosen.number == result["trial_number"] and chosen.state == TrialState.COMPLETE
    row = report[report["trial"] == result["trial_number"]].iloc[0]
    assert sha256_file(out / row["model_file"]) == result["sha256"]
    assert row["accuracy"] == result["accuracy"] == chosen.values[0]

    # ... and re-evaluating it gives the reported accuracy
    re_evaluated = DemoTask(run["task_dir"]).evaluate(str(model_path))
    assert re_evaluated == result["accuracy"]

    assert not problems, "\n".join(problems) + "\n" + history
    return {"kills": sum(r["killed"] for r in rounds), "landed": [r["landed"] for r in rounds],
            "complete": len(complete), "failed": len(failed),
            "retried": sum("retry_of" in t.user_attrs for t in trials),
            "reused": sum(info(t).get("reused_from") is not None for t in complete),
            "eval_calls_returned": len(evals), "evaluated_complete": len(first_eval),
            "delivered_trial": result["trial_number"], "accuracy": result["accuracy"], "re_evaluated": re_evaluated}


# ---------------------------------------------------------------------------------------------
# 2. rerunning with a larger n_trials runs only the missing trials
# ---------------------------------------------------------------------------------------------

def test_resume_runs_only_missing_trials(demo, tmp_path):
    out = tmp_path / "out"
    ev1 = CountingEval(demo.evaluate)
    r1 = optimize(demo.model_path, demo.calibration_data, ev1, n_trials=4, output_dir=out, show_progress=False, prune=False)
    first = [snapshot(t) for t in r1.study.get_trials(deepcopy=True)]
    assert [s["state"] for s in first] == [TrialState.COMPLETE] * 4
    assert ev1.paths[0] == str(demo.model_path)  # the fp32 baseline is scored first
    assert r1.eval_calls == len(ev1.paths)

    passes = stats_mod.PASSES
    ev2 = CountingEval(demo.evaluate)
    r2 = optimize(demo.model_path, demo.calibration_data, ev2, n_trials=6, output_dir=out, show_progress=False, prune=False)
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
    r3 = optimize(demo.model_path, demo.calibration_data, ev3, n_trials=6, output_dir=out, show_progress=False, prune=False)
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
                     show_progress=False, prune=False)
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
        # without latency measurement the search reads no timing: same trials, same files (with it, the
        # screening order, the repair and the latency constraint follow measured ratios)
        r = optimize(demo.model_path, demo.calibration_data, demo.evaluate, n_trials=6, seed=0, output_dir=out,
                     show_progress=False, measure_latency=False)
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


def test_stale_temp_files_of_dead_writers_are_removed_even_with_dotted_host_names(tmp_path, monkeypatch):
    import subprocess
    import sys

    from autoquant import _io

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setattr(_io.socket, "gethostname", lambda: "node1.cluster.local")
    stale = tmp_path / f".quantized.onnx.node1.cluster.local-{dead.pid}.ab12_x.tmp"
    mine = tmp_path / f".result.json.node1.cluster.local-{os.getpid()}.cd34.tmp"
    other_host = tmp_path / f".result.json.other.host-{dead.pid}.ef56.tmp"
    for f in (stale, mine, other_host):
        f.write_text("half")
    assert _io.remove_stale_tmp(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and other_host.exists()
