"""Random-weight models for the generation tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.model.gpt import GPT


def random_model(cfg: ModelConfig, seed: int = 0, scale: float = 1.0) -> GPT:
    """A model with O(1) random weights, so greedy text varies (the 0.02 init is near-uniform).

    Built from abstract shapes and NumPy draws: eager JAX init would compile per shape.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)

    def draw(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)  # dropout streams (unused: generation runs in eval mode)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return np.zeros(x.shape, x.dtype)
        fan_in = x.shape[0] if len(x.shape) == 2 else 1
        return (scale * rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return nnx.merge(graphdef, jax.tree.unflatten(treedef, [draw(x) for x in leaves]))


def perturbed(model: GPT, seed: int, noise: float) -> GPT:
    """A copy of `model` with Gaussian noise of std `noise` on every weight: a draft that
    mostly, but not always, agrees with it."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)

    def jitter(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return np.asarray(x) + noise * rng.standard_normal(x.shape).astype(x.dtype)

    return nnx.merge(graphdef, jax.tree.map(jitter, state))
