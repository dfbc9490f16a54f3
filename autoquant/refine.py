"""Refinements of a built QDQ model's weights, after ONNX Runtime wrote it:

rounding (ties away from zero, or AdaRound) and empirical bias correction. One Refiner per float
model variant: it holds that model's float weights, the cached calibration samples, the float input
activations of each layer (computed once, lazily) and the AdaRound results (persisted on disk, so a
later trial or a resumed study needing the same rounding does not redo it).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ._io import atomic_write
from .build import apply_weight_rounding
from .stats import Feed

ADAROUND_FEEDS = 4  # calibration feeds whose layer inputs AdaRound reconstructs (rows are subsampled)


class Refiner:
    def __init__(self, float_path: Path, samples: list[Feed], cache_dir: Path):
        self.float_path = float_path
        self.samples = samples
        self.float_model = onnx.load(str(float_path))
        self.float_inits = {t.name: numpy_helper.to_array(t) for t in self.float_model.graph.initializer}
        key = hashlib.sha256(Path(float_path).read_bytes()).hexdigest()[:16]
        self.cache_path = cache_dir / f"adaround-{key}-{_samples_key(samples)}.npz"
        self._adaround_cache: dict[str, np.ndarray] | None = None
        self._layer_inputs: dict[str, np.ndarray | list[np.ndarray]] | None = None

    def apply(self, qdq: onnx.ModelProto, config: dict[str, Any],
              should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Modify ``qdq`` in place per ``config``; returns what was done (for the trial's record).
        ``should_stop``: asked between AdaRound layers; raises techniques.adaround.Interrupted (the layers
        done are kept in the cache for later trials)."""
        info: dict[str, Any] = {}
        rounding = config["weight_rounding"]
        if rounding == "nearest_away":
            info["reround_changed"] = apply_weight_rounding(qdq, self.float_inits, rounding)
        elif rounding == "adaround":
            from .techniques import apply_adaround

            cache = self._cache()
            before = len(cache)
            try:
                layers = apply_adaround(qdq, self.float_inits, self.layer_inputs(), cache=cache,
                                        should_stop=should_stop)
            finally:
                if len(cache) != before:
                    self._save_cache()
            info["adaround_layers"] = len(layers)
        if config.get("bias_correction"):
            from .techniques import correct_biases

            shifts = correct_biases(self.float_model, qdq, self.samples)
            info["bias_corrected_layers"] = len(shifts)
        return info

    def layer_inputs(self) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Float input activation of every Conv/Gemm/MatMul node on the first calibration feeds, joined
        per node by ``stack_inputs`` (feeds may differ in shape: sequence lengths, image widths)."""
        if self._layer_inputs is None:
            from .techniques.adaround import collect_layer_inputs

            self._layer_inputs = collect_layer_inputs(self.float_model, self.samples[:ADAROUND_FEEDS])
        return self._layer_inputs

    def _cache(self) -> dict[str, np.ndarray]:
        """In-memory results merged with the file (other workers may have added layers since)."""
        if self._adaround_cache is None:
            self._adaround_cache = {}
        self._adaround_cache.update({k: v for k, v in self._read_file().items() if k not in self._adaround_cache})
        return self._adaround_cache

    def _read_file(self) -> dict[str, np.ndarray]:
        if not self.cache_path.exists():
            return {}
        try:
            with np.load(self.cache_path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # unreadable (e.g. written by another version): recompute
            return {}

    def _save_cache(self) -> None:
        """Merge with what other workers wrote meanwhile, under a lock, then replace the file atomically."""
        import fcntl

        with open(self.cache_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self._read_file(), **self._adaround_cache}

            def write(tmp: str) -> None:
                buf = io.BytesIO()
                np.savez(buf, **merged)
                Path(tmp).write_bytes(buf.getvalue())

            atomic_write(self.cache_path, write)
            self._adaround_cache = merged


def _samples_key(samples: list[Feed]) -> str:
    h = hashlib.sha256()
    for feed in samples[:ADAROUND_FEEDS]:
        for name in sorted(feed):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feed[name]).tobytes())
    return h.hexdigest()[:12]
