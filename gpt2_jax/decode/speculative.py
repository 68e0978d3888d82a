"""Speculative decoding: a small draft proposes k tokens, the target scores them in one pass.

Acceptance follows the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023):
draft token d_i ~ q_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection a token is drawn from normalise(max(p_i − q_i, 0)), and when all k are kept one more
comes from p_{k+1}. Each emitted token is then distributed exactly as the target's (warped)
p, so greedy (one-hot p and q) reproduces target-only greedy decoding.

State per row: n committed tokens; both caches hold positions < n − 1 and the last token is
pending. Rows advance by different amounts; each row carries its own positions.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.decode.decoder import padded_prompt
from gpt2_jax.decode.kv_cache import (
    bucket_len,
    cache_size,
    decode_state,
    decoding_model,
    forward_cached,
    prefill,
)
from gpt2_jax.decode.sampling import Sampling, categorical, probs, sample, step_keys
from gpt2_jax.errors import UserError
from gpt2_jax.model.gpt import GPT

TRACES: collections.Counter = collections.Counter()  # how often each jitted step was traced


def check_compatible(target: GPT, draft: GPT, k: int) -> None:
    """Refuse a draft that cannot propose the target's tokens."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(
            f"draft vocab_size={draft.cfg.vocab_size} differs from the target's "
            f"{target.cfg.vocab_size}; draft and target must share one tokenizer and vocabulary"
        )
    if k < 1:
        raise UserError(f"speculative k must be >= 1, got {k}")


@functools.lru_cache(maxsize=16)
def _steps(tgraph: tuple, dgraph: tuple) -> tuple:
    """Jitted start and round of one target / draft structure pair; calls pass only arrays."""
    start = jax.jit(functools.partial(_start, tgraph, dgraph),
                    static_argnames=("t_size", "d_size", "top_k", "top_p"))  # fmt: skip
    round_ = jax.jit(functools.partial(_round, tgraph, dgraph),
                     static_argnames=("k", "top_k", "top_p"), donate_argnums=(2, 3))  # fmt: skip
    return start, round_


def _start(tgraph, dgraph, tleaves, dleaves, prompt_BP, length, keys_B, temperature, t_size,
           d_size, top_k, top_p):  # fmt: skip
    """Prefill both models on the prompt (its first `length` tokens) and draw the first token
    from the target."""
    TRACES["start"] += 1
    target, draft = decoding_model(tgraph, tleaves), decoding_model(dgraph, dleaves)
    t_logits_BV, t_cache = prefill(target, prompt_BP, t_size, length=length)
    _, d_cache = prefill(draft, prompt_BP, d_size, length=length)
    keys_B = step_keys(keys_B, jnp.full(keys_B.shape[:1], length))
    first_B = sample(t_logits_BV, keys_B, temperature, top_k=top_k, top_p=top_p)
    return first_B, t_cache, d_cache


def _round(tgraph, dgraph, tleaves, dleaves, t_cache, d_cache, last2_B2, n_B, limit_B, keys_B,
           temperature, k, top_k, top_p):  # fmt: skip
    """One draft-then-verify round. Returns new tokens [B, k+1] (the first `count_B` valid),
    count_B, accepted_B (draft tokens kept), updated caches, last two tokens and n."""
    TRACES["round"] += 1
    target, draft = decoding_model(tgraph, tleaves), decoding_model(dgraph, dleaves)
    V = target.cfg.vocab_size  # p and q over the shared logical vocab: the pads may differ

    def dist(logits_BV):
        return probs(logits_BV[..., :V], temperature, top_k=top_k, top_p=top_p)

    B = n_B.shape[0]
    active_B = n_B < limit_B
    round_keys_B = step_keys(keys_B, n_B)  # rows at different n draw independent numbers
    key_of = lambda i: jax.vmap(jax.random.fold_in)(round_keys_B, jnp.full((B,), i))  # noqa: E731

    # Draft: re-feed token n-2 with n-1, so a fully accepted last round leaves no cache gap.
    pos2_B2 = n_B[:, None] + jnp.array([-2, -1])
    d_logits_B2V, d_cache = forward_cached(draft, d_cache, last2_B2, pos2_B2)
    q1_BV = dist(d_logits_B2V[:, -1])
    d1_B = categorical(key_of(0), q1_BV)

    def draft_step(carry, i):
        cache, tok_B = carry
        logits_B1V, cache = forward_cached(draft, cache, tok_B[:, None], (n_B + i - 1)[:, None])
        q_BV = dist(logits_B1V[:, 0])
        nxt_B = categorical(key_of(i + 1), q_BV)
        return (cache, nxt_B), (nxt_B, q_BV)

    (d_cache, _), (ds_KB, qs_KBV) = jax.lax.scan(draft_step, (d_cache, d1_B), jnp.arange(1, k))
    drafts_BK = jnp.concatenate([d1_B[:, None], ds_KB.T], axis=1)
    q_BKV = jnp.concatenate([q1_BV[:, None], qs_KBV.transpose(1, 0, 2)], axis=1)

    # Target: score the pending token and all k drafts in one pass.
    chunk_BK1 = jnp.concatenate([last2_B2[:, 1:], drafts_BK], axis=1)
    pos_BK1 = n_B[:, None] - 1 + jnp.arange(k + 1)
    t_logits_BK1V, t_cache = forward_cached(target, t_cache, chunk_BK1, pos_BK1)
    p_BK1V = dist(t_logits_BK1V.reshape(B * (k + 1), -1)).reshape(B, k + 1, -1)

    pick = lambda a_BKV: jnp.take_along_axis(a_BKV, drafts_BK[..., None], -1)[..., 0]  # noqa: E731
    p_d_BK, q_d_BK = pick(p_BK1V[:, :k]), pick(q_BKV)
    u_BK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(key_of(k + 1))
    ok_BK = u_BK * q_d_BK < p_d_BK  # u < p/q without dividing
    accepted_B = jnp.sum(jnp.cumprod(ok_BK, axis=1), axis=1)

    # Correction: residual at the first rejection, or p_{k+1} when all were kept.
    resid_BK1V = jnp.concatenate([jnp.maximum(p_BK1V[:, :k] - q_BKV, 0.0), p_BK1V[:, k:]], 1)
    rows_B = jnp.arange(B)
    resid_BV = resid_BK1V[rows_B, accepted_B]
    mass_B1 = resid_BV.sum(-1, keepdims=True)
    # Rounding can reject when p ≈ q, leaving no residual mass: fall back to p itself.
    # (categorical draws from unnormalised weights.)
    resid_BV = jnp.where(mass_B1 > 0, resid_BV, p_BK1V[rows_B, accepted_B])
    fix_B = categorical(key_of(k + 2), resid_BV)

    slot_K1 = jnp.arange(k + 1)
    drafts_BK1 = jnp.concatenate([drafts_BK, drafts_BK[:, -1:]], axis=1)
    new_BK1 = jnp.where(slot_K1 < accepted_B[:, None], drafts_BK1, fix_B[:, None])
    count_B = jnp.where(active_B, accepted_B + 1, 0)
    before_B = jnp.where(accepted_B > 0, drafts_BK1[rows_B, accepted_B - 1], last2_B2[:, 1])
    new_last2_B2 = jnp.where(active_B[:, None], jnp.stack([before_B, fix_B], 1), last2_B2)
    accepted_B = jnp.where(active_B, accepted_B, 0)
    return new_BK1, count_B, accepted_B, t_cache, d_cache, new_last2_B2, n_B + count_B


