"""Documents → uint16 token arrays (GPT-2 BPE, `<|endoftext|>` after every document)."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpt2_jax.data import tokenizer
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


def with_eot(ids: np.ndarray) -> np.ndarray:
    """`ids` + EOT as TOKEN_DTYPE; an id that does not fit is an error, never a wrap-around."""
    limit = int(np.iinfo(TOKEN_DTYPE).max)
    if ids.size and int(ids.max()) > limit:
        raise UserError(f"token id {int(ids.max())} does not fit {TOKEN_DTYPE.__name__}")
    out = np.empty(ids.size + 1, TOKEN_DTYPE)
    out[:-1] = ids
    out[-1] = tokenizer.EOT
    return out


def resolve_threads(num_threads: int) -> int:
    """`data.num_threads`, with 0 meaning all CPU cores."""
    if num_threads < 0:
        raise UserError(f"data.num_threads must be >= 0 (0 = all cores), got {num_threads}")
    return num_threads or os.cpu_count() or 1


def encode_documents(texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
    """Token ids of each text (special-token strings are plain text) followed by EOT."""
    check_vocab_fits(tokenizer.encoding().n_vocab)
    if len(texts) <= 1 or num_threads == 1:
        return [with_eot(_encode(t)) for t in texts]
    # tiktoken releases the GIL while encoding, so the threads run in parallel
    return [with_eot(ids) for ids in _pool(num_threads).map(_encode, texts)]


def _encode(text: str) -> np.ndarray:
    enc = tokenizer.encoding()
    try:  # straight into a numpy buffer: no list of Python ints
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: tiktoken's list path repairs them
        return np.asarray(enc.encode_ordinary(text), np.uint32)


@functools.cache
def _pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="gpt2_jax-tokenise")
