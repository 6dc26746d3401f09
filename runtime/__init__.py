"""Model families, KV cache, the device programs, sampling, engine and scheduler."""
