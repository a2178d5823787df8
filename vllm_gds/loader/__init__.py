"""The `gds` model loader: install prepared shards (or stream a Hugging Face directory) into vLLM."""
