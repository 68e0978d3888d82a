"""Test-wide setup: offline tokenizer files when ../shared has them."""

import os
from pathlib import Path

_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepared_shakespeare(tmp_path_factory):
    """The built-in corpus tokenised once per session (≈2 s), shared by training tests."""
    from gpt2_jax.config import DataConfig
    from gpt2_jax.data import prepare_source

    out = tmp_path_factory.mktemp("shakespeare")
    prepare_source(DataConfig(), out, show_progress=False)
    return out
