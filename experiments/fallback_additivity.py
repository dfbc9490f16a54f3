"""Is float fallback additive? Keeping the nodes autoquant ranks most sensitive in float, on PP-OCR.

autoquant's repair step (``autoquant/repair.py``) and its ``fallback_k`` knob keep the k nodes of the w8a8
single-node sensitivity ranking in float, and the repair's bisection assumes output SQNR grows with k. This
script measures whether it does on the PP-OCRv4 recognizer (rapidocr-onnxruntime wheel), with the config of
bench_search's best starting point there: percentile 99.99 activations, per-channel symmetric int8 weights,
BatchNorm folded.

Builds: no fallback; the top k of the ranking for k in 1, 2, 4, 8, 16, 32; each of the top-4 nodes alone.
Each is scored by output SQNR vs fp32 (``autoquant.prune.Pruner``: the first 2 calibration feeds, as
``optimize()`` pre-scores trials) and by character accuracy on the 96 rendered eval lines of bench_search.

The model is prepared as ``optimize()`` prepares it (``bench_sensitivity.prepare``). Writes
``results/fallback_additivity.md``.

    pip install rapidocr-onnxruntime pillow
    python experiments/fallback_additivity.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import code_state, machine_info, md_table, publish, session, work_dir  # noqa: E402
from _ocr import OcrData  # noqa: E402
from bench_sensitivity import prepare  # noqa: E402

from autoquant.build import RangeCache, build_qdq_model  # noqa: E402
from autoquant.prune import Pruner  # noqa: E402
from autoquant.sensitivity import measure_sensitivity, rank_nodes  # noqa: E402
from autoquant.space import SearchSpace  # noqa: E402

KNOBS = {"calibration": "percentile", "percentile": 99.99, "weight_granularity": "per_channel", "bn_fold": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ocr-eval", type=int, default=96)
    ap.add_argument("--ocr-calib", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fallback_additivity.md")
    args = ap.parse_args()
    t_all = time.perf_counter()
    commit = code_state()
    work, tmp = work_dir(args.workdir, "fallback-additivity-")
    data = OcrData(args.seed, args.ocr_eval, args.ocr_calib)
    case = prepare("ppocr_rec", "PP-OCRv4 rec", "", data.model_path, list(data.calibration()), work, time.perf_counter())
    items = list(range(args.ocr_eval))

    def accuracy(path: Path) -> float:
        return float(data.score_items(session(path, 2), items).mean())

    config = SearchSpace({"knobs": KNOBS}).suggest(optuna.trial.FixedTrial({}), len(case.nodes))
    ranges = RangeCache(case.stats).ranges(config)
    pruner = Pruner(work / "ppocr_rec-prepared.onnx", case.stats.samples)
    ranking = rank_nodes(measure_sensitivity(case.path, case.stats, case.nodes, work, precisions=("w8a8",)), "w8a8")
    sets = [("none", [])] + [(f"top {k}", ranking[:k]) for k in (1, 2, 4, 8, 16, 32)] + \
        [(f"only #{i + 1}", [n]) for i, n in enumerate(ranking[:4])]
    rows = []
    for label, fallback in sets:
        path = work / f"fallback-{label.replace(' ', '_').replace('#', '')}.onnx"
        build_qdq_model(case.path, ranges, config, path, fallback)
        sqnr, acc = pruner.sqnr(path), accuracy(path)
        rows.append([label, ", ".join(fallback[:4]) + (" …" if len(fallback) > 4 else ""), f"{sqnr:.2f}", f"{acc:.4f}"])
        print(rows[-1], flush=True)
    fp32 = accuracy(data.model_path)
    info = machine_info(("rapidocr-onnxruntime", "pillow"))
    md = [
        "# Is float fallback additive? PP-OCRv4 rec, most sensitive nodes kept float",
        "",
        "Reproduce (from the repository root, with the venv's Python):",
        "",
        "```",
        "pip install rapidocr-onnxruntime pillow",
        "python experiments/fallback_additivity.py",
        "```",
        "",
        f"- autoquant code: {commit}; total wall time {(time.perf_counter() - t_all) / 60:.1f} min",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- config: {KNOBS} (the best starting point of bench_search on this model); ranking: autoquant's w8a8 "
        f"single-node sensitivity on the BatchNorm-folded model ({len(case.nodes)} compute nodes)",
        f"- SQNR: model outputs vs fp32 on the first 2 of {len(case.stats.samples)} calibration feeds "
        f"(autoquant.prune.Pruner); accuracy: character accuracy on {args.ocr_eval} rendered lines, fp32 {fp32:.4f}",
        "",
        md_table(["nodes kept float", "which (first 4)", "output SQNR dB", "char accuracy"], rows),
        "",
    ]
    publish(args.out, "\n".join(md))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
