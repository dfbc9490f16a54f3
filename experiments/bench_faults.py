#!/usr/bin/env python
"""Fault injection (issue 13): does a study survive every fault, and what is lost?

On the bundled demo task (``autoquant.demo.DemoTask``), one study per fault:

1. an exception raised inside each stage in turn (the stages of ``autoquant/stages.py``, plus one trial's cost
   computation and the delivery outside every stage), in process;
2. SIGINT, SIGTERM and SIGKILL sent to an ``optimize()`` child process at random moments of its trials, then the
   same call rerun to the end;
3. a full disk (a 4 MB tmpfs, root only) during a trial's eval, then the rerun after space is freed.

Per fault the report gives whether the first call delivered, what it raised, whether the study finished (the
rerun, where there is one, reaches n_trials COMPLETE / PRUNED trials and delivers a file whose sha256 is the scored
trial's), and what was lost: COMPLETE trials of the first call missing afterwards, and leftover temp files.
Target: nothing lost anywhere.

    python experiments/bench_faults.py

Writes experiments/results/bench_faults.md (``--out``). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import code_state, loadavg, machine_info, md_table  # noqa: E402

SPACE = {"knobs": {"calibration": ["minmax", "percentile"], "weight_granularity": ["per_tensor", "per_channel"],
                   "fallback_k": [0, 1, 2]}}
N_TRIALS = 8
#: (fault, what to break, optimize() overrides) - the same list tests/test_stage_boundary.py injects
STAGE_FAULTS = [
    ("sensitivity", "autoquant.api.measure_sensitivity", {}),
    ("screening", "autoquant.objective.Objective.screen", {}),
    ("pre-scoring (SQNR)", "autoquant.prune.Pruner.sqnr", {}),
    ("latency", "autoquant.cost.SpeedMeter.measure", {}),
    ("repair", "autoquant.api.repair_point", {"allowed_accuracy_drop": 0.0}),
    ("encodings", "autoquant.api.write_deployment", {}),
    ("report CSV", "autoquant.api.save_csv", {}),
    ("one trial's cost (bug in a trial)", "autoquant.objective.bops", {"once": True}),
    ("delivery (outside the stages)", "autoquant.api._deliver", {}),
]

CHILD = r"""
import sys, time, warnings
from autoquant import optimize
from autoquant.demo import DemoTask
task = DemoTask(sys.argv[1])
def slow_eval(path):
    time.sleep(0.3)
    return task.evaluate(path)
warnings.simplefilter("ignore")
optimize(str(task.model_path), task.calibration_data, slow_eval, output_dir=sys.argv[2], n_trials=int(sys.argv[3]),
         search_space=__import__("json").loads(sys.argv[4]), show_progress=False, allowed_accuracy_drop=0.05)
"""


def _study(out: Path) -> optuna.Study | None:
    """The study in ``out``, opened the way autoquant opens it (its lock serialises SQLite schema creation with
    a child that may be creating it right now)."""
    from autoquant.study import open_storage

    if not (out / "study.db").exists():
        return None
    storage = open_storage(None, out)
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def _complete(out: Path) -> set[int]:
    study = _study(out)
    return {t.number for t in study.trials if t.state.name == "COMPLETE"} if study else set()


def _finished(out: Path) -> tuple[bool, str]:
    """n_trials done, and the delivered file is the scored trial's file."""
    study = _study(out)
    if study is None or not (out / "result.json").exists():
        return False, "no study / no result.json"
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    record = json.loads((out / "result.json").read_text())
    sha = hashlib.sha256((out / "quantized.onnx").read_bytes()).hexdigest()
    ok = sha == record["sha256"]
    return done >= N_TRIALS and ok, f"{done} done, delivered sha {'matches' if ok else 'DIFFERS'}"


