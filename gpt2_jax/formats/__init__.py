"""Weights on disk: orbax checkpoints of a run, weights-only loading, and Hugging Face
folders (configs, architectures, state dicts, tokenizer files)."""
