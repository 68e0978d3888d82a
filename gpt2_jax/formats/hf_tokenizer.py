"""GPT-2's tokenizer files for exported folders, so `AutoTokenizer.from_pretrained` works.

tiktoken's `gpt2` encoding is built from the two files OpenAI published with GPT-2, which are
exactly transformers' GPT-2 `vocab.json` (encoder.json) and `merges.txt` (vocab.bpe). They come
from tiktoken's own cache (TIKTOKEN_CACHE_DIR, or its download with network), checked against
the SHA-256 sums tiktoken checks.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

GPT2_VOCAB = 50257
EOT_TEXT = "<|endoftext|>"
_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# Our file name → (tiktoken's URL, its SHA-256), as in tiktoken_ext/openai_public.py.
_SOURCES = {
    "vocab.json": (
        _BASE + "encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    "merges.txt": (
        _BASE + "vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
}


@functools.cache
def _bpe_files() -> dict[str, bytes] | str:
    """The two files' bytes, or why they cannot be read (cached: one attempt per process)."""
    from tiktoken.load import read_file_cached

    try:
        return {name: read_file_cached(url, sha) for name, (url, sha) in _SOURCES.items()}
    except Exception as e:  # offline without a cache: requests / OSError / ValueError subclasses
        return (
            "cannot read GPT-2's tokenizer files from tiktoken's cache (no network?); set "
            f"TIKTOKEN_CACHE_DIR to a folder holding them ({type(e).__name__})"
        )


def tokenizer_problem(vocab_size: int) -> str | None:
    """Why GPT-2's tokenizer files are not written for this vocabulary, or None."""
    if vocab_size < GPT2_VOCAB:
        return (
            f"vocab_size {vocab_size} is not GPT-2's {GPT2_VOCAB} (or a padded one); the "
            "tiktoken GPT-2 tokenizer does not fit it"
        )
    files = _bpe_files()
    return files if isinstance(files, str) else None


def write_tokenizer_files(path: str | Path, vocab_size: int, max_len: int) -> bool:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into
    `path` unless `tokenizer_problem`; returns whether they were written."""
    if tokenizer_problem(vocab_size) is not None:
        return False
    p = Path(path)
    for name, data in _bpe_files().items():
        (p / name).write_bytes(data)
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_prefix_space": False,
        "add_bos_token": False,
        "model_max_length": max_len,
    }
    (p / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (p / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return True
