"""Tiled causal (optionally sliding-window) grouped-query attention with an online softmax.

The sequence is cut into blocks of `block` positions and attention is computed one
(query block, key block) tile at a time, never holding more than [T, block] scores per head.
Each loop step handles one tile for every row of a batch of query blocks at once (one large
batched matmul rather than many small ones). Two schedules, whichever computes fewer tiles:

- band: step d pairs every query block i with key block i - d. With a window w only
  d < ceil((w - 1) / block) + 1 can hold a visible key, so time and memory are O(T·w).
- triangle (no window, or w close to T): query blocks p and n-1-p share a row; the row
  walks the p + 1 key blocks of block p, then the n - p of block n-1-p, so n/2 rows cover the
  causal triangle exactly in n + 1 steps with O(T) memory.

The backward pass is a custom VJP that recomputes the tile scores from q, k, v and the saved
log-sum-exp (FlashAttention-2 style), so training memory stays O(T·w) (O(T) without a
window). K/V heads are shared by their N/K query heads through a group axis, never repeated.

Internal shape suffixes: R rows of a step, b positions in a query block, c positions in a key
block, G query heads per K/V head; blocked arrays are [B, K, n, b, (G,) H].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK = 128


def num_offsets(n_blocks: int, block: int, window: int | None) -> int:
    """How many key-block offsets i - j can hold a visible key: all of them without a window."""
    if window is None:
        return n_blocks
    return min(n_blocks, -(-(window - 1) // block) + 1)


def schedule(n_blocks: int, block: int, window: int | None) -> str:
    """'band' or 'triangle', whichever computes fewer tiles (see module doc)."""
    band_tiles = n_blocks * num_offsets(n_blocks, block, window)
    n_even = n_blocks + n_blocks % 2
    return "band" if band_tiles <= n_even * (n_even + 1) // 2 else "triangle"


def check_qkv(q_BTNH, k_BTKH, v_BTKH, window: int | None, **sizes: int) -> int:
    """Raise ValueError unless q is [B,T,N,H], k and v [B,T,K,H] with K dividing N, and the
    window and the tile `sizes` are positive; returns K."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if k_BTKH.shape != (B, T, K, H) or v_BTKH.shape != k_BTKH.shape or N % K:
        raise ValueError(
            f"attention needs q [B,T,N,H] and k, v [B,T,K,H] with K dividing N, got "
            f"{q_BTNH.shape}, {k_BTKH.shape}, {v_BTKH.shape}"
        )
    if min(sizes.values()) <= 0 or (window is not None and window <= 0):
        raise ValueError(f"{', '.join(sizes)} and window must be positive, got {sizes}, {window}")
    return K


