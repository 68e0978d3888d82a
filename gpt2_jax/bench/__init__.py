"""Benchmarks: `python -m gpt2_jax.bench NAME [flags]`, one module per NAME."""
