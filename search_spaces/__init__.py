"""Search-space files (data). Loaded by autoquant.space via importlib.resources."""
