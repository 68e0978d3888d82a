"""The GPT-2 byte-pair encoding, through tiktoken."""

from __future__ import annotations

import functools

import tiktoken

from gpt2_jax.errors import UserError

EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257


@functools.cache
def encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding; one-line error when its files can be neither read nor fetched."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OSError subclasses when offline
        raise UserError(
            "cannot load tiktoken's gpt2 encoding (no network and no cache); set "
            f"TIKTOKEN_CACHE_DIR to a folder holding its files ({type(e).__name__})"
        ) from None


def encode(text: str) -> list[int]:
    """Token ids of `text`, special tokens treated as plain text."""
    return encoding().encode_ordinary(text)


def decode(tokens) -> str:
    """Text of token ids; an id outside GPT-2's vocabulary is a one-line UserError (tiktoken
    raises KeyError or OverflowError)."""
    ids = [int(t) for t in tokens]
    bad = next((t for t in ids if not 0 <= t < VOCAB_SIZE), None)
    if bad is not None:
        raise UserError(
            f"token id {bad} is outside the GPT-2 vocabulary [0, {VOCAB_SIZE}); a model whose "
            "vocab_size exceeds it (padding) must not emit such ids: mask them in sampling "
            "(gpt2_jax.ops.vocab_mask.mask_vocab)"
        )
    return encoding().decode(ids)
