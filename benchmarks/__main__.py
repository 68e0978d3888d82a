"""Dispatch `python -m benchmarks NAME ...` to `benchmarks.NAME.main(argv)`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import benchmarks as bench_pkg
from gpt2_jax import host_malloc


def _summary(name: str) -> str:
    """The first line of a benchmark module's docstring, read without importing it."""
    spec = importlib.util.find_spec(f"benchmarks.{name}")
    tree = ast.parse(Path(spec.origin).read_text())
    return (ast.get_docstring(tree) or "").split("\n")[0]


def usage(names: list[str]) -> str:
    rows = "\n".join(f"  {name:<10} {_summary(name)}" for name in names)
    return (
        f"usage: python -m benchmarks NAME [flags]   (python -m benchmarks NAME --help for its "
        f"flags)\n\nbenchmarks:\n{rows}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name[0] != "_")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(names), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in names:
        print(f"error: no benchmark {argv[0]!r}; use one of {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    host_malloc.tune()  # before jax starts its threads
    raise SystemExit(main())
