"""`autoquant worker`: join a study that optimize() created, from another process or machine.

Everything a worker needs is recorded in the study (model path, output dir, how to import the eval
callback and the calibration data, the settings); the storage is Optuna's (Journal file, SQLite,
PostgreSQL). Each worker runs trials until the study holds its n_trials COMPLETE trials.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna

from .errors import ConfigError, StorageError
from .launch import load_callable, resolve_calibration
from .result import OptimizeResult
from .study import open_storage


def run_worker(storage: str, study_name: str, n_trials: int | None = None, timeout: float | None = None,
               show_progress: bool = True, wait: float = 60.0) -> OptimizeResult:
    """Run trials of ``study_name`` in ``storage`` until it is complete; returns what optimize() returns.

    ``wait``: seconds to wait for the creating optimize() call to record the study before giving up.
    """
    from .api import STUDY_ATTRS, optimize

    st = open_storage(storage, Path("."))
    deadline = time.monotonic() + wait
    while True:
        try:
            study = optuna.load_study(study_name=study_name, storage=st)
            attrs = study.user_attrs
        except KeyError:
            attrs = None
        if attrs is not None and STUDY_ATTRS <= set(attrs):
            break
        if time.monotonic() > deadline:
            raise StorageError(f"study {study_name!r} in {storage!r} does not exist or was not set up by "
                               "autoquant optimize(); start it with optimize() / `autoquant optimize` first")
        time.sleep(0.5)
    launch = attrs["launch"]
    if not launch.get("eval_ref"):
        raise ConfigError(f"study {study_name!r} was started with an eval callback that cannot be imported by "
                          "another process (a lambda, a method or a local function); pass a module-level function "
                          "or use `autoquant optimize --eval module:function`")
    if not launch.get("calibration_ref"):
        raise ConfigError(f"study {study_name!r} was started with calibration data held in memory; pass a module-level "
                          "callable returning the feeds, or `autoquant optimize --calib file.npz`")
    return optimize(
        launch["model_path"], resolve_calibration(launch["calibration_ref"]), load_callable(launch["eval_ref"]),
        allowed_accuracy_drop=attrs["allowed_accuracy_drop"], drop_type=attrs["drop_type"],
        higher_is_better=attrs["higher_is_better"], search_space=attrs["search_space"],
        n_trials=int(n_trials or launch["n_trials"]), timeout=timeout,
        seed=int(attrs["seed"]) + os.getpid(),  # a worker's own random stream: equal seeds would repeat configs
        storage=storage, study_name=study_name, output_dir=launch["output_dir"], select=launch["select"],
        show_progress=show_progress, heartbeat_interval=launch["heartbeat_interval"],
        eval_timeout=launch.get("eval_timeout"), objective=attrs.get("objective", "size"),
        measure_latency=launch.get("measure_latency", True), prune=launch.get("prune", True),
        max_high_precision_fraction=launch.get("max_high_precision_fraction"),
        latency_threading=launch.get("latency_threading", "default"),
    )
