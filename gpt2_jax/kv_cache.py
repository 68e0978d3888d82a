"""Preallocated K/V cache and the cached forward pass, built from the model's hooks.

The cache holds n_kv_head heads per layer, so GQA / MQA caches are n_kv_head/n_head of MHA's.
Absolute position p lives in slot p mod S and `pos_BS` records which position each slot holds
(-1 = empty). Full-attention models get one slot per position; sliding-window models keep a
rolling cache of w (+ slack) slots, constant in generated length, and can run past
`max_seq_len` with RoPE. Keys are cached after RoPE, so each keeps its absolute rotation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpt2_jax.attention import dot_product_attention
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import GPT


class KVCache(NamedTuple):
    """Per-layer keys and values [B, S, K, H] and the absolute position in each slot."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    pos_BS: jax.Array  # int32, -1 = empty

    @property
    def size(self) -> int:
        return self.pos_BS.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v))


def cache_size(cfg: ModelConfig, total_len: int, *, ahead: int = 0) -> int:
    """Slots for a run of `total_len` positions whose writes run at most `ahead` positions
    past the earliest query still to come (chunk length − 1, or rejected speculative tokens).

    Full attention keeps every position; a window of w needs w + ahead slots so that no slot a
    later query can see is overwritten.
    """
    if cfg.attention_window is None:
        return total_len
    return min(total_len, cfg.attention_window + ahead)


def init_cache(cfg: ModelConfig, batch: int, size: int) -> KVCache:
    shape = (batch, size, cfg.n_kv_head, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, jnp.dtype(cfg.compute_dtype)) for _ in range(cfg.n_layer))
    return KVCache(zeros, zeros, jnp.full((batch, size), -1, jnp.int32))


def bytes_per_token(cfg: ModelConfig) -> int:
    """Cache bytes one position costs per sequence: K and V of every layer."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def _embed(model: GPT, tokens_BT: jax.Array, positions_BT: jax.Array):
    if model.cfg.pos_embedding == "learned":
        # Speculative verification may score tokens past the table; their outputs are never
        # kept, and clamping keeps them finite (an out-of-range gather would give NaN).
        positions_BT = jnp.minimum(positions_BT, model.cfg.max_seq_len - 1)
    return model.embed(tokens_BT, positions_BT)


def prefill(
    model: GPT, tokens_BT: jax.Array, size: int, *, all_logits: bool = False
) -> tuple[jax.Array, KVCache]:
    """Run a prompt at positions 0..T-1 from an empty cache of `size` slots.

    Attention is the model's own causal (window) attention over the prompt, so the logits are
    the full forward's. Returns last-position logits [B, V] (all [B, T, V] with `all_logits`)
    and the cache holding the last min(T, size) positions.
    """
    cfg = model.cfg
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD, rope_cs = _embed(model, tokens_BT, positions_BT)
    keep = min(T, size)
    shift = (T - keep) % size  # the kept positions T-keep.. start at this slot

    def store(a_BTKH: jax.Array) -> jax.Array:
        a_BSKH = jnp.zeros((B, size, *a_BTKH.shape[2:]), jnp.dtype(cfg.compute_dtype))
        a_BSKH = a_BSKH.at[:, :keep].set(a_BTKH[:, T - keep :].astype(a_BSKH.dtype))
        return jnp.roll(a_BSKH, shift, axis=1)

    ks, vs = [], []
    for block in model.h:
        q_BTNH, k_BTKH, v_BTKH = block.attn.qkv(block.ln_1(x_BTD), rope_cs)
        y_BTNH = dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, window=cfg.attention_window, impl=cfg.attention_impl
        )
        x_BTD = x_BTD + block.attn.out(y_BTNH)
        x_BTD = x_BTD + block.mlp(block.ln_2(x_BTD))
        ks.append(store(k_BTKH))
        vs.append(store(v_BTKH))
    pos_S = jnp.where(jnp.arange(size) < keep, jnp.arange(size) + T - keep, -1)
    pos_BS = jnp.broadcast_to(jnp.roll(pos_S, shift).astype(jnp.int32), (B, size))
    logits = model.logits(x_BTD if all_logits else x_BTD[:, -1:])
    return (logits if all_logits else logits[:, 0]), KVCache(tuple(ks), tuple(vs), pos_BS)


def visible_mask(query_pos_BT: jax.Array, key_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S]: key slot s is filled and query t may see it (causal, within the window)."""
    q_BT1, k_B1S = query_pos_BT[:, :, None], key_pos_BS[:, None, :]
    mask_BTS = (k_B1S >= 0) & (k_B1S <= q_BT1)
    if window is not None:
        mask_BTS &= k_B1S > q_BT1 - window
    return mask_BTS


def forward_cached(
    model: GPT, cache: KVCache, tokens_BT: jax.Array, positions_BT: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] of new tokens at absolute `positions_BT` (contiguous within a row).

    Their K/V are written into the cache first and the queries attend over the whole cache.
    Slots holding positions ≥ a query's (left by rejected speculative tokens) are masked, so
    rolling back is just moving the position back. T must be ≤ size − w + 1 for a window.
    """
    cfg = model.cfg
    B, _ = tokens_BT.shape
    slots_BT = positions_BT % cache.size
    rows_B1 = jnp.arange(B)[:, None]
    pos_BS = cache.pos_BS.at[rows_B1, slots_BT].set(positions_BT)
    mask_BTS = visible_mask(positions_BT, pos_BS, cfg.attention_window)
    x_BTD, rope_cs = _embed(model, tokens_BT, positions_BT)
    ks, vs = [], []
    for block, k_BSKH, v_BSKH in zip(model.h, cache.k, cache.v, strict=True):
        q_BTNH, k_BTKH, v_BTKH = block.attn.qkv(block.ln_1(x_BTD), rope_cs)
        k_BSKH = k_BSKH.at[rows_B1, slots_BT].set(k_BTKH.astype(k_BSKH.dtype))
        v_BSKH = v_BSKH.at[rows_B1, slots_BT].set(v_BTKH.astype(v_BSKH.dtype))
        y_BTNH = dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, window=cfg.attention_window, mask_BTS=mask_BTS
        )
        x_BTD = x_BTD + block.attn.out(y_BTNH)
        x_BTD = x_BTD + block.mlp(block.ln_2(x_BTD))
        ks.append(k_BSKH)
        vs.append(v_BSKH)
    return model.logits(x_BTD), KVCache(tuple(ks), tuple(vs), pos_BS)
