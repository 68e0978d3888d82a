"""Rotary position embeddings, rotate-half (GPT-NeoX / HF Llama) convention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(
    positions_BT: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of pos · θ^(−2i/d), each [B, T, head_dim] with the half repeated, in fp32."""
    inv_freq_F = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
    angle_BTH = jnp.concatenate([angle_BTF, angle_BTF], axis=-1)
    return jnp.cos(angle_BTH), jnp.sin(angle_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """[x1, x2] → [x1·cos − x2·sin, x2·cos + x1·sin], computed in fp32, returned in x's dtype."""
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_BTNH.dtype)
