"""Command line: autoquant optimize | report | demo."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .errors import AutoQuantError, ConfigError
from .formats import FORMATS
from .launch import calibration_from_path, load_callable


def _cmd_optimize(args) -> int:
    from .api import optimize

    result = optimize(
        args.model, calibration_from_path(args.calib, args.calib_batch_size), load_callable(args.eval),
        allowed_accuracy_drop=args.drop, drop_type=args.drop_type, higher_is_better=not args.lower_is_better,
        search_space=args.space, n_trials=args.n_trials, timeout=args.timeout, seed=args.seed,
        storage=args.storage, study_name=args.study_name, output_dir=args.output_dir, select=args.select,
        show_progress=not args.quiet, heartbeat_interval=args.heartbeat, eval_timeout=args.eval_timeout,
        objective=args.objective, measure_latency=not args.no_latency, prune=not args.no_prune,
        stop_when_feasible=args.stop_when_feasible, max_high_precision_fraction=args.max_high_precision_fraction,
        target=args.target, baseline_accuracy=args.baseline_accuracy, latency_threading=args.latency_threading,
    )
    _print_result(result)
    return 0 if result.feasible else 3


def _print_result(result, prefix: str = "") -> None:
    """The summary line, then each of the result's warnings (slower than fp32, infeasible) on its own line."""
    print(f"{prefix}{result.summary()}")
    for note in result.warnings:
        print(f"warning: {note}")


def _cmd_report(args) -> int:
    import optuna

    from .report import trials_frame
    from .study import open_storage

    out = Path(args.output_dir)
    info_path = out / "autoquant.json"
    if not info_path.exists():
        raise ConfigError(f"{out} holds no autoquant study (no autoquant.json); run `autoquant optimize` first")
    info = _read_record(info_path, ("study_name",))
    storage = open_storage(args.storage or info.get("storage") if (args.storage or info.get("storage")) else None, out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=info["study_name"], storage=storage)
    except KeyError:
        raise ConfigError(f"study {info['study_name']!r} named by {info_path} is not in its storage; rerun "
                          "`autoquant optimize`") from None
    higher = bool(study.user_attrs.get("higher_is_better", True))
    result_json = out / "result.json"
    delivered = _read_record(result_json, ()).get("trial_number") if result_json.exists() else None
    df = trials_frame(study, all_trials=args.all, higher_is_better=higher, delivered=delivered)
    import pandas as pd

    from .report import COMPACT

    shown = df if args.all else df[[c for c in COMPACT if c in df.columns]]
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 60):
        print(shown.to_string(index=False))
    if args.plot:
        from .plot import plot_pareto

        print(plot_pareto(study, out / "pareto.png", delivered=delivered))
    return 0


def _cmd_demo(args) -> int:
    from .api import optimize
    from .demo import DemoTask

    folder = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="autoquant-demo-"))
    task = DemoTask(folder / "task")
    result = optimize(str(task.model_path), task.calibration_data, task.evaluate, allowed_accuracy_drop=0.01,
                      n_trials=args.n_trials, seed=args.seed, output_dir=folder / "out", show_progress=not args.quiet)
    _print_result(result, "autoquant demo: ")
    print(f"  config: {json.dumps(result.config)}")
    print(f"  eval calls: {result.eval_calls}, outputs in {folder / 'out'}")
    return 0


def _read_record(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON record autoquant wrote; a corrupt or foreign file is a ConfigError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); rerun "
                          "`autoquant optimize` to write it again") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ConfigError(f"{path} is not an autoquant record (needs {list(keys)}); rerun `autoquant optimize`")
    return data


def _cmd_export(args) -> int:
    from .export import export

    out = Path(args.output_dir)
    model = out / "quantized.onnx"
    if not model.exists():
        raise ConfigError(f"{out} holds no delivered model (quantized.onnx); run `autoquant optimize` first")
    target = Path(args.out) if args.out else out / f"quantized{FORMATS[args.format]}"
    if target.is_dir():
        raise ConfigError(f"--out {target} is a directory; name the file to write")
    if target.resolve() == model.resolve():
        raise ConfigError(f"--out {target} is the delivered model itself; name another file")
    path = export(model, target, args.format, tensorrt_version=args.tensorrt_version)
    print(path)
    return 0


