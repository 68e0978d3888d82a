"""Test-wide setup: offline tokenizer files when ../shared has them."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))


# The CLIs' persistent compilation cache (gpt2_jax.compile_cache) goes to a folder of this
# session, never the user's: tests stay hermetic, and subprocesses still share compiles.
if "GPT2_JAX_COMPILATION_CACHE" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="gpt2_jax_test_jax_cache_")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    os.environ["GPT2_JAX_COMPILATION_CACHE"] = _jax_cache

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepared_shakespeare(tmp_path_factory):
    """The built-in corpus tokenised once per session (≈2 s), shared by training tests."""
    from gpt2_jax.config import DataConfig
    from gpt2_jax.data import prepare_source

    out = tmp_path_factory.mktemp("shakespeare")
    prepare_source(DataConfig(), out, show_progress=False)
    return out
