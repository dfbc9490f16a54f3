"""How a study's inputs are referenced, so another process (`autoquant worker`) can rebuild them.

An eval callback or calibration callable is referenced as ``module:function`` or
``path/to/file.py:function`` when it can be imported back; calibration data given on the command line
as ``.npz`` is referenced by its path. Anything else (a lambda, a list in memory) has no reference,
and a worker joining that study says so.
"""

from __future__ import annotations

import contextlib

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import CalibrationDataError, ConfigError


def callable_ref(fn: Any) -> str | None:
    """'module:qualname' (or 'file.py:qualname' for a script's __main__) that imports back to ``fn``."""
    if not callable(fn):
        return None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not qualname or "<" in qualname or "." in qualname:
        return None
    if module == "__main__":
        path = getattr(sys.modules.get("__main__"), "__file__", None)
        return f"{Path(path).resolve()}:{qualname}" if path else None
    mod = sys.modules.get(module)
    if getattr(mod, qualname, None) is not fn:
        return None
    path = getattr(mod, "__file__", None)
    if module.startswith("autoquant_eval_") and path:  # loaded from a file by load_callable
        return f"{Path(path).resolve()}:{qualname}"
    return f"{module}:{qualname}"


def calibration_ref(data: Any) -> dict | None:
    ref = getattr(data, "autoquant_ref", None)
    if ref is not None:
        return dict(ref)
    fn = callable_ref(data) if callable(data) else None
    return {"kind": "callable", "ref": fn} if fn else None


def resolve_calibration(ref: dict):
    if ref["kind"] == "path":
        return calibration_from_path(ref["path"], ref.get("batch_size", 1))
    return load_callable(ref["ref"])


def load_callable(spec: str) -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    if ":" not in spec:
        raise ConfigError(f"--eval must look like module:function or file.py:function, got {spec!r}")
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"--eval file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"autoquant_eval_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.path.insert(0, str(path.parent.resolve()))
            sys.modules[module_spec.name] = module  # so callable_ref can name it for workers
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


@contextlib.contextmanager
def _npz(path: Path):
    """np.load of an .npz file whose every array is read inside the block; a corrupt or truncated file (or a
    pickled object array) is a CalibrationDataError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            yield z
    except CalibrationDataError:
        raise
    except Exception as exc:
        raise CalibrationDataError(f"--calib file {path} cannot be read as .npz ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); write it with numpy.savez") from None


def calibration_from_path(path: str, batch_size: int = 1):
    """A directory of .npz files (one feed each, sorted by name) or one .npz whose arrays are split
    along axis 0 into feeds of ``batch_size`` samples. Returns a callable giving a fresh iterator."""
    p = Path(path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationDataError(f"--calib-batch-size must be an integer >= 1, got {batch_size!r}")
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise CalibrationDataError(f"--calib directory {p} holds no .npz files")

        def feeds():
            for f in files:
                with _npz(f) as z:
                    yield {k: z[k] for k in z.files}

        feeds.autoquant_ref = {"kind": "path", "path": str(p.resolve()), "batch_size": batch_size}
        return feeds
    if p.is_file() and p.suffix == ".npz":
        with _npz(p) as z:
            sizes = {k: z[k].shape[0] if z[k].ndim else 0 for k in z.files}
        if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise CalibrationDataError(f"--calib {p}: every array needs the same number of samples on axis 0, got {sizes}")
        n = next(iter(sizes.values()))

        def feeds():
            with _npz(p) as z:
                arrays = {k: z[k] for k in z.files}
            for i in range(0, n, batch_size):
                yield {k: v[i : i + batch_size] for k, v in arrays.items()}

        feeds.autoquant_ref = {"kind": "path", "path": str(p.resolve()), "batch_size": batch_size}
        return feeds
    raise CalibrationDataError(f"--calib must be a directory of .npz files or one .npz file, got {path}")


