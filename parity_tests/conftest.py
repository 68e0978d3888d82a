"""Test-wide setup: offline tokenizer files when ../shared has them."""

import os
from pathlib import Path

import pytest

_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))


def pytest_sessionfinish(session):
    """On a pytest-xdist worker, hand this worker's worst cases to the controller."""
    from parity_tests.common import WORST

    if hasattr(session.config, "workeroutput"):
        # plain floats: execnet sends only builtin types (some figures are numpy scalars)
        session.config.workeroutput["parity_worst"] = {k: float(v) for k, v in WORST.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the controller: merge a finished worker's worst cases (pytest-xdist hook)."""
    from parity_tests.common import record

    for check, value in getattr(node, "workeroutput", {}).get("parity_worst", {}).items():
        record(check, value)


def pytest_terminal_summary(terminalreporter):
    from parity_tests.common import WORST

    if WORST:
        terminalreporter.section("parity: worst-case differences (all variants)")
        for check, value in sorted(WORST.items()):
            terminalreporter.write_line(f"{check:<45} {value:.3e}")
