"""Generating from a model: `generate(model, prompt_tokens, ...)` returns token ids and
`token_stream` yields them as they are decided, from the model alone (`decoder`) or with a
draft model (`speculative`).

Learned-position models cannot go past `max_seq_len`: generation stops there (a warning says
so) and a longer prompt is an error. RoPE models have no such limit; with a sliding window the
cache stays w slots however long the output.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import jax
import numpy as np

from gpt2_jax.decode.decoder import (
    check_prompt,
    decode_steps,
    new_token_budget,
    prompt_batch,
    sample_keys,
)
from gpt2_jax.decode.sampling import Sampling
from gpt2_jax.decode.speculative import speculative_steps
from gpt2_jax.model.gpt import GPT


def token_stream(
    model: GPT,
    prompt_tokens,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    seed: int | jax.Array = 0,
    num_samples: int = 1,
    first_sample: int = 0,
    draft: GPT | None = None,
    speculative_k: int = 4,
    stats=None,
) -> Iterator[list[np.ndarray]]:
    """Yield each row's new token ids as they are decided (a list of B int arrays per step).

    With a `draft` model, tokens come from speculative decoding (`gpt2_jax.decode.speculative`) and
    a step may yield several tokens per row; `stats` (a `SpecStats`) collects acceptance.
    """
    sampling = Sampling() if sampling is None else sampling
    prompt_BT = prompt_batch(prompt_tokens, num_samples)
    check_prompt(model, prompt_BT)
    budget = new_token_budget(model, prompt_BT.shape[1], max_new_tokens)
    if budget < max_new_tokens:
        warnings.warn(
            f"stopping after {budget} new tokens: the model's learned positions end at "
            f"max_seq_len={model.cfg.max_seq_len}",
            stacklevel=2,
        )
    keys_B = sample_keys(seed, prompt_BT.shape[0], first_sample)
    if draft is not None:
        yield from speculative_steps(
            model, draft, prompt_BT, max_new_tokens=budget, k=speculative_k,
            sampling=sampling, keys_B=keys_B, stats=stats,
        )  # fmt: skip
        return
    for tok_B, _ in decode_steps(
        model, prompt_BT, max_new_tokens=budget, sampling=sampling, keys_B=keys_B
    ):
        yield list(np.asarray(tok_B)[:, None])


def generate(
    model: GPT,
    prompt_tokens,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | jax.Array = 0,
    num_samples: int = 1,
    draft: GPT | None = None,
    speculative_k: int = 4,
) -> np.ndarray:
    """New token ids [num_samples, n] after `prompt_tokens` (a list of ids, or [B, T]).

    n = max_new_tokens unless a learned position table ends first (then a warning).
    """
    sampling = Sampling(temperature, top_k, top_p)
    rows: list[list[np.ndarray]] | None = None
    for step in token_stream(
        model, prompt_tokens, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
        num_samples=num_samples, draft=draft, speculative_k=speculative_k,
    ):  # fmt: skip
        rows = rows or [[] for _ in step]
        for row, part in zip(rows, step, strict=True):
            row.append(part)
    if rows is None:
        return np.zeros((prompt_batch(prompt_tokens, num_samples).shape[0], 0), np.int32)
    return np.stack([np.concatenate(r) for r in rows]).astype(np.int32)
