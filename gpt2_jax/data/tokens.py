"""Documents → uint16 token arrays (GPT-2 BPE, `<|endoftext|>` after every document)."""

from __future__ import annotations

import os

import numpy as np

from gpt2_jax import tokenizer
from gpt2_jax.errors import UserError

TOKEN_DTYPE = np.uint16


def check_vocab_fits(n_vocab: int, dtype: type = TOKEN_DTYPE) -> None:
    """Refuse a tokenizer whose ids would not fit the on-disk dtype (they would wrap silently)."""
    limit = int(np.iinfo(dtype).max) + 1
    if n_vocab > limit:
        raise UserError(
            f"tokenizer has {n_vocab} ids but {np.dtype(dtype).name} token files hold at most "
            f"{limit}; use a tokenizer with at most {limit} ids"
        )


def resolve_threads(num_threads: int) -> int:
    """`data.num_threads`, with 0 meaning all CPU cores."""
    if num_threads < 0:
        raise UserError(f"data.num_threads must be >= 0 (0 = all cores), got {num_threads}")
    return num_threads or os.cpu_count() or 1


def encode_documents(texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
    """Token ids of each text (special-token strings are plain text) followed by EOT."""
    enc = tokenizer.encoding()
    check_vocab_fits(enc.n_vocab)
    if len(texts) == 1 or num_threads == 1:
        ids = [enc.encode_ordinary(t) for t in texts]
    else:  # tiktoken releases the GIL while encoding, so threads run in parallel
        ids = enc.encode_ordinary_batch(texts, num_threads=num_threads)
    out = []
    for doc in ids:
        arr = np.empty(len(doc) + 1, TOKEN_DTYPE)
        arr[:-1] = doc  # numpy raises OverflowError rather than wrapping an id >= 2**16
        arr[-1] = tokenizer.EOT
        out.append(arr)
    return out
