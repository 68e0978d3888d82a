"""Benchmarks, kept outside the library: `python -m benchmarks NAME [flags]` from a checkout,
one module per NAME. They may import torch, transformers and the reference `gpt2_torch_ref`;
`gpt2_jax` never imports them."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the checkout first on PYTHONPATH, so a
    `python -m benchmarks…` child process starts from whatever folder its parent is in."""
    env = dict(os.environ if env is None else env)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(CHECKOUT) + (os.pathsep + path if path else "")
    return env
