"""The Decoder: prefill, then one jitted decode step reused for every token.

A `Decoder` holds a model's jitted steps (built once per model structure, so a step passes
only arrays) and its weights in the compute dtype (cast once per model). Prompts are padded
and caches sized to multiples of `kv_cache.CACHE_BUCKET` (capped at a learned table's end), so
every length within a bucket reuses one compiled prefill and decode step. `decode_steps`
yields a model's tokens one step at a time.

Sample i draws with key fold_in(seed_key(seed), i), and the token at position p with that key
folded with p, so a sample does not depend on the batch it is generated in. Seeds lie in
[0, 2**64); below 2**32, seed_key(seed) is PRNGKey(seed).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.config import ModelConfig
from gpt2_jax.decode.kv_cache import (
    bucket_len,
    cache_size,
    decode_state,
    decoding_model,
    forward_cached,
    prefill,
)
from gpt2_jax.decode.sampling import Sampling, sample, step_keys
from gpt2_jax.errors import UserError
from gpt2_jax.model.gpt import GPT

TRACES: collections.Counter = collections.Counter()  # how often each jitted step was traced


@functools.lru_cache(maxsize=16)
def _steps(graph: tuple) -> tuple:
    """Jitted prefill and decode steps closing over one model structure, so a call hashes no
    graph: only arrays (and the static sampling filters) cross the jit boundary."""

    # Temperature is traced (greedy and sampled share one compilation); top-k / top-p static.
    @functools.partial(jax.jit, static_argnames=("size", "top_k", "top_p"))
    def prefill_step(leaves, prompt_BP, length, keys_B, temperature, size, top_k, top_p):
        TRACES["prefill"] += 1
        logits_BV, cache = prefill(decoding_model(graph, leaves), prompt_BP, size, length=length)
        pos_B = jnp.full(keys_B.shape[:1], length, jnp.int32)
        tok_B = sample(logits_BV, step_keys(keys_B, pos_B), temperature, top_k=top_k, top_p=top_p)
        return tok_B, logits_BV, cache

    @functools.partial(jax.jit, static_argnames=("top_k", "top_p"), donate_argnames=("cache",))
    def decode_step(leaves, cache, tok_B, pos_B, keys_B, temperature, top_k, top_p):
        """Feed the token at `pos_B`, draw the one at `pos_B + 1`."""
        TRACES["decode"] += 1
        model = decoding_model(graph, leaves)
        logits_B1V, cache = forward_cached(model, cache, tok_B[:, None], pos_B[:, None])
        logits_BV, pos_B = logits_B1V[:, 0], pos_B + 1
        tok_B = sample(logits_BV, step_keys(keys_B, pos_B), temperature, top_k=top_k, top_p=top_p)
        return tok_B, logits_BV, cache, pos_B

    return prefill_step, decode_step


class Decoder:
    """One model's jitted prefill and decode steps and its decoding weights
    (`kv_cache.decode_state`): compiled once per model structure, cast once per model."""

    def __init__(self, model: GPT) -> None:
        self.state = decode_state(model)
        self._prefill, self._decode = _steps(self.state.graph)

    def prefill(self, prompt_BP, length: int, keys_B, temperature, size: int, sampling):
        """(token_B drawn at position `length`, its logits_BV, cache of `size` slots) after
        the first `length` tokens of `prompt_BP` (the rest is padding)."""
        return self._prefill(self.state.leaves, prompt_BP, jnp.int32(length), keys_B,
                             temperature, size, **sampling.filters)  # fmt: skip

    def decode(self, cache, tok_B, pos_B, keys_B, temperature, sampling):
        """(next token_B, its logits_BV, cache, pos_B + 1) after feeding `tok_B` at `pos_B`."""
        return self._decode(self.state.leaves, cache, tok_B, pos_B, keys_B, temperature,
                            **sampling.filters)  # fmt: skip


def padded_prompt(cfg: ModelConfig, prompt_BT) -> np.ndarray:
    """int32 [B, bucket_len(T)]: the prompt, then zeros (a compile serves a whole bucket)."""
    prompt_BT = np.asarray(prompt_BT)
    B, T = prompt_BT.shape
    out_BP = np.zeros((B, bucket_len(cfg, T)), np.int32)
    out_BP[:, :T] = prompt_BT
    return out_BP


SEED_LIMIT = 2**64


def seed_key(seed: int) -> jax.Array:
    """PRNGKey of the seed's low 32 bits, with its high 32 bits folded in when nonzero."""
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed must be in [0, 2**64), got {seed}")
    # PRNGKey keeps only 32 bits (without jax_enable_x64), so 2**32 would silently equal 0.
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    return jax.random.fold_in(key, np.uint32(seed >> 32)) if seed >> 32 else key


