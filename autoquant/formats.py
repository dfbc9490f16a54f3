"""The deployment formats autoquant writes, in one place: name -> suffix of the file written next to
quantized.onnx (``quantized<suffix>``). autoquant.export writes and reads them; the CLI, the search-space
validation (a target's ``export``) and the delivery read this registry."""

FORMATS: dict[str, str] = {
    "aimet": ".encodings.json",  # AIMET encodings, layout 1.0.0
    "aimet-2.0.0": ".encodings-2.0.0.json",  # AIMET encodings, layout 2.0.0 (onnx::QuantizeLinear fields)
    "aimet-0.6.1": ".encodings-0.6.1.json",  # AIMET encodings, legacy layout 0.6.1
    "tensorrt-cache": ".trt-calib.cache",  # TensorRT int8 calibration cache (implicit quantization)
    "ncnn-table": ".ncnn.table",  # ncnn int8 table (ncnn2int8 input)
}