def _tmp_left(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp"))


def _optimize(task, out: Path, **kw):
    from autoquant import optimize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize(str(task.model_path), task.calibration_data, task.evaluate, output_dir=out, n_trials=N_TRIALS,
                        search_space=SPACE, show_progress=False, **{"allowed_accuracy_drop": 0.05, **kw})


def stage_fault(task, work: Path, name: str, target: str, kw: dict) -> dict:
    import importlib

    out = work / f"stage-{len(list(work.iterdir()))}"
    module_name, attr = target.rsplit(".", 1)
    owner = None
    for cut in range(module_name.count(".") + 1, 0, -1):  # module.attr or module.Class.attr
        with contextlib.suppress(ModuleNotFoundError):
            mod = importlib.import_module(".".join(module_name.split(".")[:cut]))
            owner = mod
            for part in module_name.split(".")[cut:]:
                owner = getattr(owner, part)
            break
    real = getattr(owner, attr)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if kw.get("once") and len(calls) > 1:
            return real(*args, **kwargs)
        raise RuntimeError("injected fault")

    setattr(owner, attr, boom)
    try:
        first, error = _optimize(task, out, **{k: v for k, v in kw.items() if k != "once"}), None
    except Exception as exc:
        first, error = None, f"{type(exc).__name__}: {str(exc)[:90]}"
    finally:
        setattr(owner, attr, real)
    before = _complete(out)
    rerun = None
    if first is None:  # the user reruns the same call once the cause is gone
        _optimize(task, out, **{k: v for k, v in kw.items() if k != "once"})
        rerun = "rerun"
    finished, how = _finished(out)
    warned = [w for w in (first.warnings if first else []) if "injected" in w]
    return {"fault": f"exception in {name}", "first": "delivered" + (" with a warning" if warned else "")
            if first else f"raised {error}", "finished": finished, "how": how + (f" ({rerun})" if rerun else ""),
            "lost": sorted(before - _complete(out)), "tmp": _tmp_left(out)}


def signal_fault(task_dir: Path, work: Path, sig: signal.Signals, rng: random.Random) -> dict:
    out = work / f"signal-{sig.name}-{len(list(work.iterdir()))}"
    cmd = [sys.executable, "-c", CHILD, str(task_dir), str(out), str(N_TRIALS), json.dumps(SPACE)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_complete(out) if (out / "study.db").exists() else ()) < 2:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.6))  # a random moment of a later trial (build, SQNR, latency or the eval)
    before = _complete(out)
    proc.send_signal(sig)
    proc.wait(60)
    from autoquant.demo import DemoTask

    _optimize(DemoTask(task_dir), out)  # the same call, run to the end
    finished, how = _finished(out)
    return {"fault": f"{sig.name} during trial {max(before, default=-1) + 1}", "first": f"exit code {proc.returncode}",
            "finished": finished, "how": how + " (rerun)", "lost": sorted(before - _complete(out)),
            "tmp": _tmp_left(out)}


def disk_fault(task, work: Path) -> dict:
    mnt = work / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        return {"fault": "disk full", "first": "skipped: cannot mount a tmpfs", "finished": None, "how": "",
                "lost": [], "tmp": []}
    out, calls = mnt / "o", []

    def filling_eval(path):
        calls.append(path)
        if len(calls) == 3:
            with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
        return task.evaluate(path)

    from autoquant import optimize

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimize(str(task.model_path), task.calibration_data, filling_eval, output_dir=out, n_trials=N_TRIALS,
                     search_space=SPACE, show_progress=False, allowed_accuracy_drop=0.05)
        first = "delivered"
    except Exception as exc:
        first = f"raised {type(exc).__name__}: {str(exc)[:80]}"
    before = _complete(out)
    (mnt / "filler").unlink()
    _optimize(task, out)
    finished, how = _finished(out)
    row = {"fault": "disk full during trial 2's eval", "first": first, "finished": finished, "how": how + " (rerun)",
           "lost": sorted(before - _complete(out)), "tmp": _tmp_left(out)}
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the signal moments")
    ap.add_argument("--signals", type=int, default=2, help="runs per signal")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_faults.md")
    args = ap.parse_args()
    from autoquant.demo import DemoTask

    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        work = Path(tmp) / "runs"
        work.mkdir()
        task_dir = Path(tmp) / "task"
        task = DemoTask(task_dir)
        for name, target, kw in STAGE_FAULTS:
            rows.append(stage_fault(task, work, name, target, kw))
            print(rows[-1], flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            for _ in range(args.signals):
                rows.append(signal_fault(task_dir, work, sig, rng))
                print(rows[-1], flush=True)
        rows.append(disk_fault(task, work))
        print(rows[-1], flush=True)
    info = machine_info()
    cmd = "python experiments/bench_faults.py" + "".join(f" {a}" for a in sys.argv[1:])
    lost_any = any(r["lost"] or r["tmp"] for r in rows)
    unfinished = [r["fault"] for r in rows if r["finished"] is False]
    md = "\n".join([
        "# Fault injection: does the study survive, and what is lost?", "", "```", cmd, "```", "",
        f"- {code_state()}; machine {info['cpu']}, {info['cores']} cores, load {loadavg()}; "
        f"{(time.perf_counter() - t0) / 60:.1f} min",
        f"- the demo task, n_trials={N_TRIALS}, space {json.dumps(SPACE)}; signals sent at a random moment after two "
        f"trials completed (seed {args.seed})", "",
        md_table(["fault", "first call", "study finished", "how", "COMPLETE trials lost", "temp files left"],
                 [[r["fault"], r["first"], {True: "yes", False: "NO", None: "-"}[r["finished"]], r["how"],
                   ", ".join(map(str, r["lost"])) or "none", ", ".join(r["tmp"]) or "none"] for r in rows]), "",
        f"Target (nothing lost, every study finished): {'met' if not lost_any and not unfinished else 'NOT met'}"
        + (f"; unfinished: {unfinished}" if unfinished else ""), ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
