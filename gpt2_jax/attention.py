"""Causal (optionally sliding-window) grouped-query attention: the one dispatch point.

Shapes: q is [B, T, N, H]; k and v are [B, S, K, H] with N a multiple of K. K/V heads are
shared by N/K query heads without being repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "blocked", "cudnn")


def resolve_impl(impl: str, dtype: jnp.dtype) -> str:
    """The implementation `auto` picks for this backend and dtype."""
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def xla_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    window: int | None,
    mask_BTS: jax.Array | None = None,
) -> jax.Array:
    """Reference path: `jax.nn.dot_product_attention`, materialising the T×S scores.

    Without `mask_BTS` queries and keys are the same positions (causal, T == S). With it, the
    boolean mask says which keys each query may see and `window` is ignored.
    """
    if mask_BTS is not None:
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation="xla"
        )
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, is_causal=True, local_window_size=local, implementation="xla"
    )


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    window: int | None,
    impl: str = "auto",
    mask_BTS: jax.Array | None = None,
) -> jax.Array:
    """Causal attention over the same positions for q and k (or an explicit mask)."""
    impl = resolve_impl(impl, q_BTNH.dtype)
    if mask_BTS is not None or impl == "xla":
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, window=window, mask_BTS=mask_BTS)
    raise ValueError(f"attention impl {impl!r} is not available")
