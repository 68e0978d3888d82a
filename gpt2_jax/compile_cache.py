"""JAX's persistent compilation cache for the command-line entry points: a repeated command
loads its compiled programs from disk instead of compiling them again.

The CLIs (`train`, `evaluate`, `generate` and `gpt2-jax`) turn it on before their first
compile, in a per-user folder:

- `GPT2_JAX_COMPILATION_CACHE=DIR` puts it in DIR; `=off` turns it off;
- else `JAX_COMPILATION_CACHE_DIR`, when set, is used as jax itself would;
- else `$XDG_CACHE_HOME/gpt2_jax/jax` (default `~/.cache/gpt2_jax/jax`).

Every compile is kept, however quick (jax's default keeps only those over 1 s, which misses
most of a small model's). Entries are keyed by the program, the compiler flags and the jax
version, so a stale one is never loaded. To clear it, delete the folder; it is at most
`MAX_BYTES`, least recently used first out. Library callers opt in with `enable()`.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "GPT2_JAX_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
MAX_BYTES = 4 << 30


def folder() -> Path | None:
    """Where the cache goes under the environment's settings, or None when turned off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2_jax" / "jax"


def enable() -> Path | None:
    """Point jax's persistent compilation cache at `folder()` (None: left off). An unwritable
    folder turns the cache off rather than failing the command."""
    import jax

    path = folder()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
