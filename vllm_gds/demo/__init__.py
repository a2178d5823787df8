"""`make demo`: SmolLM2-135M prepared, served through --load-format gds, one request answered."""
