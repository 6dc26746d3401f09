"""Checkpoint readers: GGUF files and HF directories -> (ModelConfig, Weights, Tokenizer)."""
