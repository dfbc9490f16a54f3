"""What optimize() returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from .report import save_csv, trials_frame


@dataclass
class OptimizeResult:
    model_path: str  # the delivered QDQ model (a byte copy of the chosen trial's file)
    accuracy: float  # eval_callback's score of exactly that file
    baseline_accuracy: float  # fp32 score, measured once per study
    drop: float
    feasible: bool
    trial_number: int
    config: dict[str, Any]
    #: AIMET encodings of the delivered model, named by the tensors of float_model_path; None for a dynamic-
    #: quantization model (no format holds activation scales computed at run time) or when writing failed (warnings)
    encodings_path: str | None
    size_bytes: int
    fp32_size_bytes: int
    study: optuna.Study = field(repr=False)
    output_dir: str = ""
    higher_is_better: bool = True
    eval_calls: int = 0  # calls of eval_callback made by this optimize() call (baseline included)
    float_nodes: list[str] = field(default_factory=list)
    preparation: dict[str, Any] = field(default_factory=dict)  # steps, quantizable count, nodes kept float + why
    latency_ratio: float | None = None  # ORT CPU latency / fp32 latency, 1 thread, measured in the same process
    latency_ratio_default_threads: float | None = None  # the same with ONNX Runtime's default threading
    bops_ratio: float | None = None  # bit operations / fp32 bit operations
    export_path: str | None = None  # the target runtime's file (TensorRT cache, ncnn table), when a target asks
    #: the float model the encodings / export refer to (quantized.float.onnx: the delivered graph, dequantized)
    float_model_path: str | None = None
    #: largest |output difference| between the delivered model and the QDQ model ONNX Runtime rebuilds from the
    #: float model + encodings, on calibration feeds (0.0: bit for bit; None: not checked)
    roundtrip_max_abs_diff: float | None = None
    #: wall seconds of this call's stages: preparation_and_statistics, fp32_eval, sensitivity, screening, trials,
    #: total (a stage found in the cache or study, or skipped, is short or absent)
    timings: dict[str, float] = field(default_factory=dict)
    #: what the user must know about the delivered model (infeasible; slower than fp32, with the ratio)
    warnings: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.fp32_size_bytes

    def report(self, all_trials: bool = False) -> pd.DataFrame:
        """Pareto-optimal trials (accuracy vs model size) and the delivered one (column ``delivered``), or
        every trial with ``all_trials=True``."""
        return trials_frame(self.study, all_trials=all_trials, higher_is_better=self.higher_is_better,
                            delivered=self.trial_number)

    def sensitivity(self) -> pd.DataFrame:
        """Per compute node: output SQNR (dB) vs fp32 when only that node is quantized, at each measured
        precision (w8a8, w4a8, w8a16), most sensitive first. Measured when a trial first needs it (float
        fallback, 16-bit or 4-bit nodes): empty when none did."""
        data = self.study.user_attrs.get("sensitivity", {})
        rows = [{"node": n, **{f"sqnr_db_{p}": v for p, v in d.items()}} for n, d in data.items()]
        df = pd.DataFrame(rows)
        if df.empty:
            return pd.DataFrame(columns=["node", "sqnr_db_w8a8", "sqnr_db_w4a8", "sqnr_db_w8a16"])
        return df.sort_values("sqnr_db_w8a8", na_position="last", kind="stable").reset_index(drop=True)

    def plot(self, path: str | Path | None = None) -> Path:
        """PNG of accuracy vs the search's second objective, with the feasible region and Pareto front."""
        from .plot import plot_pareto

        return plot_pareto(self.study, path or Path(self.output_dir) / "pareto.png", delivered=self.trial_number)

    def save_report(self, path: str | Path, all_trials: bool = True) -> Path:
        return save_csv(self.report(all_trials=all_trials), path)

    def summary(self) -> str:
        state = "feasible" if self.feasible else "NOT feasible"
        latency = f", latency {self.latency_ratio:.2f}x fp32" if self.latency_ratio is not None else ""
        if self.latency_ratio_default_threads is not None:
            latency += f" (1 thread; {self.latency_ratio_default_threads:.2f}x with ORT's default threads)"
        return (f"trial {self.trial_number} ({state}): accuracy {self.accuracy:.4f} vs fp32 {self.baseline_accuracy:.4f}"
                f" (drop {self.drop:.4f}), size {self.size_bytes} B = {self.size_ratio:.2f}x fp32{latency}"
                f" -> {self.model_path}")
