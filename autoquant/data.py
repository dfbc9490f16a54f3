"""Calibration data at the API boundary: streamed, validated feed by feed, fingerprinted."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx

from .errors import CalibrationDataError
from .model import NP_OF_ONNX

Feed = dict[str, np.ndarray]


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "unknown"


class CalibrationSource:
    """Wraps the user's calibration data: an iterable of feeds, or a callable returning a fresh one.

    Feeds are validated one by one as they stream; none is held beyond the caller's use.
    """

    def __init__(self, data: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable], specs: dict):
        if data is None:
            raise CalibrationDataError("calibration_data is None: pass an iterable of {input_name: array} feeds")
        if isinstance(data, Mapping):
            raise CalibrationDataError(
                "calibration_data is a single dict: pass an iterable of feeds, e.g. [feed] or a generator"
            )
        if not callable(data) and not isinstance(data, Iterable):
            raise CalibrationDataError(
                f"calibration_data must be an iterable of feeds or a callable returning one, got {type(data).__name__}"
            )
        self._data = data
        self._specs = specs
        self._consumed = False

    @property
    def reiterable(self) -> bool:
        """True when the data can be read twice (callable, list, ...): a resume then skips recollection."""
        if callable(self._data):
            return True
        return iter(self._data) is not self._data

    def _raw(self) -> Iterable:
        if callable(self._data):
            try:
                out = self._data()
            except Exception as exc:
                raise CalibrationDataError(f"the calibration_data callable raised {type(exc).__name__}: {str(exc)[:300]}") from exc
            if not isinstance(out, Iterable) or isinstance(out, Mapping):
                raise CalibrationDataError("the calibration_data callable must return an iterable of feeds")
            return out
        if self._consumed and not self.reiterable:
            raise CalibrationDataError(
                "calibration_data is a one-shot iterator that was already consumed: pass a list or a callable "
                "returning a fresh iterator"
            )
        self._consumed = True
        return self._data

    def __iter__(self) -> Iterator[Feed]:
        n = 0
        feeds = iter(self._raw())
        while True:
            try:
                feed = next(feeds)
            except StopIteration:
                break
            except CalibrationDataError:
                raise
            except Exception as exc:  # the user's generator failed part-way
                raise CalibrationDataError(f"calibration_data raised {type(exc).__name__}: {str(exc)[:200]} while "
                                           f"producing feed #{n}; fix the data source") from exc
            n += 1
            yield self.validate(feed, n - 1)
        if n == 0:
            raise CalibrationDataError(
                "calibration_data is empty: give at least one feed {input_name: array} (a few hundred samples "
                "is typical)"
            )

    def validate(self, feed: object, index: int) -> Feed:
        specs = self._specs
        if not isinstance(feed, Mapping):
            raise CalibrationDataError(
                f"calibration feed #{index} is a {type(feed).__name__}, expected a dict {{input_name: array}} with "
                f"keys {sorted(specs)}"
            )
        if bad := [k for k in feed if not isinstance(k, str)]:
            raise CalibrationDataError(f"calibration feed #{index} has key(s) {[repr(k)[:40] for k in bad[:3]]} that "
                                       f"are not strings: keys are input names, {sorted(specs)}")
        missing = sorted(set(specs) - set(feed))
        extra = sorted(set(feed) - set(specs))
        if missing or extra:
            raise CalibrationDataError(
                f"calibration feed #{index} keys do not match the model inputs: missing {missing}, unexpected "
                f"{extra}; the model expects {sorted(specs)}"
            )
        out: Feed = {}
        for name, (elem_type, dims) in specs.items():
            arr = feed[name]
            if not isinstance(arr, np.ndarray):
                try:
                    arr = np.asarray(arr)
                except Exception:
                    raise CalibrationDataError(
                        f"calibration feed #{index} input {name!r} is a {type(arr).__name__}, not an array"
                    ) from None
            want = NP_OF_ONNX.get(elem_type)
            if want is not None and arr.dtype != want:
                raise CalibrationDataError(
                    f"calibration feed #{index} input {name!r} has dtype {arr.dtype}, the model expects "
                    f"{_dtype_name(elem_type)}: convert it with .astype(np.{np.dtype(want).name})"
                )
            if dims and arr.ndim != len(dims):
                raise CalibrationDataError(
                    f"calibration feed #{index} input {name!r} has shape {arr.shape} (rank {arr.ndim}), the model "
                    f"expects rank {len(dims)} shape {_fmt_dims(dims)}"
                )
            for axis, (got, exp) in enumerate(zip(arr.shape, dims)):
                if exp is not None and exp > 0 and got != exp:
                    raise CalibrationDataError(
                        f"calibration feed #{index} input {name!r} has shape {arr.shape}, the model expects "
                        f"{_fmt_dims(dims)} (axis {axis} must be {exp})"
                    )
            if arr.size == 0:
                raise CalibrationDataError(
                    f"calibration feed #{index} input {name!r} is empty (shape {arr.shape}); every feed needs at "
                    "least one sample"
                )
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise CalibrationDataError(
                    f"calibration feed #{index} input {name!r} contains NaN or inf: remove or clean that sample"
                )
            out[name] = arr
        return out

    def fingerprint(self) -> str:
        """sha256 of every feed (names, dtypes, shapes, bytes): one cheap pass, no inference."""
        h = hashlib.sha256()
        for feed in self:
            update_fingerprint(h, feed)
        return h.hexdigest()


def update_fingerprint(h: "hashlib._Hash", feed: Feed) -> None:
    for name in sorted(feed):
        arr = np.ascontiguousarray(feed[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())


def _fmt_dims(dims: tuple) -> str:
    return "[" + ", ".join("?" if d is None or d == 0 else str(d) for d in dims) + "]"
