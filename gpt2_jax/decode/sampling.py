"""Next-token sampling: temperature, top-k and top-p (nucleus), applied in that order.

Temperature 0 is greedy (argmax). Filters keep an exact number of tokens: ties at the cut are
broken towards the lower token id, so top-k keeps exactly k tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gpt2_jax.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How to turn logits into a token (validated user settings)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def filters(self) -> dict:
        """top_k / top_p as keyword arguments; static under jit, while T is traced."""
        return {"top_k": self.top_k, "top_p": self.top_p}


def keep_top_k(logits_BV: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the k largest logits per row (exactly k; ties to the lower id)."""
    if k >= logits_BV.shape[-1]:
        return jnp.ones(logits_BV.shape, bool)
    _, idx_BK = jax.lax.top_k(logits_BV, k)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    return jnp.zeros(logits_BV.shape, bool).at[rows_B1, idx_BK].set(True)


def keep_top_p(logits_BV: jax.Array, p: float) -> jax.Array:
    """Boolean mask of the smallest most-likely set whose softmax mass reaches p."""
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    # A token stays while the mass strictly before it is < p; the top token always stays.
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = before_BV < p
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    return jnp.zeros(logits_BV.shape, bool).at[rows_B1, order_BV].set(keep_sorted_BV)


def warp_logits(
    logits_BV: jax.Array, temperature, *, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """fp32 logits of the sampling distribution: scaled by 1/T, filtered tokens at -inf;
    one-hot (0 at the argmax, -inf elsewhere) when T == 0. T may be traced."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy = temperature == 0
    logits_BV_t = logits_BV / jnp.where(greedy, 1.0, temperature)
    if top_k is not None:
        logits_BV_t = jnp.where(keep_top_k(logits_BV_t, top_k), logits_BV_t, -jnp.inf)
    if top_p is not None and top_p < 1.0:
        logits_BV_t = jnp.where(keep_top_p(logits_BV_t, top_p), logits_BV_t, -jnp.inf)
    argmax_BV = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1]) > 0
    return jnp.where(greedy, jnp.where(argmax_BV, 0.0, -jnp.inf), logits_BV_t)


def probs(logits_BV: jax.Array, temperature, **filters) -> jax.Array:
    """The sampling distribution as fp32 probabilities (one-hot when T == 0)."""
    return jax.nn.softmax(warp_logits(logits_BV, temperature, **filters), axis=-1)


def categorical(keys_B: jax.Array, probs_BV: jax.Array) -> jax.Array:
    """One draw per row from `probs_BV` (rows need not be normalised) by inverting the CDF.

    One uniform number per row: jax.random.categorical draws one Gumbel number per token, and
    50257 of them cost more than a small model's whole decode step on a CPU.
    """
    cdf_BV = jnp.cumsum(probs_BV.astype(jnp.float32), axis=-1)
    u_B = jax.vmap(jax.random.uniform)(keys_B) * cdf_BV[:, -1]
    drawn_B = jnp.sum(cdf_BV <= u_B[:, None], axis=-1)  # first index whose CDF exceeds u
    # Rounding can put u at the total: fall back to the last token with non-zero probability.
    # Zero-probability columns (masked, -inf logits) are thus never drawn, even at the tail.
    last_B = probs_BV.shape[-1] - 1 - jnp.argmax(probs_BV[:, ::-1] > 0, axis=-1)
    return jnp.minimum(drawn_B, last_B).astype(jnp.int32)


def sample(logits_BV: jax.Array, keys_B: jax.Array, temperature, **filters) -> jax.Array:
    """One token per row, row b drawn with its own key `keys_B[b]`; argmax when T == 0."""
    # A cond, not a select: greedy decoding then skips the softmax and CDF over the vocabulary.
    return jax.lax.cond(
        temperature == 0,
        lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32),
        lambda: categorical(keys_B, probs(logits_BV, temperature, **filters)),
    )


def step_keys(keys_B: jax.Array, positions_B: jax.Array) -> jax.Array:
    """Per-row keys for the token at `positions_B`: reproducible whatever the batch holds."""
    return jax.vmap(jax.random.fold_in)(keys_B, positions_B)
