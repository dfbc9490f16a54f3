"""autoquant: automatic quantization search for ONNX models.

    from autoquant import optimize
    result = optimize("model.onnx", calibration_data, eval_callback, allowed_accuracy_drop=0.01)
"""

from .api import optimize
from .errors import (AutoQuantError, CalibrationDataError, ConfigError, InternalError, ModelError,
                     NoCompletedTrialError, OutputDirError, SearchSpaceError, StorageError)
from .result import OptimizeResult
from .space import KNOBS, SearchSpace

__version__ = "0.1.0"
__all__ = [
    "optimize", "OptimizeResult", "SearchSpace", "KNOBS", "AutoQuantError", "ModelError", "CalibrationDataError",
    "SearchSpaceError", "ConfigError", "OutputDirError", "StorageError", "NoCompletedTrialError", "InternalError",
]
