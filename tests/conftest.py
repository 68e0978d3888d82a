"""Test-wide setup: offline tokenizer files when ../shared has them."""

import os
from pathlib import Path

_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))
