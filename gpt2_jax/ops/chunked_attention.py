"""Exact causal (optionally sliding-window) grouped-query attention by query chunks.

The queries are cut into chunks of `chunk` positions. Chunk i = [q0, q1) attends to the one
key range its rows can see, [k0, q1) with k0 = 0 (causal) or q0 - w + 1 (window w), as one
batched matmul with an exact softmax over that range. The masked upper triangle and
everything outside the window are never computed: causal work is about (T + chunk) / 2T of
the full T×T scores, windowed work O(T·(chunk + w)).

The forward pass keeps each chunk's probabilities and the custom VJP reuses them, so the
backward pass is four matmuls per chunk and recomputes nothing. That trades memory for
speed: the saved probabilities take B·N·(visible keys) fp32 values per query, which is why
`gpt2_jax.model.attention` picks this path for short contexts (and windows) and the recomputing
`blocked` path for long full-causal ones.

Layout: K/V heads lead and each position's G query heads sit together, q as [B, K, T·G, H]
and k, v as [B, K, S, H]. Every matmul is then a plain batched matmul over (B, K) whose
operands are contiguous, and a chunk of positions is a contiguous block of T·G rows; on
XLA:CPU this is 2-4x faster per matmul than the [B, T, N, H] layout the model projects into.
Internal suffixes: R = rows (positions × G), c·G rows of a chunk, s keys of a chunk.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.ops.blocked_attention import check_qkv

# Measured on the 2-core CPU (BENCHMARKS.md): 64-query chunks make a causal step
# ~5% faster than 128 at T = 256 (fewer masked keys per chunk); with a window, 128 is
# 10% faster at T = 8192 (fewer, larger matmuls per band).
CAUSAL_CHUNK = 64
WINDOW_CHUNK = 128

Span = tuple[int, int, int]  # (q0, q1, k0): queries [q0, q1) see keys [k0, q1)


def spans(T: int, chunk: int, window: int | None) -> tuple[Span, ...]:
    """The static (q0, q1, k0) of every query chunk."""
    out = []
    for q0 in range(0, T, chunk):
        k0 = 0 if window is None else max(0, q0 - window + 1)
        out.append((q0, min(T, q0 + chunk), k0))
    return tuple(out)


def _visible(span: Span, window: int | None, G: int) -> np.ndarray:
    """[(q1 - q0)·G, q1 - k0] boolean: key j visible to query i (j <= i, i - j < w)."""
    q0, q1, k0 = span
    diff = np.arange(q0, q1)[:, None] - np.arange(k0, q1)[None, :]
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    return np.repeat(visible, G, axis=0)  # rows are (position, group head)


def chunked_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    window: int | None,
    chunk: int | None = None,
) -> jax.Array:
    """Causal attention of q [B,T,N,H] over k, v [B,T,K,H]; token i sees i - w < j <= i.

    `chunk` (queries per chunk) defaults to CAUSAL_CHUNK, or WINDOW_CHUNK with a window.
    """
    B, T, N, H = q_BTNH.shape
    if chunk is None:
        chunk = CAUSAL_CHUNK if window is None else WINDOW_CHUNK
    K = check_qkv(q_BTNH, k_BTKH, v_BTKH, window, chunk=chunk)
    G = N // K
    q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    # Scaling q (not the scores) keeps the [rows, keys] passes free of one multiply.
    q_BKRH = q_BKRH * jnp.asarray(1.0 / math.sqrt(H), q_BKRH.dtype)
    y_BKRH = _attention(q_BKRH, k_BKTH, v_BKTH, spans(T, chunk, window), window)
    return y_BKRH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def _rows(x_BKRH, span: Span, G: int):
    return x_BKRH[:, :, span[0] * G : span[1] * G]


def _probs(q_BKRH, k_BKSH, span: Span, window: int | None, G: int):
    """Softmax probabilities [B,K,r,s] (fp32) of one chunk's query rows over its keys."""
    s = jnp.einsum("bkrh,bksh->bkrs", q_BKRH, k_BKSH, preferred_element_type=jnp.float32)
    s = jnp.where(_visible(span, window, G), s, -jnp.inf)
    # Every row sees its own key, so the max is finite and the sum positive.
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _forward(q, k, v, spans_, window):
    G = q.shape[2] // k.shape[2]
    ys, ps = [], []
    for span in spans_:
        k0, k1 = span[2], span[1]
        p = _probs(_rows(q, span, G), k[:, :, k0:k1], span, window, G)
        y = jnp.einsum(
            "bkrs,bksh->bkrh", p.astype(v.dtype), v[:, :, k0:k1], preferred_element_type=jnp.float32
        )
        ys.append(y.astype(q.dtype))
        ps.append(p)
    return jnp.concatenate(ys, axis=2), tuple(ps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, spans_, window):
    return _forward(q, k, v, spans_, window)[0]


def _attention_fwd(q, k, v, spans_, window):
    y, ps = _forward(q, k, v, spans_, window)
    return y, (q, k, v, ps)


def _attention_bwd(spans_, window, res, dy):
    q, k, v, ps = res
    f32 = jnp.float32
    G = q.shape[2] // k.shape[2]
    dk, dv, dqs = jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32), []
    for span, p in zip(spans_, ps, strict=True):
        k0, k1 = span[2], span[1]
        q_r, dy_r, k_s, v_s = _rows(q, span, G), _rows(dy, span, G), k[:, :, k0:k1], v[:, :, k0:k1]
        dp = jnp.einsum("bkrh,bksh->bkrs", dy_r, v_s, preferred_element_type=f32)
        ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))).astype(q.dtype)
        dqs.append(jnp.einsum("bkrs,bksh->bkrh", ds, k_s, preferred_element_type=f32))
        dk_s = jnp.einsum("bkrs,bkrh->bksh", ds, q_r, preferred_element_type=f32)
        dv_s = jnp.einsum("bkrs,bkrh->bksh", p.astype(dy.dtype), dy_r, preferred_element_type=f32)
        dk, dv = dk.at[:, :, k0:k1].add(dk_s), dv.at[:, :, k0:k1].add(dv_s)
    dq = jnp.concatenate(dqs, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
