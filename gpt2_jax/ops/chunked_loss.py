"""LM head + cross-entropy fused over sequence chunks: the [tokens, vocab] logits never exist.

`chunked_cross_entropy(x, w, y)` equals `cross_entropy(x @ w.T, y)` (padded ids masked), but
it walks the sequence `chunk` positions at a time, so at most [batch, chunk, vocab] logits are
alive. Under differentiation the forward pass also turns each chunk's logits into that
chunk's gradient of `x` and its share of the head weights' gradient (softmax minus one-hot);
the backward pass only scales those two by the incoming cotangent. The head matmul is done
three times per chunk (logits, dx, dw), as in the unfused path, never a fourth.

Shape suffixes as in `gpt2_jax.model.gpt`; C is the chunk length, N = B·C rows of one chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gpt2_jax.ops.vocab_mask import mask_vocab
from gpt2_jax.parallel.sharding import constrain

SCOPE = "lm_head_loss"
# The head weight's orientation: the tied embedding table is [V, D], an untied kernel [D, V].
_EQUATIONS = {  # layout → (logits, dx, dw)
    "VD": ("nd,vd->nv", "nv,vd->nd", "nv,nd->vd"),
    "DV": ("nd,dv->nv", "nv,dv->nd", "nv,nd->dv"),
}


def chunked_cross_entropy(
    x_BTD: jax.Array,
    w: jax.Array,
    targets_BT: jax.Array,
    *,
    n_valid: int,
    chunk: int,
    layout: str = "VD",
) -> jax.Array:
    """Mean next-token NLL (fp32) of the logits `x_BTD @ w` (w [V, D] for layout "VD", [D, V]
    for "DV"), with ids >= n_valid excluded, computed `chunk` sequence positions at a time.

    Matmul operands stay in their dtype (the compute dtype) with fp32 accumulation.
    """
    if layout not in _EQUATIONS:
        raise ValueError(f"layout must be one of {tuple(_EQUATIONS)}, got {layout!r}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return _fused(n_valid, chunk, layout, x_BTD, w, targets_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(n_valid, chunk, layout, x_BTD, w, targets_BT):
    return _walk(n_valid, chunk, layout, x_BTD, w, targets_BT, grads=False)[0]


def _fused_fwd(n_valid, chunk, layout, x_BTD, w, targets_BT):
    loss, dx_BTD, dw = _walk(n_valid, chunk, layout, x_BTD, w, targets_BT, grads=True)
    return loss, (dx_BTD, dw)


def _fused_bwd(n_valid, chunk, layout, residuals, g):
    dx_BTD, dw = residuals
    return (g * dx_BTD).astype(dx_BTD.dtype), (g * dw).astype(dw.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _walk(n_valid, chunk, layout, x_BTD, w, targets_BT, *, grads: bool):
    """(mean loss, dx, dw): full chunks in a loop, a shorter last chunk after it; dx and dw
    are the gradients of the mean loss (None without `grads`)."""
    # The scope names these ops in the HLO, for `bench profile`.
    with jax.named_scope(SCOPE):
        return _walk_chunks(n_valid, chunk, layout, x_BTD, w, targets_BT, grads=grads)


def _walk_chunks(n_valid, chunk, layout, x_BTD, w, targets_BT, *, grads: bool):
    B, T, D = x_BTD.shape
    C = min(chunk, T)
    n_full, rest = divmod(T, C)
    scale = 1.0 / (B * T)
    one = functools.partial(_chunk, n_valid, layout, w, scale=scale, grads=grads)

    def step(start, length, carry):
        x_BCD = jax.lax.dynamic_slice_in_dim(x_BTD, start, length, axis=1)
        t_BC = jax.lax.dynamic_slice_in_dim(targets_BT, start, length, axis=1)
        loss_BT, dx_BTD, dw = carry
        loss_BC, dx_BCD, dw_c = one(x_BCD, t_BC)
        loss_BT = jax.lax.dynamic_update_slice_in_dim(loss_BT, loss_BC, start, axis=1)
        if grads:
            dx_BTD = jax.lax.dynamic_update_slice_in_dim(dx_BTD, dx_BCD, start, axis=1)
            dw = dw_c if dw is None else dw + dw_c
        return loss_BT, dx_BTD, dw

    # Per-token losses, averaged at the end as `cross_entropy` does: the same sum order.
    loss_BT = constrain(jnp.zeros((B, T), jnp.float32), "batch", None)
    dx_BTD = constrain(jnp.zeros_like(x_BTD), "batch", None, None) if grads else None
    # The first chunk starts dw, outside the loop: a zero-filled [V, D] table to add it to
    # was one more pass over the table (30 ms per step at d 768 on CPU).
    carry = step(0, C, (loss_BT, dx_BTD, None))
    carry = jax.lax.fori_loop(1, n_full, lambda i, c: step(i * C, C, c), carry)
    if rest:
        carry = step(n_full * C, rest, carry)
    loss_BT, dx_BTD, dw = carry
    return jnp.mean(loss_BT), dx_BTD, None if dw is None else dw.astype(w.dtype)


def _chunk(n_valid, layout, w, x_BCD, t_BC, *, scale: float, grads: bool):
    """Per-token losses [B, C] of one chunk and, with `grads`, its dx [B, C, D] and dw (fp32)."""
    B, C, D = x_BCD.shape
    logits_eq, dx_eq, dw_eq = _EQUATIONS[layout]
    x_ND = x_BCD.reshape(B * C, D)  # 2-D operands: see `gpt2_jax.model.Dense`
    t_N = t_BC.reshape(B * C)
    logits_NV = jnp.einsum(logits_eq, x_ND, w, preferred_element_type=jnp.float32)
    logits_NV = mask_vocab(constrain(logits_NV, "batch", "vocab"), n_valid)
    # The exponentials are taken once and serve both the log-sum-exp and the softmax: a
    # second exp pass over [N, V] (jax.nn.logsumexp, then exp(logits - lse)) cost 20% of the
    # head's time on CPU.
    max_N = jnp.max(logits_NV, axis=-1)
    exp_NV = jnp.exp(logits_NV - max_N[:, None])
    sum_N = jnp.sum(exp_NV, axis=-1)
    target_N = jnp.take_along_axis(logits_NV, t_N[:, None], axis=-1)[:, 0]
    loss_BC = (max_N + jnp.log(sum_N) - target_N).reshape(B, C)
    if not grads:
        return loss_BC, None, None
    V = logits_NV.shape[-1]
    # d(mean loss)/d(logits) = (softmax - one_hot) / tokens
    one_hot_NV = jnp.arange(V) == t_N[:, None]
    d_NV = (exp_NV * (scale / sum_N)[:, None] - one_hot_NV * scale).astype(x_ND.dtype)
    dx_ND = jnp.einsum(dx_eq, d_NV, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(dw_eq, d_NV, x_ND, preferred_element_type=jnp.float32)
    return loss_BC, dx_ND.astype(x_BCD.dtype).reshape(B, C, D), dw
