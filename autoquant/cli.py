"""Command line: autoquant optimize | report | demo."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import AutoQuantError, CalibrationDataError, ConfigError


def load_callable(spec: str) -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    if ":" not in spec:
        raise ConfigError(f"--eval must look like module:function or file.py:function, got {spec!r}")
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            import importlib.util

            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"--eval file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.path.insert(0, str(path.parent.resolve()))
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot import {mod_name!r} for --eval: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{mod_name!r} has no callable {fn_name!r}")
    return fn


def calibration_from_path(path: str, batch_size: int = 1):
    """A directory of .npz files (one feed each, sorted by name) or one .npz whose arrays are split
    along axis 0 into feeds of ``batch_size`` samples. Returns a callable giving a fresh iterator."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise CalibrationDataError(f"--calib directory {p} holds no .npz files")

        def feeds():
            for f in files:
                with np.load(f) as z:
                    yield {k: z[k] for k in z.files}

        return feeds
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as z:
            sizes = {k: z[k].shape[0] if z[k].ndim else 0 for k in z.files}
        if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise CalibrationDataError(f"--calib {p}: every array needs the same number of samples on axis 0, got {sizes}")
        n = next(iter(sizes.values()))

        def feeds():
            with np.load(p) as z:
                arrays = {k: z[k] for k in z.files}
            for i in range(0, n, batch_size):
                yield {k: v[i : i + batch_size] for k, v in arrays.items()}

        return feeds
    raise CalibrationDataError(f"--calib must be a directory of .npz files or one .npz file, got {path}")


def _cmd_optimize(args) -> int:
    from .api import optimize

    result = optimize(
        args.model, calibration_from_path(args.calib, args.calib_batch_size), load_callable(args.eval),
        allowed_accuracy_drop=args.drop, drop_type=args.drop_type, higher_is_better=not args.lower_is_better,
        search_space=args.space, n_trials=args.n_trials, timeout=args.timeout, seed=args.seed,
        storage=args.storage, study_name=args.study_name, output_dir=args.output_dir, select=args.select,
        show_progress=not args.quiet,
    )
    print(result.summary())
    return 0 if result.feasible else 3


def _cmd_report(args) -> int:
    import optuna

    from .report import trials_frame
    from .study import open_storage

    out = Path(args.output_dir)
    info_path = out / "autoquant.json"
    if not info_path.exists():
        raise ConfigError(f"{out} holds no autoquant study (no autoquant.json); run `autoquant optimize` first")
    info = json.loads(info_path.read_text())
    storage = open_storage(args.storage or info.get("storage") if (args.storage or info.get("storage")) else None, out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=info["study_name"], storage=storage)
    higher = bool(study.user_attrs.get("higher_is_better", True))
    df = trials_frame(study, all_trials=args.all, higher_is_better=higher)
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(df.drop(columns=["fail_reason"] if not args.all else []).to_string(index=False))
    return 0


def _cmd_demo(args) -> int:
    from .api import optimize
    from .demo import DemoTask

    folder = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="autoquant-demo-"))
    task = DemoTask(folder / "task")
    result = optimize(str(task.model_path), task.calibration_data, task.evaluate, allowed_accuracy_drop=0.01,
                      n_trials=args.n_trials, seed=args.seed, output_dir=folder / "out", show_progress=not args.quiet)
    print(f"autoquant demo: {result.summary()}")
    print(f"  config: {json.dumps(result.config)}")
    print(f"  eval calls: {result.eval_calls}, outputs in {folder / 'out'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autoquant", description="Automatic quantization search for ONNX models.")
    sub = ap.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="search quantization configs and deliver the best feasible model")
    o.add_argument("model", help="float .onnx model")
    o.add_argument("--calib", required=True, help="directory of .npz feeds, or one .npz split along axis 0")
    o.add_argument("--calib-batch-size", type=int, default=1, help="samples per feed when --calib is one .npz")
    o.add_argument("--eval", required=True, help="module:function or file.py:function, f(model_path) -> float")
    o.add_argument("--drop", type=float, default=0.01, help="allowed accuracy drop (default 0.01)")
    o.add_argument("--drop-type", choices=["absolute", "relative"], default="absolute")
    o.add_argument("--lower-is-better", action="store_true", help="the metric is a loss / error rate")
    o.add_argument("--space", default="default", help="preset name or .yaml/.json space file")
    o.add_argument("--n-trials", type=int, default=50)
    o.add_argument("--timeout", type=float, default=None, help="seconds for this run")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the output dir)")
    o.add_argument("--study-name", default=None)
    o.add_argument("--output-dir", default="autoquant_out")
    o.add_argument("--select", choices=["smallest", "most_accurate"], default="smallest")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.set_defaults(func=_cmd_optimize)

    r = sub.add_parser("report", help="print the Pareto table of a study in an output dir")
    r.add_argument("output_dir")
    r.add_argument("--all", action="store_true", help="every trial, not only the Pareto front")
    r.add_argument("--storage", default=None)
    r.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo", help="tiny bundled model + data, a real short search (no downloads)")
    d.add_argument("--output-dir", default=None)
    d.add_argument("--n-trials", type=int, default=12)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoQuantError as exc:
        print(f"autoquant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