def _cmd_worker(args) -> int:
    from .worker import run_worker

    result = run_worker(args.storage, args.study, n_trials=args.n_trials, timeout=args.timeout,
                        show_progress=not args.quiet)
    _print_result(result)
    return 0 if result.feasible else 3


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit code 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"autoquant: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="autoquant", description="Automatic quantization search for ONNX models.")
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
    o.add_argument("--target", default=None, choices=["ort_cpu", "tensorrt", "qnn_htp", "ncnn"],
                   help="deployment target: restricts the space to what it runs well, writes its files")
    o.add_argument("--n-trials", type=int, default=50)
    o.add_argument("--timeout", type=float, default=None, help="seconds for this run")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the output dir)")
    o.add_argument("--study-name", default=None)
    o.add_argument("--output-dir", default="autoquant_out")
    o.add_argument("--select", choices=["smallest", "most_accurate", "fastest", "fewest_bops"], default="smallest")
    o.add_argument("--objective", choices=["size", "latency", "bops"], default="size",
                   help="second objective of the search, next to accuracy (default: model size)")
    o.add_argument("--no-latency", action="store_true", help="do not measure each trial's ORT CPU latency")
    o.add_argument("--latency-threading", choices=["default", "single"], default="default",
                   help="latency the delivery rule compares with fp32: ORT's default threading or one thread")
    o.add_argument("--no-prune", action="store_true", help="fully evaluate every trial, even hopeless ones")
    o.add_argument("--stop-when-feasible", action="store_true", help="stop at the first feasible trial")
    o.add_argument("--baseline-accuracy", type=float, default=None,
                   help="the fp32 model's known score (skips the fp32 eval call)")
    o.add_argument("--max-high-precision-fraction", type=float, default=None,
                   help="at most this fraction of compute nodes kept float / 16-bit")
    o.add_argument("--eval-timeout", type=float, default=None,
                   help="seconds one eval may take; a slower trial is marked FAIL (default: no limit)")
    o.add_argument("--heartbeat", type=float, default=10.0,
                   help="seconds between trial heartbeats; a trial silent for 3x this is failed and retried")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.set_defaults(func=_cmd_optimize)

    e = sub.add_parser("export", help="write the delivered model's quantization parameters for a runtime")
    e.add_argument("output_dir")
    e.add_argument("--format", required=True, choices=list(FORMATS))
    e.add_argument("--out", default=None, help="file to write (default: next to quantized.onnx)")
    e.add_argument("--tensorrt-version", default="8601",
                   help="TensorRT release digits for the calibration cache header (default 8601 = 8.6.1)")
    e.set_defaults(func=_cmd_export)

    w = sub.add_parser("worker", help="join a study created by `autoquant optimize` and run its trials")
    w.add_argument("--storage", required=True,
                   help="Optuna storage URL of the study: journal:///path/study.log, sqlite:///..., postgresql://...")
    w.add_argument("--study", required=True, help="study name (printed by optimize, in output_dir/autoquant.json)")
    w.add_argument("--n-trials", type=int, default=None, help="total trials (default: the study's)")
    w.add_argument("--timeout", type=float, default=None)
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=_cmd_worker)

    r = sub.add_parser("report", help="print the Pareto table of a study in an output dir")
    r.add_argument("output_dir")
    r.add_argument("--all", action="store_true",
                   help="every trial and every column (default: the Pareto front, the main columns)")
    r.add_argument("--storage", default=None)
    r.add_argument("--plot", action="store_true", help="also write pareto.png (needs matplotlib)")
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
    except Exception as exc:  # a bug of ours: one line, not a traceback (the "autoquant" log has it)
        print(f"autoquant: internal error: {type(exc).__name__}: {str(exc)[:300]} (please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
