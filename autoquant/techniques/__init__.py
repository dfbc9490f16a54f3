"""Accuracy-recovery techniques applied to the float model before quantization."""

from .adaround import adaround, apply_adaround, collect_layer_inputs, layer_matrix
from .bias_correction import correct_biases
from .bn_fold import fold_batchnorm
from .cle import equalize, find_pairs

__all__ = ["fold_batchnorm", "equalize", "find_pairs",
           "adaround", "apply_adaround", "collect_layer_inputs", "layer_matrix", "correct_biases"]
