"""GPT-2 in JAX/Flax NNX with RoPE, grouped-query and sliding-window attention."""

from gpt2_jax.config import ModelConfig
from gpt2_jax.model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]
