"""Float-model variants a trial can start from: which graph techniques were applied before QDQ.

    base     prepared model as exported (BatchNormalization kept)
    bn_fold  BatchNormalization folded into the preceding Conv / Gemm   (knob bn_fold, default on)
    cle      bn_fold + cross-layer equalization                        (knob cle; CLE needs BN folded)

Each variant is written once to the cache (keyed by the base model's hash). Statistics: folding BN
leaves every remaining tensor's values unchanged, so ``bn_fold`` uses the statistics of ``base``;
CLE rescales channels between equalized layers, so ``cle`` has statistics of its own, collected in
the same single pass over the calibration data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import onnx

from ._io import atomic_write, atomic_write_json, sha256_file
from .model import PreparedModel, input_specs

BASE, BN_FOLD, CLE = "base", "bn_fold", "cle"


def variant_of(config: dict[str, Any]) -> str:
    if config.get("cle"):
        return CLE
    return BN_FOLD if config.get("bn_fold", True) else BASE


def stats_variant(variant: str) -> str:
    """Which variant's statistics serve ``variant`` (BN folding keeps tensor values)."""
    return CLE if variant == CLE else BASE


def cached_model(cache_dir: Path, work: Path, stem: str, make: Callable[[], tuple[onnx.ModelProto, list[str]]]) -> PreparedModel:
    """``cache_dir/stem.onnx`` (+ .json record) if intact, else ``make()`` written into ``work``."""
    cached, meta = cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"
    if cached.exists() and meta.exists():
        m = json.loads(meta.read_text())
        if sha256_file(cached) == m["sha256"]:
            specs = {k: (v[0], tuple(v[1])) for k, v in m["input_specs"].items()}
            return PreparedModel(cached, m["sha256"], specs, m["steps"])
    proto, steps = make()
    path = work / cached.name
    atomic_write(path, lambda tmp: save_model(proto, tmp, data_name=f"{cached.name}.data"))
    specs = input_specs(proto)
    prepared = PreparedModel(path, sha256_file(path), specs, steps)
    atomic_write_json(work / meta.name, {"sha256": prepared.sha256, "steps": steps,
                                         "input_specs": {k: [v[0], list(v[1])] for k, v in specs.items()}})
    return prepared


def save_model(proto: onnx.ModelProto, path: str | Path, data_name: str) -> None:
    """Save ``proto``; above LARGE_MODEL_BYTES its tensors go to ``data_name`` beside it (protobuf cannot
    serialise 2 GB in one message), so a large model's cached copies stay external like the model itself."""
    from .model import LARGE_MODEL_BYTES

    if proto.ByteSize() > LARGE_MODEL_BYTES:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    else:
        onnx.save(proto, str(path))


def make_variant(base: onnx.ModelProto, variant: str) -> tuple[onnx.ModelProto, list[str]]:
    from .techniques import equalize, fold_batchnorm

    if variant == BASE:
        return base, []
    model, folded = fold_batchnorm(base)
    steps = [f"BatchNormalization folded into the preceding layer: {len(folded)} node(s)"]
    if variant == CLE:
        model, pairs = equalize(model)
        steps.append(f"cross-layer equalization: {len(pairs)} layer pair(s) "
                     + ", ".join(f"{a}->{b}" for a, b in pairs[:8]) + ("..." if len(pairs) > 8 else ""))
    return model, steps
