"""Test-wide setup: offline tokenizer files when ../shared has them."""

import os
from pathlib import Path

_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))


def pytest_terminal_summary(terminalreporter):
    from parity_tests.common import WORST

    if WORST:
        terminalreporter.section("parity: worst-case differences (all variants)")
        for check, value in sorted(WORST.items()):
            terminalreporter.write_line(f"{check:<45} {value:.3e}")
