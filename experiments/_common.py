"""Helpers shared by the benchmark scripts: ORT sessions for timing, environment lines, Markdown tables."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent


def session(path, threads: int = 1) -> ort.InferenceSession:
    """A single-threaded (by default), sequential CPU session: the setting every latency here uses."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "autoquant"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (autoquant/ modified)" if dirty else "")
    except Exception:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
