"""One exception family. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class AutoQuantError(Exception):
    """Base class of every error autoquant raises on purpose."""


class ModelError(AutoQuantError, ValueError):
    """The model file or ModelProto cannot be used (missing, corrupt, unsupported)."""


class CalibrationDataError(AutoQuantError, ValueError):
    """Calibration feeds do not match the model or are empty / non-finite."""


class SearchSpaceError(AutoQuantError, ValueError):
    """A search-space file or dict is malformed, names an unknown knob or value."""


class ConfigError(AutoQuantError, ValueError):
    """An argument of optimize() has a wrong type or value."""


class OutputDirError(AutoQuantError, OSError):
    """The output directory cannot be used (not writable, or holds another study)."""


class StorageError(AutoQuantError, RuntimeError):
    """The Optuna storage cannot be opened."""


class NoCompletedTrialError(AutoQuantError, RuntimeError):
    """Every trial failed, so there is no model to deliver. The message lists the reasons."""


class InternalError(AutoQuantError, RuntimeError):
    """A bug inside autoquant, in the stage named by the message (traceback in the "autoquant" log). The
    study's completed trials are kept: rerunning resumes from them."""


class TrialFailed(Exception):
    """Raised inside a trial to mark it FAIL with a recorded reason; the study goes on."""
