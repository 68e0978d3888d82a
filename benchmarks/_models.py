"""Random models and token rows for timing: no checkpoint, no jitted initialisation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.model.gpt import GPT


@functools.cache  # one model per config: later parts reuse its compiled steps
def random_model(cfg: ModelConfig, seed: int):
    """A GPT with GPT-2-style random weights (normal 0.02, unit LayerNorm scales, zero biases),
    drawn with NumPy: jitted or eager initialisation would compile, and timing needs no more."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)  # dropout streams, unused in eval mode
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if name == "bias" or not jnp.issubdtype(x.dtype, jnp.floating):
            return np.zeros(x.shape, x.dtype)
        return (0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)

    # Device arrays: NumPy leaves would be copied to the device on every jitted call.
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, jax.tree.map_with_path(draw, state)))
    model.eval()
    return model


def random_tokens(vocab_size: int, n: int, seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab_size, (1, n)), jnp.int32)
