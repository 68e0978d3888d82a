"""Dispatch `python -m benchmarks NAME ...` to `benchmarks.NAME.main(argv)`."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import benchmarks as bench_pkg
from gpt2_jax import host_malloc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name[0] != "_")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m benchmarks {{{','.join(names)}}} [flags]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    host_malloc.tune()  # before jax starts its threads
    raise SystemExit(main())
