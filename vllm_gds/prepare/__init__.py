"""`vllm-gds prepare`: capture a model with vLLM, fp8 quantization, the prepared directory."""