def blocked_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    window: int | None,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Causal attention of q [B,T,N,H] over k, v [B,T,K,H]; token i sees i - w < j <= i."""
    B, T, N, H = q_BTNH.shape
    K = check_qkv(q_BTNH, k_BTKH, v_BTKH, window, block=block)
    G = N // K
    b = min(block, T)
    n = -(-T // b)
    kind = schedule(n, b, window)
    n += n % 2 if kind == "triangle" else 0  # the triangle pairs blocks up
    pad = n * b - T

    def to_blocks(x_BTXH, *group):  # [B, T, K, (G,) H] -> [B, K, n, b, (G,) H]
        x = jnp.pad(x_BTXH, [(0, 0), (0, pad)] + [(0, 0)] * (x_BTXH.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, b, K, *group, H), 3, 1)

    q = to_blocks(q_BTNH.reshape(B, T, K, G, H), G)
    y = _attention(q, to_blocks(k_BTKH), to_blocks(v_BTKH), window, kind)
    return jnp.moveaxis(y, 1, 3).reshape(B, n * b, N, H)[:, :T]


# --- one tile per row -------------------------------------------------------------------


def _mask(qb_R, kb_R, block: int, window: int | None):
    """[R, b, 1, c]: key c of block kb_R visible to query b of block qb_R (causal, window)."""
    pos = jnp.arange(block)
    diff = ((qb_R - kb_R) * block)[:, None, None] + pos[:, None] - pos[None, :]
    visible = (diff >= 0) & (kb_R >= 0)[:, None, None]
    if window is not None:
        visible &= diff < window
    return visible[:, :, None, :]


def _scores(q, k, mask, scale):
    s = jnp.einsum("zkrbgh,zkrch->zkrbgc", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, s * scale, -jnp.inf)


def _tile_fwd(q, k, v, mask, m, l, acc, scale):
    """Online-softmax update of the row state (m, l, acc) with one tile of keys."""
    s = _scores(q, k, mask, scale)
    m_new = jnp.maximum(m, s.max(-1))
    # A row with nothing visible yet keeps m = -inf; 0 as reference avoids inf - inf.
    m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_ref[..., None])
    alpha = jnp.exp(m - m_ref)
    pv = jnp.einsum(
        "zkrbgc,zkrch->zkrbgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv


def _tile_bwd(q, k, v, dy, lse, delta, mask, scale):
    """(dq, dk, dv) of one tile, from the saved log-sum-exp and delta = rowsum(dy * y)."""
    p = jnp.exp(_scores(q, k, mask, scale) - lse[..., None])  # masked: exp(-inf) = 0
    dp = jnp.einsum("zkrbgh,zkrch->zkrbgc", dy, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
    f32 = jnp.float32
    dq = jnp.einsum("zkrbgc,zkrch->zkrbgh", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("zkrbgc,zkrbgh->zkrch", ds, q, preferred_element_type=f32)
    dv = jnp.einsum("zkrbgc,zkrbgh->zkrch", p.astype(dy.dtype), dy, preferred_element_type=f32)
    return dq, dk, dv


def _blocks(x, start, size):
    return lax.dynamic_slice_in_dim(x, start, size, axis=2)


def _add_blocks(x, start, update):
    return lax.dynamic_update_slice_in_dim(x, _blocks(x, start, update.shape[2]) + update, start, 2)


def _pad_blocks(x, left: int, right: int = 0):
    return jnp.pad(x, [(0, 0), (0, 0), (left, right)] + [(0, 0)] * (x.ndim - 3))


# --- band schedule: step d pairs query block i with key block i - d ---------------------


def _band_fwd(q, k, v, window, scale):
    n, block = q.shape[2], q.shape[3]
    n_off = num_offsets(n, block, window)
    k_pad, v_pad = _pad_blocks(k, n_off - 1), _pad_blocks(v, n_off - 1)
    qb = jnp.arange(n)

    def step(d, state):
        start = n_off - 1 - d  # key block i - d sits at i - d + n_off - 1 in k_pad
        k_d, v_d = _blocks(k_pad, start, n), _blocks(v_pad, start, n)
        return _tile_fwd(q, k_d, v_d, _mask(qb, qb - d, block, window), *state, scale)

    m = jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)
    init = (m, jnp.zeros(q.shape[:-1], jnp.float32), jnp.zeros(q.shape, jnp.float32))
    return lax.fori_loop(0, n_off, step, init)


def _band_bwd(q, k, v, dy, lse, delta, window, scale):
    n, block = q.shape[2], q.shape[3]
    n_off = num_offsets(n, block, window)
    k_pad, v_pad = _pad_blocks(k, n_off - 1), _pad_blocks(v, n_off - 1)
    qb = jnp.arange(n)

    def step(d, grads):
        dq, dk_pad, dv_pad = grads
        start = n_off - 1 - d
        k_d, v_d = _blocks(k_pad, start, n), _blocks(v_pad, start, n)
        mask = _mask(qb, qb - d, block, window)
        dq_d, dk_d, dv_d = _tile_bwd(q, k_d, v_d, dy, lse, delta, mask, scale)
        return dq + dq_d, _add_blocks(dk_pad, start, dk_d), _add_blocks(dv_pad, start, dv_d)

    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    init = (zeros(q.shape), zeros(k_pad.shape), zeros(v_pad.shape))
    dq, dk_pad, dv_pad = lax.fori_loop(0, n_off, step, init)
    return dq, dk_pad[:, :, n_off - 1 :], dv_pad[:, :, n_off - 1 :]


# --- triangle schedule: row p holds query block p, then query block n-1-p ----------------
# At step t in [0, n], row p works on (query p, key t) while t <= p ("low" rows) and on
# (query n-1-p, key t-1-p) after. Low rows all read key block t; the others read key blocks
# t-1-p, a contiguous run of the block-reversed keys starting at n - t.


def _split(x):
    """Low half [0, n/2) and the reversed high half (row p holds block n-1-p)."""
    h = x.shape[2] // 2
    return x[:, :, :h], jnp.flip(x[:, :, h:], axis=2)


def _rows(low_R, a_low, a_high):
    """Per row: `a_low` where the row is low, else `a_high` (rows on axis 2)."""
    ndim = max(jnp.ndim(a_low), jnp.ndim(a_high))
    return jnp.where(low_R.reshape((1, 1, -1) + (1,) * (ndim - 3)), a_low, a_high)


def _triangle_step(t, k, v, k_rev, v_rev, block, window):
    """Row selector, key/value rows and mask of step t."""
    h = k.shape[2] // 2
    p_R = jnp.arange(h)
    low_R = p_R >= t
    k_t, v_t = _blocks(k, jnp.minimum(t, 2 * h - 1), 1), _blocks(v, jnp.minimum(t, 2 * h - 1), 1)
    n_rev = 2 * h - t  # key block t-1-p is reversed block n-t+p
    k_R = _rows(low_R, k_t, _blocks(k_rev, n_rev, h))
    v_R = _rows(low_R, v_t, _blocks(v_rev, n_rev, h))
    qb_R = jnp.where(low_R, p_R, 2 * h - 1 - p_R)
    kb_R = jnp.where(low_R, t, t - 1 - p_R)
    return low_R, k_R, v_R, _mask(qb_R, kb_R, block, window)


def _triangle_fwd(q, k, v, window, scale):
    n, block = q.shape[2], q.shape[3]
    h = n // 2
    q_lo, q_hi = _split(q)
    k_rev, v_rev = _pad_blocks(jnp.flip(k, 2), 0, h), _pad_blocks(jnp.flip(v, 2), 0, h)

    def step(t, state):
        low_R, k_R, v_R, mask = _triangle_step(t, k, v, k_rev, v_rev, block, window)
        rows = [_rows(low_R, lo, hi) for lo, hi in zip(state[0::2], state[1::2], strict=True)]
        new = _tile_fwd(_rows(low_R, q_lo, q_hi), k_R, v_R, mask, *rows, scale)
        out = []
        for x, lo, hi in zip(new, state[0::2], state[1::2], strict=True):
            out += [_rows(low_R, x, lo), _rows(low_R, hi, x)]
        return tuple(out)

    m = jnp.full(q_lo.shape[:-1], -jnp.inf, jnp.float32)
    l, acc = jnp.zeros(q_lo.shape[:-1], jnp.float32), jnp.zeros(q_lo.shape, jnp.float32)
    m_lo, m_hi, l_lo, l_hi, acc_lo, acc_hi = lax.fori_loop(0, n + 1, step, (m, m, l, l, acc, acc))
    join = lambda lo, hi: jnp.concatenate([lo, jnp.flip(hi, 2)], axis=2)  # noqa: E731
    return join(m_lo, m_hi), join(l_lo, l_hi), join(acc_lo, acc_hi)


def _triangle_bwd(q, k, v, dy, lse, delta, window, scale):
    n, block = q.shape[2], q.shape[3]
    h = n // 2
    (q_lo, q_hi), (dy_lo, dy_hi) = _split(q), _split(dy)
    (lse_lo, lse_hi), (delta_lo, delta_hi) = _split(lse), _split(delta)
    k_rev, v_rev = _pad_blocks(jnp.flip(k, 2), 0, h), _pad_blocks(jnp.flip(v, 2), 0, h)

    def step(t, grads):
        dq_lo, dq_hi, dk, dv, dk_rev, dv_rev = grads
        low_R, k_R, v_R, mask = _triangle_step(t, k, v, k_rev, v_rev, block, window)
        sel = functools.partial(_rows, low_R)
        dq_R, dk_R, dv_R = _tile_bwd(
            sel(q_lo, q_hi), k_R, v_R, sel(dy_lo, dy_hi),
            sel(lse_lo, lse_hi), sel(delta_lo, delta_hi), mask, scale,
        )  # fmt: skip
        zero = jnp.zeros((), jnp.float32)
        dq_lo, dq_hi = dq_lo + sel(dq_R, zero), dq_hi + sel(zero, dq_R)
        t_blk, n_rev = jnp.minimum(t, n - 1), n - t  # at t = n no row is low: adds zero
        dk = _add_blocks(dk, t_blk, sel(dk_R, zero).sum(2, keepdims=True))
        dv = _add_blocks(dv, t_blk, sel(dv_R, zero).sum(2, keepdims=True))
        dk_rev = _add_blocks(dk_rev, n_rev, sel(zero, dk_R))
        dv_rev = _add_blocks(dv_rev, n_rev, sel(zero, dv_R))
        return dq_lo, dq_hi, dk, dv, dk_rev, dv_rev

    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    init = (zeros(q_lo.shape), zeros(q_lo.shape), zeros(k.shape), zeros(v.shape))
    init += (zeros(k_rev.shape), zeros(v_rev.shape))
    dq_lo, dq_hi, dk, dv, dk_rev, dv_rev = lax.fori_loop(0, n + 1, step, init)
    dq = jnp.concatenate([dq_lo, jnp.flip(dq_hi, 2)], axis=2)
    return dq, dk + jnp.flip(dk_rev[:, :, :n], 2), dv + jnp.flip(dv_rev[:, :, :n], 2)


# --- custom VJP ---------------------------------------------------------------------------


def _forward(q, k, v, window, kind):
    """Output [B,K,n,b,G,H] in q's dtype and the fp32 row log-sum-exp [B,K,n,b,G]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    run = _band_fwd if kind == "band" else _triangle_fwd
    m, l, acc = run(q, k, v, window, scale)
    # Every row sees at least its own key, so l > 0 and m is finite.
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, window, kind):
    return _forward(q, k, v, window, kind)[0]


def _attention_fwd(q, k, v, window, kind):
    y, lse = _forward(q, k, v, window, kind)
    return y, (q, k, v, y, lse)


def _attention_bwd(window, kind, res, dy):
    q, k, v, y, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)
    run = _band_bwd if kind == "band" else _triangle_bwd
    dq, dk, dv = run(q, k, v, dy, lse, delta, window, scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
