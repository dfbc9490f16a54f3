"""Per-node sensitivity: quantize one compute node at a time, measure output SQNR vs fp32.

Measured once per study on the cached calibration samples (no user eval) and cached on disk, keyed
by the statistics key (itself a hash of model and data). Lowest SQNR = most sensitive = first to
fall back to float.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ._io import atomic_write_json
from .build import RangeCache, build_qdq_model
from .stats import Statistics

BASELINE = {
    "calibration": "minmax", "percentile": None, "weight_granularity": "per_tensor", "weight_symmetric": True,
    "activation_symmetric": False, "weight_bits": 8, "activation_bits": 8, "weight_rounding": "nearest_even",
    "fallback_k": 0,
}


def session(path: str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def sqnr_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio in dB over all outputs (inf when identical)."""
    sig = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in reference)
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - t.astype(np.float64)))) for r, t in zip(reference, test))
    if noise == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return 10.0 * np.log10(sig / noise)


def run_outputs(sess: ort.InferenceSession, samples: list[dict]) -> list[np.ndarray]:
    outs: list[np.ndarray] = []
    for feed in samples:
        outs.extend(np.asarray(o) for o in sess.run(None, feed))
    return outs


#: precisions each node is measured at, alone: the config that quantizes it
PRECISIONS = {
    "w8a8": BASELINE,
    "w4a8": {**BASELINE, "weight_bits": 4, "weight_granularity": "per_channel"},
    "w8a16": {**BASELINE, "activation_bits": 16},
}


def measure_sensitivity(prepared: Path, stats: Statistics, nodes: list[str], cache_dir: Path,
                        max_samples: int = 4) -> dict[str, dict[str, float]]:
    """Per node, per precision in PRECISIONS: SQNR (dB) of the model outputs when only that node is
    quantized. No user eval; cached on disk by the statistics key (a hash of model and data)."""
    cache = cache_dir / f"sensitivity-{stats.key}-{_file_key(prepared)}.json"  # variants share statistics
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("nodes") == nodes and data.get("precisions") == list(PRECISIONS):
            return {n: {p: float(v) for p, v in d.items()} for n, d in data["sqnr_db"].items()}
    samples = stats.samples[:max_samples]
    reference = run_outputs(session(prepared), samples)
    ranges = RangeCache(stats)
    result: dict[str, dict[str, float]] = {n: {} for n in nodes}
    with tempfile.TemporaryDirectory(prefix="autoquant-sens-") as tmp:
        path = Path(tmp, "single.onnx")
        for precision, config in PRECISIONS.items():
            for node in nodes:
                try:
                    build_qdq_model(prepared, ranges.ranges(config), config, path, nodes_to_quantize=[node])
                    result[node][precision] = sqnr_db(reference, run_outputs(session(path), samples))
                except Exception:  # a node ORT cannot quantize alone cannot hurt: rank it last
                    result[node][precision] = float("inf")
    atomic_write_json(cache, {"nodes": nodes, "precisions": list(PRECISIONS), "sqnr_db": {
        n: {p: (v if np.isfinite(v) else str(v)) for p, v in d.items()} for n, d in result.items()}})
    return result


def _file_key(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def rank_nodes(sensitivity: dict[str, dict[str, float]], precision: str = "w8a8") -> list[str]:
    """Most sensitive first (lowest SQNR at ``precision``); ties keep graph order."""
    order = {n: i for i, n in enumerate(sensitivity)}
    return sorted(sensitivity, key=lambda n: (sensitivity[n][precision], order[n]))