class SpecStats:
    """Running acceptance figures."""

    def __init__(self) -> None:
        self.proposed = 0
        self.accepted = 0
        self.rounds = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.proposed, 1)


def speculative_steps(
    target: GPT,
    draft: GPT,
    prompt_BT: np.ndarray,
    *,
    max_new_tokens: int,
    k: int,
    sampling: Sampling,
    keys_B: jax.Array,
    stats: SpecStats | None = None,
) -> Iterator[list[np.ndarray]]:
    """Yield, after the first token and then after each round, the new tokens of each row
    (a list of B int arrays, possibly empty); rows stop at exactly `max_new_tokens`."""
    check_compatible(target, draft, k)
    B, T = np.shape(prompt_BT)
    if max_new_tokens <= 0:
        return
    # A row may commit k tokens past its limit and then (finished) keep re-running its last
    # round, writing k more; writes run at most k ahead of the earliest query still to come.
    total = T + max_new_tokens + 2 * k + 1
    tstate, dstate = decode_state(target), decode_state(draft)
    start, round_ = _steps(tstate.graph, dstate.graph)
    t_size = cache_size(target.cfg, bucket_len(target.cfg, total), ahead=k)
    d_size = cache_size(draft.cfg, bucket_len(draft.cfg, total), ahead=k)
    temperature = jnp.float32(sampling.temperature)
    first_B, t_cache, d_cache = start(
        tstate.leaves, dstate.leaves, padded_prompt(target.cfg, prompt_BT), jnp.int32(T), keys_B,
        temperature, t_size=t_size, d_size=d_size, **sampling.filters,
    )  # fmt: skip
    first = np.asarray(first_B)
    yield [first[b : b + 1] for b in range(B)]
    done_B = np.ones(B, np.int64)
    last2_B2 = jnp.stack([jnp.asarray(np.asarray(prompt_BT)[:, -1], jnp.int32), first_B], 1)
    n_B = jnp.full((B,), T + 1, jnp.int32)
    limit_B = jnp.full((B,), T + max_new_tokens, jnp.int32)
    while done_B.min() < max_new_tokens:
        new_BK1, count_B, acc_B, t_cache, d_cache, last2_B2, n_B = round_(
            tstate.leaves, dstate.leaves, t_cache, d_cache, last2_B2, n_B, limit_B, keys_B,
            temperature, k=k, **sampling.filters,
        )  # fmt: skip
        new, count, acc = np.asarray(new_BK1), np.asarray(count_B), np.asarray(acc_B)
        take = np.minimum(count, max_new_tokens - done_B)
        if stats is not None:
            stats.rounds += 1
            stats.proposed += int(k * (count > 0).sum())
            stats.accepted += int(acc.sum())
        done_B += take
        yield [new[b, : take[b]] for b in range(B)]


def speculative_generate(
    target: GPT,
    draft: GPT,
    prompt_BT: np.ndarray,
    *,
    max_new_tokens: int,
    k: int,
    sampling: Sampling,
    keys_B: jax.Array,
    stats: SpecStats | None = None,
) -> np.ndarray:
    """All generated tokens [B, max_new_tokens] (see `speculative_steps`)."""
    rows: list[list[np.ndarray]] = [[] for _ in range(np.shape(prompt_BT)[0])]
    for chunk in speculative_steps(
        target, draft, prompt_BT, max_new_tokens=max_new_tokens, k=k, sampling=sampling,
        keys_B=keys_B, stats=stats,
    ):  # fmt: skip
        for row, part in zip(rows, chunk, strict=True):
            row.append(part)
    return np.stack([np.concatenate(r) if r else np.zeros(0, np.int32) for r in rows])
