"""The padded vocabulary's mask: logits of ids past the real vocabulary set to -inf."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_vocab(logits_BV: jax.Array, n_valid: int) -> jax.Array:
    """`logits_BV` (any [..., V]) with the columns >= n_valid at -inf; unchanged when
    n_valid >= V. Masked ids get probability 0, so no sampler or argmax picks them."""
    V = logits_BV.shape[-1]
    if n_valid >= V:
        return logits_BV
    valid_V = jnp.arange(V) < n_valid  # static: folds to a constant under jit
    return jnp.where(valid_V, logits_BV, -jnp.inf)
