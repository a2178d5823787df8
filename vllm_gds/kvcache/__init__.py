"""The quantized KV cache: formats, torch reference, calibration, kv-plan."""