def sample_keys(seed: int | jax.Array, num_samples: int, first: int = 0) -> jax.Array:
    """Keys of samples first..first+num_samples-1 for a seed (or a PRNG key)."""
    key = seed_key(int(seed)) if isinstance(seed, int | np.integer) else seed
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(first, first + num_samples))


def new_token_budget(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens may follow a prompt: `max_new_tokens`, cut at a learned table's end."""
    cfg = model.cfg
    if prompt_len < 1:
        raise UserError("the prompt is empty; give at least one token")
    if cfg.pos_embedding != "learned":
        return max_new_tokens
    if prompt_len > cfg.max_seq_len:
        raise UserError(
            f"the prompt is {prompt_len} tokens but the model has learned positions up to "
            f"max_seq_len={cfg.max_seq_len}; shorten the prompt"
        )
    return min(max_new_tokens, cfg.max_seq_len - prompt_len)


def decode_steps(
    model: GPT,
    prompt_BT,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    keys_B: jax.Array,
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Yield (tokens_B, logits_BV) for each new token, on device; the logits are the model's
    raw output the token was drawn from. The caller enforces length limits.

    The prompt is padded and the cache sized to buckets (`kv_cache.bucket_len`), so prompts
    and budgets within one bucket reuse the compiled steps."""
    B, T = np.shape(prompt_BT)
    if max_new_tokens <= 0:
        return
    dec = Decoder(model)
    size = cache_size(model.cfg, bucket_len(model.cfg, T + max_new_tokens))
    temperature = jnp.float32(sampling.temperature)
    tok_B, logits_BV, cache = dec.prefill(
        padded_prompt(model.cfg, prompt_BT), T, keys_B, temperature, size, sampling
    )
    pos_B = jnp.full((B,), T, jnp.int32)
    for i in range(max_new_tokens):
        if i + 1 < max_new_tokens:  # dispatch the next step before the caller reads this one
            nxt_B, nxt_logits_BV, cache, pos_B = dec.decode(
                cache, tok_B, pos_B, keys_B, temperature, sampling
            )
        yield tok_B, logits_BV
        if i + 1 < max_new_tokens:
            tok_B, logits_BV = nxt_B, nxt_logits_BV


def prompt_batch(prompt_tokens, num_samples: int) -> np.ndarray:
    prompt = np.asarray(prompt_tokens, np.int64)
    if prompt.ndim == 1:
        prompt = np.broadcast_to(prompt, (num_samples, prompt.shape[0]))
    elif prompt.ndim != 2 or (num_samples != 1 and num_samples != prompt.shape[0]):
        raise UserError(
            f"prompt_tokens must be a 1-D list or a [num_samples, T] array, got shape "
            f"{prompt.shape} with num_samples={num_samples}"
        )
    return prompt


def check_prompt(model: GPT, prompt_BT: np.ndarray) -> None:
    if prompt_BT.size and (prompt_BT.min() < 0 or prompt_BT.max() >= model.cfg.vocab_size):
        raise UserError(
            f"prompt token ids must lie in [0, {model.cfg.vocab_size}) for this model, got "
            f"[{prompt_BT.min()}, {prompt_BT.max()}]"
        )
